"""End to end: a real Prometheus scrapes a real ``h5watch daemon`` watching real workers.

Three instrumented workers share the daemon's state directory:

- ``e2e-contention``: reader threads and a slow holder contend for h5py's
  lock, with wait and hold timeouts low enough to count; the main thread forks
  twice a second;
- ``e2e-orphan``: forks while another thread holds h5py's lock past
  ``fork_timeout``; the child finds the lock orphaned and exits 70
  (``on_orphan=kill``), its state file counting the orphan;
- ``e2e-stuck``: the test stops it with SIGSTOP; the daemon (``--kill-after 2
  --kill-stopped``: without it, a stopped worker is spared) kills it.

Prometheus (1 s scrape and evaluation) loads the shipped rules with every
``for:`` removed. Then, through its HTTP API: every query of every dashboard
panel evaluates and returns data, the orphan and kill alerts fire, and every
recording rule has values.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import RULES, dashboard_queries, recording_rules, substitute, tool

pytestmark = pytest.mark.timeout(300)

SETTLE_DEADLINE_SECONDS = 120
SCRAPE_INTERVAL = "1s"

CONTENTION_WORKER = """
    import os, sys, threading, time
    import h5watch
    h5watch.install(state_dir=sys.argv[1], service="e2e-contention", wait_timeout=0.05,
                    hold_timeout=0.1, fork_timeout=5, tick_interval=0.1)
    import h5py
    import numpy as np

    path = os.path.join(sys.argv[2], "contention.h5")
    with h5py.File(path, "w") as f:
        f["values"] = np.arange(100_000.0)

    def reader():
        while True:
            with h5py.File(path, "r") as f:
                f["values"][:]

    def slow_holder():
        while True:
            with h5py._objects.phil:
                time.sleep(0.15)
            time.sleep(0.3)

    for index in range(3):
        threading.Thread(target=reader, name=f"reader-{index}", daemon=True).start()
    threading.Thread(target=slow_holder, name="slow-holder", daemon=True).start()
    print("ready", flush=True)
    while True:
        time.sleep(0.5)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
"""

ORPHAN_WORKER = """
    import ctypes, json, os, signal, sys, threading, time
    import h5watch
    h5watch.install(state_dir=sys.argv[1], service="e2e-orphan", on_orphan="kill", fork_timeout=0.3)
    import h5py

    phil = h5py._objects.phil
    print("ready", flush=True)
    # Let Prometheus see this workload's counters before the first orphan.
    time.sleep(float(sys.argv[2]))
    while True:
        held, release = threading.Event(), threading.Event()

        def hold():
            with phil:
                held.set()
                release.wait(5)

        holder = threading.Thread(target=hold, name="holder-at-fork", daemon=True)
        holder.start()
        held.wait(5)
        pid = os.fork()
        if pid == 0:
            with phil:
                pass
            os._exit(0)
        release.set()
        holder.join()
        deadline = time.monotonic() + 10
        code = "hung"
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        print(json.dumps({"child_exit": code}), flush=True)
        time.sleep(3)
