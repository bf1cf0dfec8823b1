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
args = parser.parse_args()

if args.instrument:
    import h5watch

    h5watch.install(on_orphan=args.on_orphan, fork_timeout=5, state_files=False)

import h5py  # noqa: E402
import numpy as np  # noqa: E402

paths = [os.path.join(args.dir, f"seed-{i}.h5") for i in range(args.threads)]
expected = []
for i, path in enumerate(paths):
    data = np.random.default_rng(i).random((200, 200))
    with h5py.File(path, "w") as f:
        f["values"] = data
        f.attrs["x"] = i
    expected.append(float(data.sum()))

stop = threading.Event()


def reader(path: str) -> None:
    while not stop.is_set():
        with h5py.File(path, "r") as f:
            f["values"][:]
            f.attrs["x"]


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


results = {"children": 0, "hung": 0, "bad_data": 0, "exit_codes": {}}
for _round in range(args.rounds):
    pids = []
    for index in range(args.children):
        pid = fork()
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
