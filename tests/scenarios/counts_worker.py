"""Workers for the exact-count tests; run under ``h5watch run`` (h5watch installed at start-up).

Usage: counts_worker.py MODE DIR [ARG...]; each mode prints one JSON line
(``{"pid", ...}``) once its counting is done, then nothing takes a watched
lock any more. Modes that end with "waits" exit 0 once DIR/release exists;
``burst`` waits to be killed.

  burst DIR N C R F   F forks (children exit at once), then on WatchedLock
                      'app.burst': C contended acquisitions (a thread blocks
                      until the main thread lets go), one hold with R
                      re-entries, and N plain acquisitions with an h5py read
                      every tenth; prints this process's own snapshot
  exec DIR N1 N2      N1 acquisitions of 'app.exec' (and h5py reads), then
                      os.execv into a new instrumented Python (same pid) that
                      makes N2 more, prints, waits
  reinstall DIR N1 N2 N1 acquisitions of 'app.reinstall', uninstall(); prints,
                      waits for DIR/install, install(), N2 more; prints, waits
  recreate DIR N1 N2  'app.recreated' made, acquired N1 times and collected;
                      made again under that name and acquired N2 times; waits
  twins DIR A B       two live locks named 'app.twin', acquired A and B times
  names DIR           12 short-lived locks 'app.short.NN' (NN + 1 acquisitions
                      each, collected at once), then 12 live ones 'app.live.NN'
                      (100 + NN each), then 'app.long' (777); waits
"""

from __future__ import annotations

import gc
import json
import os
import sys
import threading
import time

import h5watch

assert h5watch.is_installed(), "run me under 'h5watch run'"

mode, directory, args = sys.argv[1], sys.argv[2], [int(a) for a in sys.argv[3:]]


def emit(**fields) -> None:
    os.write(1, (json.dumps({"pid": os.getpid(), **fields}) + "\n").encode())


def acquire_times(lock, n: int) -> None:
    for _ in range(n):
        with lock:
            pass


def wait_for_release() -> None:
    deadline = time.monotonic() + 120
    while not os.path.exists(os.path.join(directory, "release")) and time.monotonic() < deadline:
        time.sleep(0.05)
    sys.exit(0)


def make_data_file():
    import h5py
    import numpy as np

    path = os.path.join(directory, f"data-{os.getpid()}.h5")
    with h5py.File(path, "w") as f:
        f["values"] = np.arange(100.0)
    return h5py.File(path, "r")


def contend_once(lock) -> None:
    """One acquisition that blocks: a thread waits until the main thread lets go."""
    lock.acquire()
    waiter = threading.Thread(target=acquire_times, args=(lock, 1), name="contender")
    waiter.start()
    while not h5watch.snapshot()["locks"][lock.name]["waiters"]:
        time.sleep(0.001)
    lock.release()
    waiter.join()


if mode == "burst":
    n, contended, reentries, forks = args
    import h5py  # noqa: F401  (phil is watched from here on)

    for _ in range(forks):
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    app = h5watch.WatchedLock("app.burst")
    for _ in range(contended):
        contend_once(app)
    with app:
        for _ in range(reentries):
            with app:
                pass
    f = make_data_file()
    for i in range(n):
        with app:
            if i % 10 == 0:
                f["values"][:5]
    f.close()
    # Counters are final now: nothing below takes a watched lock.
    snap = h5watch.snapshot()
    stats, phil = snap["locks"]["app.burst"]["stats"], snap["locks"]["h5py.phil"]["stats"]
    emit(app=stats["acquisitions"], contentions=stats["contentions"], reentries=stats["reentries"],
         wait_count=stats["wait"]["count"], hold_count=stats["hold"]["count"],
         phil=phil["acquisitions"], phil_holds=phil["hold"]["count"], forks=snap["forks"]["forks"])
    while True:
        time.sleep(1)

if mode in ("exec", "exec-second"):
    app = h5watch.WatchedLock("app.exec")
    f = make_data_file()
    count = args[0] if mode == "exec" else args[1]
    for _ in range(count):
        with app:
            f["values"][:5]
    f.close()
    snap = h5watch.snapshot()
    emit(image=1 if mode == "exec" else 2, app=snap["locks"]["app.exec"]["stats"]["acquisitions"],
         phil=snap["locks"]["h5py.phil"]["stats"]["acquisitions"])
    if mode == "exec":
        os.execv(sys.executable, [sys.executable, __file__, "exec-second", directory, *map(str, args)])
    wait_for_release()

if mode == "reinstall":
    n1, n2 = args
    app = h5watch.WatchedLock("app.reinstall")
    acquire_times(app, n1)
    h5watch.uninstall()
    emit(phase="uninstalled")
    while not os.path.exists(os.path.join(directory, "install")):
        time.sleep(0.02)
    h5watch.install()
    acquire_times(app, n2)
    emit(app=app.stats.snapshot()["acquisitions"])
    wait_for_release()

if mode == "recreate":
    n1, n2 = args
    first = h5watch.WatchedLock("app.recreated")
    acquire_times(first, n1)
    del first
    gc.collect()
    second = h5watch.WatchedLock("app.recreated")
    acquire_times(second, n2)
    emit(app=second.stats.snapshot()["acquisitions"])
    wait_for_release()

if mode == "twins":
    a, b = args
    one, other = h5watch.WatchedLock("app.twin"), h5watch.WatchedLock("app.twin")
    acquire_times(one, a)
    acquire_times(other, b)
    emit(counts=[one.stats.snapshot()["acquisitions"], other.stats.snapshot()["acquisitions"]])
    wait_for_release()

if mode == "names":
    for i in range(12):
        short = h5watch.WatchedLock(f"app.short.{i:02d}")
        acquire_times(short, i + 1)
        del short
        gc.collect()
    live = [h5watch.WatchedLock(f"app.live.{i:02d}") for i in range(12)]
    for i, lock in enumerate(live):
        acquire_times(lock, 100 + i)
    long_lived = h5watch.WatchedLock("app.long")
    acquire_times(long_lived, 777)
    emit(names=12 + len(live) + 1)
    wait_for_release()

sys.exit(f"unknown mode {mode!r}")