"""

STUCK_WORKER = """
    import sys, time
    import h5watch
    h5watch.install(state_dir=sys.argv[1], service="e2e-stuck")
    import h5py
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """The first truthy value of ``condition()``, or None after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (OSError, ValueError):
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def wait_for_http(process: subprocess.Popen, url: str, timeout: float) -> bool:
    """Whether ``url`` answered before ``timeout``; gives up as soon as ``process`` exits."""

    def answered() -> bool | None:
        if process.poll() is not None:
            raise ProcessExited
        return bool(http_get(url))

    try:
        return bool(wait_for(answered, timeout))
    except ProcessExited:
        return False


class ProcessExited(Exception):
    pass


def http_get(url: str, timeout: float = 5) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@dataclass
class Stack:
    """The running Prometheus, daemon and workers, and what they wrote."""

    tmp: Path
    prometheus_url: str
    daemon_address: str
    started_at: float
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)
    stuck_exit: int | None = None

    def api(self, path: str, **params: Any) -> Any:
        url = f"{self.prometheus_url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            body = json.loads(http_get(url, timeout=10))
        except urllib.error.HTTPError as exc:  # PromQL errors come back as 400 with a JSON body
            body = json.loads(exc.read())
        return body

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.api("query", query=expr)
        assert body["status"] == "success", (expr, body)
        return body["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def firing(self) -> dict[str, list[dict[str, str]]]:
        alerts: dict[str, list[dict[str, str]]] = {}
        for alert in self.api("alerts")["data"]["alerts"]:
            if alert["state"] == "firing":
                alerts.setdefault(alert["labels"]["alertname"], []).append(alert["labels"])
        return alerts

    def diagnostics(self) -> str:
        parts = []
        for name, path in self.logs.items():
            parts.append(f"--- {name} ({path.name}) ---\n{tail(path)}")
        return "\n".join(parts)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        self.logs[name] = log
        full_env = dict(os.environ)
        full_env.pop("PYTHONPATH", None)
        for key in list(full_env):
            if key.startswith("H5WATCH_"):
                del full_env[key]
        full_env.update(env or {})
        with open(log, "wb") as out:
            process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=self.tmp, start_new_session=True
            )
        self.processes[name] = process
        return process

    def start_worker(self, name: str, code: str, *args: str) -> subprocess.Popen:
        return self.start(name, [sys.executable, "-c", textwrap.dedent(code), *args])

    def stop(self) -> None:
        for process in self.processes.values():
            try:
                os.killpg(process.pid, signal.SIGCONT)
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for process in self.processes.values():
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


def rules_for_the_test(tmp: Path) -> Path:
    """The shipped rules with every ``for:`` removed, so alerts fire on first evaluation."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    path = tmp / "rules" / "h5watch.rules.yml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def saw_line(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    prometheus = tool("prometheus")
    tmp = tmp_path_factory.mktemp("e2e")
    state_dir = tmp / "state"
    state_dir.mkdir()
    daemon_port, prometheus_port = free_port(), free_port()
    stack = Stack(
        tmp=tmp,
        prometheus_url=f"http://127.0.0.1:{prometheus_port}",
        daemon_address=f"127.0.0.1:{daemon_port}",
        started_at=time.time(),
    )
    try:
        daemon = stack.start(
            "daemon",
            [sys.executable, "-m", "h5watch", "daemon", "--listen", stack.daemon_address,
             "--state-dir", str(state_dir), "--kill-after", "2", "--scan-interval", "0.5",
             "--kill-stopped"],
        )
        if not wait_for_http(daemon, f"http://{stack.daemon_address}/metrics", 30):
            pytest.fail(f"h5watch daemon did not serve /metrics (exit code {daemon.poll()})\n{stack.diagnostics()}")

        rules = rules_for_the_test(tmp)
        config = {
            "global": {"scrape_interval": SCRAPE_INTERVAL, "scrape_timeout": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "h5watch", "static_configs": [{"targets": [stack.daemon_address]}]}],
        }
        config_path = tmp / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        server = stack.start(
            "prometheus",
            [prometheus, f"--config.file={config_path}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prometheus_port}", "--log.level=warn"],
        )
        if not wait_for_http(server, f"{stack.prometheus_url}/-/ready", 30):
            pytest.fail(f"Prometheus did not become ready (exit code {server.poll()})\n{stack.diagnostics()}")
        stack.started_at = time.time()

        stack.start_worker("contention", CONTENTION_WORKER, str(state_dir), str(tmp))
        stack.start_worker("orphan", ORPHAN_WORKER, str(state_dir), "5")
        stuck = stack.start_worker("stuck", STUCK_WORKER, str(state_dir))
        for name in ("contention", "orphan", "stuck"):
            if not wait_for(lambda name=name: saw_line(stack.logs[name], "ready"), 60, 0.2):
                pytest.fail(f"worker {name} did not start\n{stack.diagnostics()}")

        # Let the daemon see the stuck worker alive, and Prometheus scrape its
        # workload's kill counter at 0 (a counter whose first sample is
        # already 1 shows no increase), then freeze it.
        if not wait_for(lambda: stack.query('h5watch_worker_kills_total{workload="e2e-stuck"}'), 60, 0.5):
            pytest.fail(f"Prometheus never scraped the stuck worker's workload\n{stack.diagnostics()}")
        time.sleep(3)
        os.kill(stuck.pid, signal.SIGSTOP)
        try:
            stack.stuck_exit = stuck.wait(timeout=30)
        except subprocess.TimeoutExpired:
            stack.stuck_exit = None

        wanted = {"H5WatchOrphanedLock", "H5WatchWorkerKilled"}
        wait_for(lambda: wanted <= set(stack.firing()), SETTLE_DEADLINE_SECONDS, 1)
        # A little more history for the range queries' rate windows.
        time.sleep(3)
        yield stack
    finally:
        stack.stop()


def grafana_variables(stack: Stack) -> dict[str, str]:
    """What Grafana puts in for "All" of a multi-value variable: the values, as a
    regex, escaped once for the regex and once more for the PromQL string."""

    def values(label: str) -> str:
        found = stack.api(f"label/{label}/values", **{"match[]": "h5watch_lock_acquisitions_total"})["data"]
        assert found, f"no values of {label} in Prometheus"
        return "(" + "|".join(re.escape(value).replace("\\", "\\\\") for value in found) + ")"

    range_seconds = int(time.time() - stack.started_at) + 1
    return {
        "instance": values("instance"),
        "workload": values("workload"),
        "lock": values("lock"),
        "__rate_interval": "1m",
        "__interval": "2s",
        "__interval_ms": "2000",
        "__range": f"{range_seconds}s",
        "__range_s": str(range_seconds),
        "__range_ms": str(range_seconds * 1000),
    }


def has_a_number(result: list[dict[str, Any]]) -> bool:
    samples = [sample for series in result for sample in series.get("values", [series.get("value")]) if sample]
    return any(sample[1] not in ("NaN", "+Inf", "-Inf") for sample in samples)


def test_daemon_is_scraped(stack):
    assert stack.value('up{job="h5watch"}') == 1.0, stack.diagnostics()


def test_orphan_children_exit_70(stack):
    codes = [json.loads(line)["child_exit"] for line in stack.logs["orphan"].read_text().splitlines() if line.startswith('{"child_exit"')]
    assert codes, stack.diagnostics()
    assert set(codes) == {70}, codes


def test_stopped_worker_is_killed_by_the_daemon(stack):
    assert stack.stuck_exit is not None, f"the daemon did not kill the stopped worker\n{stack.diagnostics()}"
    assert stack.stuck_exit < 0, stack.stuck_exit


STUCK_KILLS_SCRAPED = 'h5watch_worker_kills_total{workload="e2e-stuck"}[10m]'


def test_orphan_and_kill_alerts_fire(stack):
    firing = stack.firing()
    details = (
        f"firing: {sorted(firing)}\n"
        f"orphans: {stack.query('h5watch_orphaned_locks_total')}\n"
        f"kills: {stack.query('h5watch_worker_kills_total')}\n"
        f"the stuck worker's kills, as scraped: {stack.query(STUCK_KILLS_SCRAPED)}\n"
        f"{stack.diagnostics()}"
    )
    assert "H5WatchOrphanedLock" in firing, details
    assert "H5WatchWorkerKilled" in firing, details
    orphan = firing["H5WatchOrphanedLock"]
    assert {"workload": "e2e-orphan", "lock": "h5py.phil", "action": "killed"}.items() <= orphan[0].items(), orphan
    assert any(labels.get("workload", "e2e-stuck") == "e2e-stuck" for labels in firing["H5WatchWorkerKilled"])
    for labels in orphan + firing["H5WatchWorkerKilled"]:
        assert labels["severity"] == "warning"


def test_recording_rules_have_values(stack):
    missing = []
    for rule in recording_rules():
        result = stack.query(rule["record"])
        if not has_a_number(result):
            missing.append((rule["record"], result))
    assert not missing, missing


def test_every_dashboard_query_returns_data(stack):
    variables = grafana_variables(stack)
    end = time.time()
    failures = []
    for title, target, expr in dashboard_queries(variables):
        if target.get("instant"):
            body = stack.api("query", query=expr, time=end)
        else:
            body = stack.api("query_range", query=expr, start=stack.started_at, end=end, step=2)
        if body["status"] != "success":
            failures.append((title, expr, body.get("error")))
        elif not has_a_number(body["data"]["result"]):
            failures.append((title, expr, "no data"))
    assert not failures, "\n".join(map(str, failures))


def test_the_scrape_carries_process_metrics_and_each_workload_s_versions(stack):
    import platform

    import h5py

    import h5watch

    for expr in ('process_resident_memory_bytes{job="h5watch"}', 'process_cpu_seconds_total{job="h5watch"}',
                 'process_open_fds{job="h5watch"}', 'python_info{job="h5watch"}'):
        assert has_a_number(stack.query(expr)), (expr, stack.diagnostics())
    [info] = stack.query('h5watch_workload_info{workload="e2e-contention"}')
    assert {"h5py_version": h5py.version.version, "hdf5_version": h5py.version.hdf5_version, "h5watch_version": h5watch.__version__,
            "python_version": platform.python_version()}.items() <= info["metric"].items(), info
    [build] = stack.query('h5watch_build_info{job="h5watch"}')
    assert build["metric"]["version"] == h5watch.__version__ and build["metric"]["h5py_version"], build


def test_the_held_share_stays_within_100_percent(stack):
    variables = grafana_variables(stack)
    end = time.time()
    shares = [(title, target["expr"]) for title, target, _ in dashboard_queries() if "h5watch_lock_hold_seconds_sum" in target["expr"]]
    assert shares
    for title, expr in shares:
        body = stack.api("query_range", query=substitute(expr, variables), start=stack.started_at, end=end, step=1)
        values = [float(value) for series in body["data"]["result"] for _, value in series["values"]]
        assert values and max(values) <= 1.0, (title, max(values, default=None))
