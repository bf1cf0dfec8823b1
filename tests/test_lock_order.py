"""Lock-order checking: an inversion is reported once, with every edge's
stack, in a program that never deadlocks; the common orders, re-entries and
forks report nothing.

Each case runs in a fresh interpreter (the order graph is per process), on
each implementation: the compiled core and ``H5WATCH_IMPLEMENTATION=python``.
Threads run one after the other, never at the same time: no deadlock ever
happens, and the inversion is found all the same.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_python

from h5watch.process.lock import CompiledWatchedLock

pytestmark = pytest.mark.timeout(120)

IMPLEMENTATIONS = ["python"] + (["compiled"] if CompiledWatchedLock is not None else [])

PRELUDE = r"""
import json, os, sys, threading
import h5watch
from h5watch.process import lock_order
from h5watch.process.lock import IMPLEMENTATION, WatchedLock


def in_thread(target, name):
    thread = threading.Thread(target=target, name=name)
    thread.start()
    thread.join(30)
    assert not thread.is_alive()


def result(**fields):
    print("RESULT " + json.dumps({"implementation": IMPLEMENTATION, **lock_order.snapshot(), **fields}), flush=True)
"""


def run(code: str, implementation: str, args: list[str] | None = None) -> tuple[dict, list[dict]]:
    env = {"H5WATCH_IMPLEMENTATION": implementation, "H5WATCH_LOG_FORMAT": "json"}
    proc = run_python(PRELUDE + code, env=env, args=args, timeout=60)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    assert results, proc.stderr
    assert results[-1]["implementation"] == implementation
    return results[-1], events


def inversions(events: list[dict]) -> list[dict]:
    return [event for event in events if event.get("event") == "lock.order_inversion"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> str:
    return str(request.param)


TWO_ORDERS = r"""
a, b = WatchedLock("app.a"), WatchedLock("app.b")


def takes_a_then_b():
    with a:
        with b:
            pass


def takes_b_then_a():
    with b:
        with a:
            pass


in_thread(takes_a_then_b, "first")
in_thread(takes_b_then_a, "second")
# Both orders again, in both threads' ways: nothing new.
for _ in range(3):
    in_thread(takes_a_then_b, "again")
    in_thread(takes_b_then_a, "again")
result(snapshot=h5watch.snapshot()["lock_order"])
"""


def test_opposite_orders_in_two_threads_are_reported_once_with_both_stacks(implementation):
    outcome, events = run(TWO_ORDERS, implementation)
    [event] = inversions(events)
    assert event["level"] == "warning"
    assert event["locks"] == ["app.a", "app.b"]
    first, second = event["cycle"]
    assert (first["held"], first["acquired"], first["thread_name"]) == ("app.a", "app.b", "first")
    assert (second["held"], second["acquired"], second["thread_name"]) == ("app.b", "app.a", "second")
    assert "in takes_a_then_b" in first["stack"] and "in takes_b_then_a" not in first["stack"]
    assert "in takes_b_then_a" in second["stack"] and "in takes_a_then_b" not in second["stack"]
    assert "'app.a'" in event["message"] and "'app.b'" in event["message"] and "deadlock" in event["message"]
    assert outcome["snapshot"] == {"checking": True, "inversions": 1, "edges": 2}


SAME_ORDER = r"""
a, b, c = WatchedLock("app.a"), WatchedLock("app.b"), WatchedLock("app.c")


def in_order():
    for _ in range(100):
        with a:
            with b:
                with c:
                    pass
            with c:
                pass
        with b:
            with c:
                pass


for i in range(5):
    in_thread(in_order, f"worker-{i}")
result()
"""


def test_the_same_order_repeated_reports_nothing(implementation):
    outcome, events = run(SAME_ORDER, implementation)
    assert inversions(events) == []
    assert outcome["inversions"] == 0
    assert outcome["edges"] == 3  # a->b, b->c, a->c


THREE_LOCK_CYCLE = r"""
a, b, c = WatchedLock("app.a"), WatchedLock("app.b"), WatchedLock("app.c")


def nested(outer, inner):
    def take():
        with outer:
            with inner:
                pass
    return take


