"""Programs that truly deadlock, one per kind, with real threads and real h5py.

Usage: deadlocks.py KIND ON_DEADLOCK|bare DIR [fork-first]
KIND: lock_cycle, phil_app_lock, gc_under_phil, import_lock, holder_waits_on_waiter.
``bare`` runs without h5watch (each one then hangs forever). The thread that
closes the cycle prints ``CLOSING <unix time>`` on stdout just before its
blocking call; at the end (if the program recovers) ``RESULT <json>``. The
log goes to stderr. No timeout is configured. ``fork-first``: the program,
still single-threaded, forks a child that exits at once before it starts
its threads (on 3.12+ the watchdog stops for such a fork).
"""

from __future__ import annotations

import gc
import io
import json
import os
import queue
import sys
import threading
import time

kind, policy, workdir = sys.argv[1:4]
tick = 0.2

if policy != "bare":
    import h5watch

    h5watch.install(on_deadlock=policy, tick_interval=tick, state_files=False)

import h5py
import numpy as np

path = os.path.join(workdir, "data.h5")
with h5py.File(path, "w") as f:
    f["values"] = np.arange(1000.0)
raw = open(path, "rb").read()
if sys.argv[4:] == ["fork-first"]:
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    time.sleep(0.5)
    if policy != "bare":
        print(f"WATCHDOG {h5watch.snapshot()['watchdog']['running']}", flush=True)
outcomes: dict[str, str] = {}
counted_when_raised: dict[str, int] = {}
if policy == "bare":
    # The same locks, unwatched: the hang is the program's, not h5watch's.
    make_lock = lambda name: threading.RLock()  # noqa: E731
    DeadlockError: type[BaseException] = RuntimeError
else:
    make_lock = h5watch.WatchedLock
    DeadlockError = h5watch.DeadlockError


def closing() -> None:
    print(f"CLOSING {time.time()}", flush=True)


def guarded(name: str, body: object) -> object:
    def run() -> None:
        try:
            body()  # type: ignore[operator]
            outcomes[name] = "finished"
        except DeadlockError as exc:
            outcomes[name] = "DeadlockError: " + str(exc)[:200]
            if policy != "bare":  # what the thread the error unwinds can read at once
                counted_when_raised.update(h5watch.snapshot()["watchdog"]["deadlocks"])
        except Exception as exc:  # an h5py call that failed because its callback raised
            outcomes[name] = f"{type(exc).__name__}: " + str(exc)[:200]
            if isinstance(exc.__cause__ or exc.__context__, DeadlockError):
                outcomes[name] += " (DeadlockError inside)"
    return run


class Remote(io.RawIOBase):
    """A file-like object over ``raw`` whose reads call ``fetch`` (libhdf5
    calls ``readinto`` while the reader holds phil)."""

    def __init__(self, fetch: object) -> None:
        self.pos = 0
        self.fetch = fetch

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self.pos = pos if whence == 0 else (self.pos + pos if whence == 1 else len(raw) + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        data = self.fetch(self.pos, len(buffer))  # type: ignore[operator]
        buffer[: len(data)] = data
        self.pos += len(data)
        return len(data)


def read_through(fetch: object) -> None:
    with h5py.File(Remote(fetch), "r") as f:
        f["values"][3]


threads: list[threading.Thread] = []


def start(name: str, body: object) -> None:
    thread = threading.Thread(target=guarded(name, body), name=name, daemon=True)
    threads.append(thread)
    thread.start()


if kind == "lock_cycle":
    a, b = make_lock("app.a"), make_lock("app.b")
    both = threading.Barrier(2)

    def first() -> None:
        with a:
            both.wait()
            with b:
                pass

    def second() -> None:
        with b:
            both.wait()
            time.sleep(0.05)
            closing()
            with a:
                pass

    start("first", first)
    start("second", second)

elif kind == "phil_app_lock":
    cache = make_lock("app.cache")
    writer_holds = threading.Event()
    reader_in_read = threading.Event()

    def fetch(pos: int, size: int) -> bytes:
        reader_in_read.set()
        with cache:  # libhdf5 called us with phil held
            return raw[pos:pos + size]

    def reader() -> None:
        writer_holds.wait()
        read_through(fetch)

    def writer() -> None:
        with cache:
            writer_holds.set()
            reader_in_read.wait()
            time.sleep(0.05)
            closing()
            with h5py.File(path, "r") as f:  # needs phil
                f.attrs.get("x")

    start("reader", reader)
    start("writer", writer)

elif kind == "gc_under_phil":
    gc.disable()
    requests: queue.Queue[dict] = queue.Queue()

    def io_loop() -> None:
        while True:
            request = requests.get()
            closing()
            gc.collect()  # frees the cycle below: the DatasetID's dealloc takes phil at C level
            request["data"] = raw[request["pos"]:request["pos"] + request["size"]]
            request["done"].set()

    def fetch_remote(pos: int, size: int) -> bytes:
        request = {"pos": pos, "size": size, "done": threading.Event()}
        requests.put(request)
        request["done"].wait()
        return request["data"]

    keep = h5py.File(path, "r")
    dataset = keep["values"]
    junk: list = [dataset.id]
    junk.append(junk)  # a reference cycle holding an h5py object
    del junk, dataset
    io_thread = threading.Thread(target=io_loop, name="io", daemon=True)
    io_thread.start()
    start("reader", lambda: read_through(fetch_remote))

elif kind == "import_lock":
    sys.path.insert(0, workdir)
    with open(os.path.join(workdir, "lazy_backend.py"), "w") as module:
        module.write(
            "import builtins, h5py\n"
            "builtins.IMPORTING.set()\n"
            "builtins.READER_IN_READ.wait()\n"
            "import time; time.sleep(0.05)\n"
            "print(f'CLOSING {time.time()}', flush=True)\n"
            f"with h5py.File({path!r}, 'r') as f:\n"
            "    f.attrs.get('x')\n"
        )
    import builtins

    builtins.IMPORTING = threading.Event()  # type: ignore[attr-defined]
    builtins.READER_IN_READ = threading.Event()  # type: ignore[attr-defined]

    def fetch_lazily(pos: int, size: int) -> bytes:
        builtins.READER_IN_READ.set()  # type: ignore[attr-defined]
        import lazy_backend  # noqa: F401  # a lazy import, with phil held

        return raw[pos:pos + size]

    def importer() -> None:
        import lazy_backend  # noqa: F401

    def reader() -> None:
        builtins.IMPORTING.wait()  # type: ignore[attr-defined]
        read_through(fetch_lazily)

    start("importer", importer)
    start("reader", reader)

elif kind == "holder_waits_on_waiter":
    registry = make_lock("app.registry")
    jobs: queue.Queue[dict] = queue.Queue()

    def worker() -> None:
        job = jobs.get()
        closing()
        try:
            with registry:  # the holder waits for this very job
                job["result"] = 1
        finally:
            job["done"].set()

    def holder() -> None:
        with registry:
            job = {"done": threading.Event()}
            jobs.put(job)
            job["done"].wait()

    start("worker", worker)
    start("holder", holder)

else:
    raise SystemExit(f"unknown kind {kind!r}")

for thread in threads:
    thread.join()
snapshot = h5watch.snapshot() if policy != "bare" else {}
print("RESULT " + json.dumps({"outcomes": outcomes, "deadlocks": snapshot.get("watchdog", {}).get("deadlocks"),
                               "counted_when_raised": counted_when_raised}), flush=True)
