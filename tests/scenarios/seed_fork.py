"""The seed scenario: reader threads on their own files while the main thread forks readers.

Prints one JSON line: children forked, hung (killed after --child-deadline),
exit codes, and children whose data was wrong. Exit codes of children:
0 data correct, 3 data wrong, 70 killed by h5watch (orphan policy).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time

parser = argparse.ArgumentParser()
parser.add_argument("--dir", required=True)
parser.add_argument("--instrument", action="store_true")
parser.add_argument("--fork", choices=("os", "nohook"), default="os")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--children", type=int, default=10)
parser.add_argument("--threads", type=int, default=10)
parser.add_argument("--child-deadline", type=float, default=10.0)
parser.add_argument("--on-orphan", default="kill")
parser.add_argument("--app-lock", action="store_true", help="readers hold a WatchedLock around every h5py call")
parser.add_argument(
    "--classify-hangs", action="store_true", help="before killing a hung child, ask gdb where it is blocked"
)
args = parser.parse_args()

if args.instrument:
    import h5watch

    h5watch.install(on_orphan=args.on_orphan, fork_timeout=5, state_files=False)

import h5py
import numpy as np

paths = [os.path.join(args.dir, f"seed-{i}.h5") for i in range(args.threads)]
expected = []
for i, path in enumerate(paths):
    data = np.random.default_rng(i).random((200, 200))
    with h5py.File(path, "w") as f:
        f["values"] = data
        f.attrs["x"] = i
    expected.append(float(data.sum()))

stop = threading.Event()
if args.app_lock:
    cache_lock = h5watch.WatchedLock("app.cache", threading.Lock())


def read_once(path: str) -> None:
    with h5py.File(path, "r") as f:
        f["values"][:]
        f.attrs["x"]


def reader(path: str) -> None:
    while not stop.is_set():
        if args.app_lock:
            with cache_lock:
                read_once(path)
        else:
            read_once(path)


def where_blocked(pid: int) -> str:
    """'gil' when the child waits in CPython's GIL hand-over (a fork copied
    it mid-flight; no Python code can run there), else 'other'."""
    try:
        trace = subprocess.run(
            ["gdb", "-p", str(pid), "-batch", "-ex", "bt 30"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return "gil" if ("drop_gil" in trace or "take_gil" in trace) else "other"


threads = [threading.Thread(target=reader, args=(p,), name=f"reader-{i}", daemon=True) for i, p in enumerate(paths)]
for t in threads:
    t.start()
time.sleep(0.2)

fork = os.fork if args.fork == "os" else ctypes.PyDLL(None).fork
libc_exit = os._exit


def child(index: int) -> None:
    path = paths[index % len(paths)]
    try:
        with h5py.File(path, "r") as f:
            total = float(f["values"][:].sum())
        libc_exit(0 if total == expected[index % len(paths)] else 3)
    except BaseException:
        libc_exit(4)


results = {"children": 0, "hung": 0, "bad_data": 0, "exit_codes": {}, "hung_where": {}, "fork_seconds": []}
for _round in range(args.rounds):
    pids = []
    for index in range(args.children):
        fork_started = time.monotonic()
        pid = fork()
        if pid:
            results["fork_seconds"].append(round(time.monotonic() - fork_started, 4))
        if pid == 0:
            child(index)
        pids.append((pid, time.monotonic()))
        results["children"] += 1
    for pid, started in pids:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                results["exit_codes"][str(code)] = results["exit_codes"].get(str(code), 0) + 1
                if code == 3:
                    results["bad_data"] += 1
                break
            if time.monotonic() - started > args.child_deadline:
                if args.classify_hangs:
                    where = where_blocked(pid)
                    results["hung_where"][where] = results["hung_where"].get(where, 0) + 1
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                results["hung"] += 1
                break
            time.sleep(0.01)
stop.set()
for t in threads:
    t.join(5)
print(json.dumps(results))
sys.stdout.flush()