in_thread(nested(a, b), "a-then-b")
in_thread(nested(b, c), "b-then-c")
in_thread(nested(c, a), "c-then-a")
in_thread(nested(c, a), "c-then-a-again")
result()
"""


def test_a_three_lock_cycle_is_reported_once(implementation):
    outcome, events = run(THREE_LOCK_CYCLE, implementation)
    [event] = inversions(events)
    assert event["locks"] == ["app.a", "app.b", "app.c"]
    assert [(edge["held"], edge["acquired"], edge["thread_name"]) for edge in event["cycle"]] == [
        ("app.a", "app.b", "a-then-b"), ("app.b", "app.c", "b-then-c"), ("app.c", "app.a", "c-then-a")]
    assert all("in take" in edge["stack"] for edge in event["cycle"])
    assert "app.a -> app.b -> app.c -> app.a" in event["message"]
    assert outcome["inversions"] == 1


PHIL_AGAINST_APP_LOCK = r"""
import io
h5watch.install(state_files=False)
import h5py
import numpy as np

path = sys.argv[1]
with h5py.File(path, "w") as f:
    f["values"] = np.arange(100.0)
app = WatchedLock("app.cache")


class CachedFile(io.RawIOBase):
    # libhdf5 calls readinto while h5py holds phil: it takes the app lock.
    def __init__(self, path):
        self._file = open(path, "rb")

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return self._file.seek(offset, whence)

    def tell(self):
        return self._file.tell()

    def readinto(self, buffer):
        with app:
            return self._file.readinto(buffer)


def app_lock_then_h5py():
    with app:
        with h5py.File(path, "r") as f:
            f["values"][:]


def h5py_then_app_lock():
    with h5py.File(CachedFile(path), "r") as f:
        f["values"][:]


in_thread(app_lock_then_h5py, "service")
in_thread(h5py_then_app_lock, "reader")
in_thread(app_lock_then_h5py, "service-again")
in_thread(h5py_then_app_lock, "reader-again")
result()
"""


def test_phil_against_an_application_lock_through_a_file_like_object(implementation, tmp_path):
    outcome, events = run(PHIL_AGAINST_APP_LOCK, implementation, [str(tmp_path / "data.h5")])
    [event] = inversions(events)
    assert event["locks"] == ["app.cache", "h5py.phil"]
    first, second = event["cycle"]
    assert (first["held"], first["acquired"], first["thread_name"]) == ("app.cache", "h5py.phil", "service")
    assert (second["held"], second["acquired"], second["thread_name"]) == ("h5py.phil", "app.cache", "reader")
    assert "in app_lock_then_h5py" in first["stack"]
    assert "in readinto" in second["stack"] and "in h5py_then_app_lock" in second["stack"]
    assert outcome["inversions"] == 1


REENTRY = r"""
a, b = WatchedLock("app.a"), WatchedLock("app.b")
with a:
    with a:
        with a:
            pass
with a:
    with b:
        with a:  # a re-entry: a is already this thread's
            with b:
                pass
cond = threading.Condition(a)
with a:
    cond.wait(0.01)  # gives a up and takes it back, stack entry included
held_after = len(lock_order.held.locks) + len(getattr(h5watch.process.lock.implementation.compiled_core, "held_locks",
                                                      list)())
result(held_after=held_after)
"""


def test_reentrant_acquires_record_no_edge(implementation):
    outcome, events = run(REENTRY, implementation)
    assert inversions(events) == []
    assert outcome["edges"] == 1  # a->b, and no b->a from the re-entry of a
    assert outcome["held_after"] == 0


LOCK_CLASSES = r"""
class Entry:
    def __init__(self):
        self.lock = WatchedLock("app.entry")


parent, child = Entry(), Entry()
cache = WatchedLock("app.cache")
with parent.lock:
    with child.lock:  # two locks of one class, nested: not checked
        pass
with child.lock:
    with parent.lock:
        pass
in_thread(lambda: [None for _ in [cache.acquire(), parent.lock.acquire(), parent.lock.release(), cache.release()]],
          "cache-then-entry")
with child.lock:  # another instance, the other order: the same two classes
    with cache:
        pass
result()
"""


def test_locks_of_one_name_are_one_class(implementation):
    outcome, events = run(LOCK_CLASSES, implementation)
    [event] = inversions(events)
    assert event["locks"] == ["app.cache", "app.entry"]
    assert outcome["edges"] == 2


AFTER_FORK = r"""
import ctypes
hooked = sys.argv[1] == "os"
a, b, c = WatchedLock("app.a"), WatchedLock("app.b"), WatchedLock("app.c")
# Recorded: b before a, b before c.
with b:
    with a:
        pass
    with c:
        pass
