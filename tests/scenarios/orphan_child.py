"""One thread holds a lock while the main thread forks; the child then uses it.

Usage: orphan_child.py DIR LOCK(phil|app) FORK(os|nohook) ON_ORPHAN
Prints one JSON line from the parent: the child's exit code and its output.
The child prints CHILD-OK, CHILD-RAISED or CHILD-ERROR lines on fd 1.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
import time

directory, which, how, on_orphan = sys.argv[1:5]

import h5watch

h5watch.install(on_orphan=on_orphan, fork_timeout=0.5, state_files=False)

import h5py
import numpy as np

source = os.path.join(directory, "parent.h5")
with h5py.File(source, "w") as f:
    f["values"] = np.arange(1000.0)

app_lock = h5watch.WatchedLock("app.cache", threading.Lock())
target = h5py._objects.phil if which == "phil" else app_lock
held = threading.Event()
let_go = threading.Event()


def hold_forever() -> None:
    with target:
        held.set()
        let_go.wait(10)


holder = threading.Thread(target=hold_forever, name="stuck-holder", daemon=True)
holder.start()
held.wait(5)


def child() -> None:
    try:
        with target:
            pass
        with h5py.File(source, "r") as f:
            total = float(f["values"][:].sum())
        fresh = os.path.join(directory, f"child-{os.getpid()}.h5")
        with h5py.File(fresh, "w") as f:
            f["values"] = np.arange(10.0)
        with h5py.File(fresh, "r") as f:
            fresh_total = float(f["values"][:].sum())
        os.write(1, f"CHILD-OK {total} {fresh_total}\n".encode())
        os._exit(0)
    except h5watch.OrphanedLockError as exc:
        os.write(1, f"CHILD-RAISED {exc.evidence['holder']['thread_name']}\n".encode())
        os._exit(5)
    except BaseException as exc:
        os.write(1, f"CHILD-ERROR {exc!r}\n".encode())
        os._exit(4)


started = time.monotonic()
pid = os.fork() if how == "os" else ctypes.PyDLL(None).fork()
if pid == 0:
    child()
fork_returned = time.monotonic() - started
deadline = time.monotonic() + 8
code = None
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        break
    time.sleep(0.02)
if code is None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
let_go.set()
holder.join(10)
print(json.dumps({"exit_code": code, "seconds": time.monotonic() - started, "fork_returned": fork_returned}), flush=True)
