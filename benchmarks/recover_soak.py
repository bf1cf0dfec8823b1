"""How often does a child recovered by ``on_orphan=recover`` crash afterwards?

``python benchmarks/recover_soak.py [--python PY ...] [--forks N] [--kinds cdll,pydll,os] [--json]``

Per interpreter and fork kind, one worker process installs h5watch with
``on_orphan=recover`` before ``import h5py``, starts reader threads that read
their own HDF5 files in a loop (so ``phil`` is held most of the time, by
threads that will not survive a fork), and forks ``--forks`` children in
batches from the main thread. Each child writes and reads back a file of
its own with h5py and exits 0 (3 when its data is wrong, 4 on an exception).

Fork kinds: ``cdll`` is ``ctypes.CDLL(None).fork()`` (a C extension's fork:
no at-fork hooks, the GIL released around it), ``pydll`` the same holding
the GIL, ``os`` is ``os.fork()`` (h5watch's before-fork hook takes ``phil``
first, so its children rarely need recovering: the control).

Each child ends one way: ``ok``, ``bad_data`` (exit 3), ``exception``
(exit 4), another exit code, ``signal`` (by name: SIGSEGV, SIGABRT...), or
``hung`` (killed after ``--child-deadline``; with ``--classify-hangs`` gdb
says, for the first five, whether it hangs in CPython's GIL hand-over, which a C-level fork that
releases the GIL can cause with or without h5watch). ``recovered`` counts
the children that logged ``lock.recovered`` (their first h5py call found
``phil`` orphaned and reset it); the crash rate is over those.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

KINDS = ("cdll", "pydll", "os")
# gdb takes seconds per process: the first few hung children are enough to say where.
_CLASSIFY_AT_MOST = 5


def worker(args: argparse.Namespace) -> None:
    """One interpreter, one fork kind; prints one JSON line of child fates."""
    import ctypes
    import threading

    import h5watch

    h5watch.install(on_orphan="recover", fork_timeout=5, state_files=False, log_format="json", log_level="warning")
    import h5py
    import numpy as np

    paths = []
    for i in range(args.threads):
        path = os.path.join(args.dir, f"reader-{i}.h5")
        with h5py.File(path, "w") as f:
            f["values"] = np.random.default_rng(i).random((100, 100))
            f.attrs["x"] = i
        paths.append(path)
    stop = threading.Event()

    def reader(path: str) -> None:
        while not stop.is_set():
            with h5py.File(path, "r") as f:
                f["values"][:]
                f.attrs["x"]

    threads = [threading.Thread(target=reader, args=(p,), name=f"reader-{i}", daemon=True) for i, p in enumerate(paths)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)

    fork = {"cdll": ctypes.CDLL(None).fork, "pydll": ctypes.PyDLL(None).fork, "os": os.fork}[args.kind]
    expected = np.arange(1000, dtype="f8")

    def child(index: int) -> None:
        # Only os._exit: no atexit, no flush of buffers copied from the parent.
        path = os.path.join(args.dir, f"child-{index}.h5")
        try:
            with h5py.File(path, "w") as f:
                f["values"] = expected
                f.attrs["index"] = index
            with h5py.File(path, "r") as f:
                good = bool((f["values"][:] == expected).all()) and int(f.attrs["index"]) == index
            os.unlink(path)
            os._exit(0 if good else 3)
        except BaseException:
            os._exit(4)

    fates: dict[str, int] = {}
    children: dict[int, str] = {}
    hung_where: dict[str, int] = {}
    index = 0
    while index < args.forks:
        batch = []
        for _ in range(min(args.batch, args.forks - index)):
            pid = fork()
            if pid == 0:
                child(index)
            if pid < 0:
                raise OSError(ctypes.get_errno(), "fork failed")
            batch.append((pid, time.monotonic()))
            index += 1
        for pid, started in batch:
            fate = _reap(pid, started, args.child_deadline, args.classify_hangs, hung_where)
            fates[fate] = fates.get(fate, 0) + 1
            if fate != "ok":
                children[pid] = fate
    stop.set()
    for thread in threads:
        thread.join(5)
    print(json.dumps({"forks": index, "fates": fates, "not_ok": children, "hung_where": hung_where,
                      "h5py": h5py.__version__, "python": sys.version.split()[0]}))
    sys.stdout.flush()
    os._exit(0)


def _reap(pid: int, started: float, deadline: float, classify: bool, hung_where: dict[str, int]) -> str:
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.WIFSIGNALED(status):
                return signal.Signals(os.WTERMSIG(status)).name
            code = os.waitstatus_to_exitcode(status)
            return {0: "ok", 3: "bad_data", 4: "exception"}.get(code, f"exit {code}")
        if time.monotonic() - started > deadline:
            if classify and sum(hung_where.values()) < _CLASSIFY_AT_MOST:
                where = _where_blocked(pid)
                hung_where[where] = hung_where.get(where, 0) + 1
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "hung"
        time.sleep(0.002)


def _where_blocked(pid: int) -> str:
    """'gil' when the child waits in CPython's GIL hand-over, else 'other'."""
    if shutil.which("gdb") is None:
        return "unknown"
    try:
        trace = subprocess.run(["gdb", "-p", str(pid), "-batch", "-ex", "bt 40"], check=False, capture_output=True, text=True,
                               timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return "gil" if ("take_gil" in trace or "drop_gil" in trace) else "other"


def run_one(python: str, kind: str, args: argparse.Namespace) -> dict[str, object]:
    """One worker; its children's ``lock.recovered`` events name who was recovered."""
    with tempfile.TemporaryDirectory(prefix="recover-soak-") as directory:
        log_path = os.path.join(directory, "events.jsonl")
        command = [python, os.path.abspath(__file__), "--worker", "--kind", kind, "--dir", directory,
                   "--forks", str(args.forks), "--threads", str(args.threads), "--batch", str(args.batch),
                   "--child-deadline", str(args.child_deadline)] + (["--classify-hangs"] if args.classify_hangs else [])
        started = time.monotonic()
        with open(log_path, "wb") as log:
            result = subprocess.run(command, check=False, stdout=subprocess.PIPE, stderr=log, text=True,
                                    timeout=args.forks * args.child_deadline + 600)
        if result.returncode != 0 or not result.stdout.strip():
            with open(log_path, errors="replace") as log:
                raise SystemExit(f"worker failed ({result.returncode}): {log.read()[-2000:]}")
        report = json.loads(result.stdout.strip().splitlines()[-1])
        recovered_pids = set()
        with open(log_path, errors="replace") as log:
            for line in log:
                if line.startswith("{") and '"lock.recovered"' in line:
                    try:
                        recovered_pids.add(int(json.loads(line)["pid"]))
                    except (ValueError, KeyError):
                        pass
    not_ok = {int(pid): fate for pid, fate in report.pop("not_ok").items()}
    recovered_not_ok: dict[str, int] = {}
    for pid, fate in not_ok.items():
        if pid in recovered_pids:
            recovered_not_ok[fate] = recovered_not_ok.get(fate, 0) + 1
    report.update(kind=kind, recovered=len(recovered_pids), recovered_not_ok=recovered_not_ok,
                  seconds=round(time.monotonic() - started, 1))
    return report


def _rate(count: int, total: int) -> str:
    return f"{count} ({100 * count / total:.2f}%)" if total else "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", action="append", help="interpreter to soak (repeatable; default: this one)")
    parser.add_argument("--forks", type=int, default=2000, help="children per interpreter and fork kind (default 2000)")
    parser.add_argument("--kinds", default="cdll,os", help=f"comma-separated fork kinds among {', '.join(KINDS)}")
    parser.add_argument("--threads", type=int, default=2, help="reader threads holding phil (default 2)")
    parser.add_argument("--batch", type=int, default=32, help="children forked before reaping (default 32)")
    parser.add_argument("--child-deadline", type=float, default=3.0, help="seconds before a child counts as hung (default 3)")
    parser.add_argument("--classify-hangs", action="store_true", help="ask gdb where the first hung children are blocked")
    parser.add_argument("--json", action="store_true", help="one JSON object per run instead of a table")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    kinds = [kind.strip() for kind in args.kinds.split(",") if kind.strip()]
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        parser.error(f"--kinds: expected some of {', '.join(KINDS)}, got {args.kinds!r}")
    for python in args.python or [sys.executable]:
        for kind in kinds:
            report = run_one(python, kind, args)
            if args.json:
                print(json.dumps(report))
                continue
            forks, fates = int(report["forks"]), report["fates"]
            crashed = sum(n for fate, n in fates.items() if fate.startswith("SIG"))
            print(f"h5py {report['h5py']} (Python {report['python']}), {kind} fork: {forks} children in {report['seconds']} s;"
                  f" recovered {report['recovered']}; died by a signal {_rate(crashed, forks)};"
                  f" hung {_rate(fates.get('hung', 0), forks)} {report['hung_where'] or ''};"
                  f" fates {fates}; of the recovered, not ok: {report['recovered_not_ok']}")
            sys.stdout.flush()


if __name__ == "__main__":
    main()