c_taken, done = threading.Event(), threading.Event()


def holds_c():
    with c:
        c_taken.set()
        done.wait(30)


other = threading.Thread(target=holds_c, name="holder")
other.start()
c_taken.wait(30)


def held_here():
    from h5watch.process import implementation
    core = implementation.compiled_core
    stack = core.held_locks() if core is not None else lock_order.held.locks
    return [next(lock.name for lock in (a, b, c) if id(lock) == ident) for ident, _ in stack]


with a:
    sys.stdout.flush()
    pid = os.fork() if hooked else ctypes.PyDLL(None).fork()
    if pid == 0:
        # The child has one thread, this one: it holds a (still on its
        # stack); c's holder did not survive and is on no stack here.
        in_child = held_here()
if pid == 0:
    after_release = held_here()
    with b:  # a or c still counted as held would make a false inversion
        pass
    result(role="child", in_child=in_child, after_release=after_release)
    os._exit(0)
done.set()
other.join(30)
_, status = os.waitpid(pid, 0)
result(role="parent", child_status=status)
"""


@pytest.mark.parametrize("fork", ["os", "libc"])
def test_a_forked_child_holds_on_its_stack_what_it_holds(implementation, fork):
    env = {"H5WATCH_IMPLEMENTATION": implementation, "H5WATCH_LOG_FORMAT": "json"}
    proc = run_python(PRELUDE + AFTER_FORK, env=env, args=[fork], timeout=60)
    assert proc.returncode == 0, proc.stderr
    results = {r["role"]: r for r in (json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                                      if line.startswith("RESULT "))}
    assert results["parent"]["child_status"] == 0, proc.stderr
    child = results["child"]
    assert child["in_child"] == ["app.a"]
    assert child["after_release"] == []
    assert child["inversions"] == 0
    assert "lock.order_inversion" not in proc.stderr


ABOUT_TO_DEADLOCK = r"""
a, b = WatchedLock("app.a"), WatchedLock("app.b")
a_taken, b_taken = threading.Event(), threading.Event()


def first():
    with a:
        a_taken.set()
        b_taken.wait(30)
        if b.acquire(timeout=2):  # the other thread holds b and waits for a
            b.release()


thread = threading.Thread(target=first, name="first")
thread.start()
a_taken.wait(30)
with b:
    b_taken.set()
    # Blocks until first gives up: reported before this thread waits.
    got = a.acquire(timeout=1)
    if got:
        a.release()
thread.join(30)
result(got=got)
"""


def test_the_inversion_that_deadlocks_is_reported_before_the_wait(implementation):
    outcome, events = run(ABOUT_TO_DEADLOCK, implementation)
    assert len(inversions(events)) == 1
    assert outcome["inversions"] == 1


OFF = r"""
lock_order.set_checking(False)
a, b = WatchedLock("app.a"), WatchedLock("app.b")
with a:
    with b:
        pass
with b:
    with a:
        pass
result()
"""


def test_checking_off_records_nothing(implementation):
    outcome, events = run(OFF, implementation)
    assert inversions(events) == []
    assert outcome == {**outcome, "checking": False, "edges": 0, "inversions": 0}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_inversion_is_reported_over_the_lock_tests(implementation, tmp_path):
    """The lock tests (every inner lock, Condition, RLock parity, threads)
    in a pytest whose own events reach its stderr (``-s``): none is a
    lock-order inversion. A test added there that takes two locks in both
    orders makes this one fail."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    # The implementation asked for is the one those tests must find (CI sets
    # H5WATCH_EXPECT_IMPLEMENTATION for its own run).
    env = {**os.environ, "H5WATCH_IMPLEMENTATION": implementation, "H5WATCH_EXPECT_IMPLEMENTATION": implementation,
           "H5WATCH_LOG_FORMAT": "json"}
    # Started from an empty directory (``-m`` puts the current one first on
    # sys.path), so it imports the h5watch this run imports: a source tree
    # never shadows an install under test. Same rootdir and configuration.
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", f"--rootdir={REPO}",
         "-c", str(REPO / "pyproject.toml"), str(REPO / "tests" / "test_lock.py"),
         str(REPO / "tests" / "test_rlock_parity.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280, start_new_session=True,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
    assert "lock.order_inversion" not in proc.stdout + proc.stderr
