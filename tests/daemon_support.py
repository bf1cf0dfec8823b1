"""A real ``h5watch daemon`` and real workers under ``h5watch run``, for the tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import REPO
from prometheus_client.parser import text_string_to_metric_families

H5WATCH = [sys.executable, "-m", "h5watch"]
WORKER = str(REPO / "tests" / "scenarios" / "worker.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


class DaemonProcess:
    def __init__(self, state_dir: Path, log_path: Path, *args: str) -> None:
        self.port = free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [*H5WATCH, "daemon", "--state-dir", str(state_dir), "--listen", f"127.0.0.1:{self.port}", *args],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO,
        )
        wait_for(self.healthy, 20, what="the daemon's /healthz")

    def get(self, path: str, accept: str | None = None) -> tuple[int, str, str]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", headers={"Accept": accept} if accept else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()

    def healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
        try:
            return self.get("/healthz")[0] == 200
        except OSError:
            return False

    def metrics_text(self) -> str:
        status, _, body = self.get("/metrics")
        assert status == 200, body
        return body

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        out = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return out

    def value(self, name: str, **labels: str) -> float:
        wanted = tuple(sorted(labels.items()))
        return sum(v for (n, have), v in self.samples().items() if n == name and all(item in have for item in wanted))

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self, event: str) -> list[dict]:
        out = []
        for line in self.log_text().splitlines():
            if line.startswith("{"):
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == event:
                    out.append(record)
        return out

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_worker(state_dir: Path, *args: str, service: str = "worker", options: tuple[str, ...] = ()) -> subprocess.Popen:
    return subprocess.Popen(
        [*H5WATCH, "run", "--state-dir", str(state_dir), "--service", service, *options, "--",
         sys.executable, WORKER, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO,
    )


def read_json_line(proc: subprocess.Popen, timeout: float = 30) -> dict:
    """The next JSON line a worker prints (bounded: the worker is killed on timeout)."""
    import selectors

    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.1):
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{"):
                return json.loads(line)
    kill_group(proc)
    raise AssertionError(f"worker printed no JSON line in {timeout} s; stderr:\n{proc.stderr.read()[-3000:]}")


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass
