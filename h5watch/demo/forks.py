"""The demo's fork-safety scenarios (F1, F2, F3), each without and with h5watch.

Every scenario runs in a fresh interpreter (``python -m h5watch.demo.forks
SCENARIO instrumented|bare DIR``), since h5watch must be installed before
h5py is imported, and prints one JSON result line; the parent reads it and
the child's JSON log lines. Hung children are killed by the scenario itself.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

__all__ = ["run_scenario", "SCENARIOS"]

SCENARIOS = {
    "F1": "fork that skips the at-fork hooks while threads read",
    "F2": "fork while a slow file-like object holds phil",
    "F3": "a holder stuck past hold_timeout",
}


def run_scenario(name: str, instrument: bool, directory: str, timeout: float = 30) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Run one scenario in a fresh interpreter; its result and its log events."""
    mode = "instrumented" if instrument else "bare"
    proc = subprocess.Popen(
        [sys.executable, "-m", "h5watch.demo.forks", name, mode, directory],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    result: dict[str, Any] = {"error": f"scenario exited with {proc.returncode}"}
    for line in out.splitlines():
        if line.startswith("{"):
            result = json.loads(line)
    events = []
    for line in err.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return result, events


# -- the scenarios, run inside the fresh interpreter --------------------------


def _wait_children(pids: list[int], deadline_seconds: float) -> dict[str, int]:
    outcome = {"ok": 0, "killed_by_h5watch": 0, "hung": 0, "other": 0}
    deadline = time.monotonic() + deadline_seconds
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pending.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                outcome["ok" if code == 0 else "killed_by_h5watch" if code == 70 else "other"] += 1
        time.sleep(0.02)
    for pid in pending:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcome["hung"] += 1
    return outcome


def _f1(directory: str) -> dict[str, Any]:
    import h5py
    import numpy as np

    paths = []
    for index in range(4):
        path = os.path.join(directory, f"f1-{index}.h5")
        with h5py.File(path, "w") as f:
            f["values"] = np.random.default_rng(index).random((200, 200))
        paths.append(path)
    stop = threading.Event()

    def reader(path: str) -> None:
        while not stop.is_set():
            with h5py.File(path, "r") as f:
                f["values"][:]

    threads = [threading.Thread(target=reader, args=(p,), name=f"reader-{i}", daemon=True) for i, p in enumerate(paths)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    c_fork = ctypes.PyDLL(None).fork
    pids = []
    for index in range(10):
        pid = c_fork()
        if pid == 0:
            with h5py.File(paths[index % len(paths)], "r") as f:
                f["values"][:]
            os._exit(0)
        pids.append(pid)
        time.sleep(0.01)
    outcome = _wait_children(pids, 3.0)
    stop.set()
    for thread in threads:
        thread.join(5)
    return {"children": len(pids), **outcome}


class _SlowFile(io.BytesIO):
    slept = False

    def slow_readinto(self, target: Any) -> int:
        if not self.slept:
            self.slept = True
            time.sleep(3)
        return io.BytesIO.readinto(self, target)

    def readinto(self, target: Any) -> int:
        return self.slow_readinto(target)


def _f2(directory: str) -> dict[str, Any]:
    import h5py
    import numpy as np

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f["values"] = np.arange(100.0)
    image = buffer.getvalue()
    opened = threading.Event()

    def slow_open() -> None:
        opened.set()
        with h5py.File(_SlowFile(image), "r") as f:
            f["values"][:]

    reader = threading.Thread(target=slow_open, name="slow-fileobj-reader")
    reader.start()
    opened.wait()
    time.sleep(0.5)
    begin = time.monotonic()
    pid = os.fork()
    if pid == 0:
        with h5py.File(io.BytesIO(image), "r") as f:
            f["values"][:]
        os._exit(0)
    fork_seconds = time.monotonic() - begin
    outcome = _wait_children([pid], 5.0)
    reader.join(10)
    return {"fork_seconds": round(fork_seconds, 2), "h5py": h5py.__version__, **outcome}


def _f3(directory: str) -> dict[str, Any]:
    import h5py
    import numpy as np

    path = os.path.join(directory, "f3.h5")
    with h5py.File(path, "w") as f:
        f["values"] = np.arange(100.0)

    def stuck_in_h5py() -> None:
        with h5py.File(path, "r") as f:
            with h5py._objects.phil:
                f["values"][:]
                time.sleep(1.5)  # stands for slow I/O inside h5py

    holder = threading.Thread(target=stuck_in_h5py, name="stuck-holder")
    begin = time.monotonic()
    holder.start()
    time.sleep(0.1)
    with h5py.File(path, "r") as f:
        f["values"][:]
    waited = time.monotonic() - begin
    holder.join()
    time.sleep(0.3)
    return {"main_thread_waited_seconds": round(waited, 2)}


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m h5watch.demo.forks")
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("mode", choices=("instrumented", "bare"))
    parser.add_argument("directory")
    args = parser.parse_args(argv)
    if args.mode == "instrumented":
        import h5watch

        options: dict[str, Any] = {"state_files": False, "tick_interval": 0.1}
        if args.scenario == "F2":
            options["fork_timeout"] = 1
        if args.scenario == "F3":
            options["hold_timeout"] = 0.5
        h5watch.install(**options)
    scenario = {"F1": _f1, "F2": _f2, "F3": _f3}[args.scenario]
    print(json.dumps(scenario(args.directory)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
