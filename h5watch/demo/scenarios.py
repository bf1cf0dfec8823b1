"""The programs ``h5watch demo`` runs, each in a fresh interpreter.

``python -m h5watch.demo.scenarios NAME bare|instrumented DIR`` runs one of
them (``about`` runs none: it says which h5watch and h5py it imported) (h5watch must be installed before h5py is imported, so every run is a
new process) and prints one JSON result line on stdout; its log events are
JSON lines on stderr. The parent starts them with DIR, a directory of its
own, as the working directory, so that they import the installed h5watch
even when the demo is started from a checkout of the sources. A child that
a scenario forks and that hangs is killed by the scenario itself.
"""

from __future__ import annotations

import argparse
import ctypes
import io
import json
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from typing import Any, NamedTuple

__all__ = ["SCENARIOS", "Run", "run_scenario"]

# name -> what it shows, in plain words (the parent's progress lines).
SCENARIOS = {
    "threads": "threads reading HDF5 files take turns for the lock",
    "fork_from_c": "a fork() made by C code while threads read",
    "fork_during_slow_read": "os.fork() while a thread is inside a slow read",
    "stuck_holder": "a thread that keeps the lock while others need it",
    "gc_under_phil": "garbage collection on the thread that serves a file's reads",
}

# How long a forked child may take before the scenario calls it hung (a
# healthy one reads its file in milliseconds) and kills it.
HUNG_AFTER_SECONDS = 1.5
SLOW_READ_SECONDS = 1.5
STUCK_HOLD_SECONDS = 1.0
HOLD_TIMEOUT = 0.3
FORK_TIMEOUT = 0.5


class Run(NamedTuple):
    """One run of a scenario: its result line and its log events."""

    result: dict[str, Any]
    events: list[dict[str, Any]]
    seconds: float


def run_scenario(name: str, instrument: bool, directory: str, extra: list[str] | None = None,
                 timeout: float = 30) -> Run:
    """Run one scenario in a fresh interpreter, started in ``directory``."""
    mode = "instrumented" if instrument else "bare"
    begin = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "h5watch.demo.scenarios", name, mode, directory, *(extra or [])],
        cwd=directory,  # not the caller's directory: it may be a checkout of h5watch
        env=_environ(instrument),
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
    last = err.strip().splitlines()[-1:] or [""]
    result: dict[str, Any] = {"error": f"the program exited with {proc.returncode}: {last[0][:200]}"}
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
    return Run(result, events, time.monotonic() - begin)


def _environ(instrument: bool) -> dict[str, str]:
    """This process's environment; for a run without h5watch, without the
    start-up hook of ``h5watch run`` (when the demo itself runs under it)."""
    env = dict(os.environ)
    if not instrument and "PYTHONPATH" in env:
        entries = env["PYTHONPATH"].split(os.pathsep)
        env["PYTHONPATH"] = os.pathsep.join(
            entry for entry in entries
            if not (os.path.basename(entry.rstrip(os.sep)) == "bootstrap"
                    and os.path.basename(os.path.dirname(entry.rstrip(os.sep))) == "h5watch")
        )
    return env


# -- the scenarios, run inside the fresh interpreter --------------------------


def _about() -> dict[str, Any]:
    """What this interpreter runs: the h5watch it imported, and its lock core."""
    import h5py

    import h5watch
    from h5watch.process import implementation

    about: dict[str, Any] = {
        "h5watch": h5watch.__version__,
        "h5watch_path": os.path.dirname(os.path.abspath(h5watch.__file__)),
        "h5py": h5py.version.version,
        "hdf5": h5py.version.hdf5_version,
        "python": platform.python_version(),
    }
    if h5watch.snapshot()["installed"]:
        about["implementation"] = implementation.NAME
        about["implementation_reason"] = implementation.REASON
    return about


def _write_files(directory: str, prefix: str, count: int) -> list[str]:
    import h5py
    import numpy as np

    paths = []
    for index in range(count):
        path = os.path.join(directory, f"{prefix}-{index}.h5")
        with h5py.File(path, "w") as f:
            f["values"] = np.random.default_rng(index).random((200, 200))
            f.attrs["x"] = index
        paths.append(path)
    return paths


def _threads(directory: str, threads: int, seconds: float) -> dict[str, Any]:
    """``threads`` threads and the main thread each read their own file in a
    loop; the result holds the lock's statistics as h5watch counted them."""
    import h5py

    paths = _write_files(directory, "threads", threads + 1)
    deadline = time.monotonic() + seconds
    counts = [0] * (threads + 1)

    def read_loop(slot: int) -> None:
        while time.monotonic() < deadline:
            with h5py.File(paths[slot], "r") as f:
                f["values"][:]
                f.attrs["x"]
            counts[slot] += 1

    workers = [threading.Thread(target=read_loop, args=(i,), name=f"reader-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    read_loop(threads)
    for worker in workers:
        worker.join()
    result: dict[str, Any] = {"reads": sum(counts), "threads": threads, "seconds": seconds}
    import h5watch

    locks = h5watch.snapshot()["locks"]
    if "h5py.phil" in locks:
        result["lock"] = locks["h5py.phil"]["stats"]
    return result


def _wait_children(pids: list[int], deadline_seconds: float) -> dict[str, int]:
    outcome = {"ok": 0, "exited_70": 0, "hung": 0, "other": 0}
    deadline = time.monotonic() + deadline_seconds
    pending = set(pids)
    while pending and time.monotonic() < deadline:
        for pid in list(pending):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                pending.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                outcome["ok" if code == 0 else "exited_70" if code == 70 else "other"] += 1
        time.sleep(0.02)
    for pid in pending:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        outcome["hung"] += 1
    return outcome


def _fork_from_c(directory: str) -> dict[str, Any]:
    """Four threads read while the main thread forks ten children from C
    (as a C extension would: Python's own fork handling does not run);
    each child reads a file."""
    import h5py

    paths = _write_files(directory, "fork-from-c", 4)
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
    outcome = _wait_children(pids, HUNG_AFTER_SECONDS)
    stop.set()
    for thread in threads:
        thread.join(5)
    return {"children": len(pids), **outcome}


class _SlowFile(io.BytesIO):
    """An HDF5 file served by a Python file-like object whose first read is
    slow, as a network or cloud file can be."""

    slept = False

    def readinto(self, target: Any) -> int:
        if not self.slept:
            self.slept = True
            time.sleep(SLOW_READ_SECONDS)
        return io.BytesIO.readinto(self, target)


def _fork_during_slow_read(directory: str) -> dict[str, Any]:
    """A thread opens a file through a slow file-like object (h5py holds
    the lock meanwhile); the main thread forks a child that reads a file."""
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

    reader = threading.Thread(target=slow_open, name="slow-reader")
    reader.start()
    opened.wait()
    time.sleep(0.3)
    begin = time.monotonic()
    pid = os.fork()
    if pid == 0:
        with h5py.File(io.BytesIO(image), "r") as f:
            f["values"][:]
        os._exit(0)
    fork_seconds = time.monotonic() - begin
    outcome = _wait_children([pid], HUNG_AFTER_SECONDS)
    reader.join(10)
    return {"fork_seconds": round(fork_seconds, 2), **outcome}


def _stuck_holder(directory: str) -> dict[str, Any]:
    """A thread keeps the lock (sleeping inside ``with h5py.phil``, standing
    for slow I/O inside h5py) while the main thread reads a file."""
    import h5py
    import numpy as np

    path = os.path.join(directory, "stuck-holder.h5")
    with h5py.File(path, "w") as f:
        f["values"] = np.arange(100.0)

    def keep_the_lock() -> None:
        with h5py.File(path, "r") as f:
            with h5py._objects.phil:
                f["values"][:]
                time.sleep(STUCK_HOLD_SECONDS)

    holder = threading.Thread(target=keep_the_lock, name="stuck-holder")
    holder.start()
    time.sleep(0.1)
    begin = time.monotonic()
    with h5py.File(path, "r") as f:
        f["values"][:]
    waited = time.monotonic() - begin
    holder.join()
    return {"main_thread_waited_seconds": round(waited, 2)}


def _gc_under_phil(directory: str, instrumented: bool) -> dict[str, Any]:
    """A reader opens an HDF5 file through a Python file object whose reads
    an IO thread serves (as fsspec does); that thread runs a garbage
    collection, which frees an h5py object left in a reference cycle: its
    deallocation takes h5py's lock, which the reader holds while it waits
    for the IO thread. Neither ever goes on. The program waits a moment,
    says whether the reader finished, and exits without joining them."""
    import gc
    import queue

    import h5py
    import numpy as np

    path = os.path.join(directory, "gc-under-lock.h5")
    with h5py.File(path, "w") as f:
        f["values"] = np.arange(1000.0)
    raw = open(path, "rb").read()
    gc.disable()  # the collection happens where the program runs it: on the IO thread
    requests: queue.Queue[dict[str, Any]] = queue.Queue()

    def serve_reads() -> None:
        while True:
            request = requests.get()
            gc.collect()
            request["data"] = raw[request["pos"]:request["pos"] + request["size"]]
            request["done"].set()

    class RemoteFile(io.RawIOBase):
        def __init__(self) -> None:
            self.pos = 0

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return True

        def seek(self, pos: int, whence: int = 0) -> int:
            self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(raw) + pos)
            return self.pos

        def tell(self) -> int:
            return self.pos

        def readinto(self, buffer: Any) -> int:
            request: dict[str, Any] = {"pos": self.pos, "size": len(buffer), "done": threading.Event()}
            requests.put(request)
            request["done"].wait()
            data = request["data"]
            buffer[: len(data)] = data
            self.pos += len(data)
            return len(data)

    finished = threading.Event()

    def read_remote_file() -> None:
        with h5py.File(RemoteFile(), "r") as f:
            f["values"][3]
        finished.set()

    left_behind = h5py.File(path, "r")
    cycle: list[Any] = [left_behind["values"].id]
    cycle.append(cycle)
    del cycle
    threading.Thread(target=serve_reads, name="io", daemon=True).start()
    threading.Thread(target=read_remote_file, name="reader", daemon=True).start()
    begin = time.monotonic()
    while time.monotonic() - begin < HUNG_AFTER_SECONDS and not finished.is_set():
        if instrumented:
            import h5watch

            if h5watch.snapshot()["watchdog"]["deadlocks"].get("gc_under_phil"):
                break
        time.sleep(0.02)
    result = {"reader_finished": finished.is_set(), "waited_seconds": round(time.monotonic() - begin, 2),
              "about": _about()}
    # Two threads are stuck for good: leave without waiting for them (the
    # interpreter's own exit would).
    print(json.dumps(result), flush=True)
    os._exit(0)


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m h5watch.demo.scenarios")
    parser.add_argument("scenario", choices=["about", *SCENARIOS])
    parser.add_argument("mode", choices=("instrumented", "bare"))
    parser.add_argument("directory")
    parser.add_argument("--threads", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    if args.mode == "instrumented":
        import h5watch

        # What the demo describes, whatever H5WATCH_* variables say.
        options: dict[str, Any] = {"state_files": False, "tick_interval": 0.1, "service": "demo",
                                   "log_format": "json", "log_level": "warning", "on_orphan": "kill",
                                   "on_timeout": "warn", "kill_exit_code": 70}
        if args.scenario == "fork_during_slow_read":
            options["fork_timeout"] = FORK_TIMEOUT
        if args.scenario == "stuck_holder":
            options["hold_timeout"] = HOLD_TIMEOUT
        options["on_deadlock"] = "warn"
        h5watch.install(**options)
    if args.scenario == "about":
        result: dict[str, Any] = {}
    elif args.scenario == "threads":
        result = _threads(args.directory, args.threads, args.seconds)
    elif args.scenario == "gc_under_phil":
        result = _gc_under_phil(args.directory, args.mode == "instrumented")
    else:
        result = {"fork_from_c": _fork_from_c, "fork_during_slow_read": _fork_during_slow_read,
                  "stuck_holder": _stuck_holder}[args.scenario](args.directory)
    result["about"] = _about()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
