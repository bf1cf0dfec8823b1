"""Workers for the daemon tests; run under ``h5watch run`` (h5watch installed at start-up).

Usage: worker.py MODE DIR [K]
  count DIR K  K acquisitions of WatchedLock 'app.x' and K dataset reads; prints
               {"pid", "app": K, "phil": <this process's phil acquisitions>}
               once done, then waits until DIR/release exists and exits 0.
  stuck DIR    a thread holds 'app.x' forever, the main thread waits for it.
  crowd DIR N  a thread holds 'app.x' forever, N threads (waiter-0 first) wait for it.
  busy DIR N   N threads (busy-0 first) take 'app.x' in turn without end,
               each holding it 2 ms: a lock always contended, at a steady rate.
  gil DIR      a thread 'gil-holder' holds 'app.x' for 0.1 s while the main
               thread waits (a hold and a wait in the flight recorder), then
               holds it again and, once the state file shows that hold, the
               main thread's wait for it and a running watchdog, sleeps in
               libc's sleep() called through ctypes.PyDLL, which keeps the
               GIL: every other thread (the main one waiting for 'app.x', the
               watchdog) is blocked, so the heartbeat stops.
  orphan DIR   a thread holds 'app.x' while the main thread forks without
               Python's hooks, then lets go; the child (on_orphan=warn) stops
               its watchdog and waits on the orphaned lock forever. Prints the
               child's pid, then how the child ended.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time

import h5watch

assert h5watch.is_installed(), "run me under 'h5watch run'"

import h5py
import numpy as np

mode, directory = sys.argv[1], sys.argv[2]
app = h5watch.WatchedLock("app.x", threading.Lock())


def emit(**fields) -> None:
    os.write(1, (json.dumps(fields) + "\n").encode())


if mode == "count":
    k = int(sys.argv[3])
    path = os.path.join(directory, f"data-{os.getpid()}.h5")
    with h5py.File(path, "w") as f:
        f["values"] = np.arange(100.0)
    with h5py.File(path, "r") as f:
        for _ in range(k):
            with app:
                f["values"][:]
    # Counters are final now: nothing below takes a watched lock.
    snap = h5watch.snapshot()
    emit(pid=os.getpid(), app=snap["locks"]["app.x"]["stats"]["acquisitions"],
         phil=snap["locks"]["h5py.phil"]["stats"]["acquisitions"])
    while not os.path.exists(os.path.join(directory, "release")):
        time.sleep(0.05)
    sys.exit(0)

if mode == "stuck":
    def hold_forever() -> None:
        with app:
            time.sleep(3600)

    threading.Thread(target=hold_forever, name="stuck-holder", daemon=True).start()
    time.sleep(0.2)
    emit(pid=os.getpid(), ready=True)
    app.acquire()
    sys.exit(0)

if mode == "crowd":
    def hold_forever() -> None:
        with app:
            time.sleep(3600)

    def wait_forever() -> None:
        app.acquire()

    threading.Thread(target=hold_forever, name="crowd-holder", daemon=True).start()
    time.sleep(0.2)
    for i in range(int(sys.argv[3])):
        threading.Thread(target=wait_forever, name=f"waiter-{i}", daemon=True).start()
        while len(app.waiters()) <= i:
            time.sleep(0.01)
    emit(pid=os.getpid(), ready=True)
    time.sleep(3600)

if mode == "busy":
    def take_turns() -> None:
        while True:
            with app:
                time.sleep(0.002)

    for i in range(int(sys.argv[3])):
        threading.Thread(target=take_turns, name=f"busy-{i}", daemon=True).start()
    emit(pid=os.getpid(), ready=True)
    time.sleep(3600)

if mode == "gil":
    from h5watch.statefile import read_state_file

    state_path = h5watch.snapshot()["state"]["path"]

    def recorded() -> bool:
        """The state file shows the hold, the main thread's wait and a live
        heartbeat: once the GIL is kept nothing here writes it again."""
        state = read_state_file(state_path)
        for lock in state.locks():
            if lock["lock"] == "app.x":
                holder = lock["holder"] or {}
                waiting = [t["thread_name"] for t in lock["waiting_threads"]]
                return state.watchdog_running and holder.get("thread_name") == "gil-holder" and "MainThread" in waiting
        return False

    taken, go, held = threading.Event(), threading.Event(), threading.Event()

    def hold_the_gil_in_c() -> None:
        with app:  # first a long hold that the main thread waits through: both in the flight recorder
            taken.set()
            time.sleep(0.1)
        go.wait(30)
        with app:
            held.set()
            # Keeping the GIL before the main thread's wait is written would
            # freeze it unwritten.
            deadline = time.monotonic() + 20
            while not recorded():
                if time.monotonic() > deadline:
                    os.write(2, b"the state file never showed the hold and the wait\n")
                    os._exit(3)
                time.sleep(0.02)
            emit(pid=os.getpid(), ready=True)
            ctypes.PyDLL(None).sleep(3600)

    threading.Thread(target=hold_the_gil_in_c, name="gil-holder", daemon=True).start()
    taken.wait(30)
    with app:
        pass
    go.set()
    held.wait(30)
    app.acquire()
    sys.exit(0)

if mode == "orphan":
    forked = threading.Event()

    def hold_until_forked() -> None:
        with app:
            forked.wait(30)
            time.sleep(0.2)

    threading.Thread(target=hold_until_forked, name="doomed-holder", daemon=True).start()
    time.sleep(0.2)
    pid = ctypes.PyDLL(None).fork()
    if pid == 0:
        from h5watch.process import runtime

        runtime.watchdog.stop()

        def child_waits_here() -> None:
            app.acquire()

        child_waits_here()
        os._exit(0)
    forked.set()  # the parent is healthy: only the child is stuck
    emit(pid=os.getpid(), child=pid)
    _, status = os.waitpid(pid, 0)
    emit(child_status=status)
    sys.exit(0)
