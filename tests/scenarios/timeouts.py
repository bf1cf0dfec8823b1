"""A thread holds a lock for 1.5 s while another waits: exercise the watchdog.

Usage: timeouts.py ON_TIMEOUT KIND(hold|wait)
Prints RESULT lines on stdout; the log goes to stderr.
"""

from __future__ import annotations

import json
import sys
import threading
import time

on_timeout, kind = sys.argv[1:3]

import h5watch

options = {"on_timeout": on_timeout, "tick_interval": 0.05, "state_files": False}
options["hold_timeout" if kind == "hold" else "wait_timeout"] = 0.3
h5watch.install(**options)

lock = h5watch.WatchedLock("app.slow", threading.Lock())
held = threading.Event()


def slow_holder() -> None:
    with lock:
        held.set()
        time.sleep(1.5)


def waiter(outcome: dict) -> None:
    try:
        with lock:
            outcome["acquired"] = True
    except h5watch.LockTimeout as exc:
        outcome["raised"] = str(exc)


holder = threading.Thread(target=slow_holder, name="slow-holder")
holder.start()
held.wait(5)
outcome: dict = {}
waiting = threading.Thread(target=waiter, args=(outcome,), name="patient-waiter")
if kind == "wait":
    waiting.start()
holder.join()
if kind == "wait":
    waiting.join(5)
time.sleep(0.3)
stats = h5watch.snapshot()["locks"]["app.slow"]["stats"]
print("RESULT " + json.dumps({"outcome": outcome, "timeouts": stats["timeouts"]}), flush=True)
