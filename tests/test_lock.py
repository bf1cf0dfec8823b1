"""``WatchedLock`` behaves like ``threading.RLock``, whatever lock it wraps."""

from __future__ import annotations

import threading
import time

import h5py
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from h5watch.process.lock import CompiledWatchedLock, PythonWatchedLock

pytestmark = pytest.mark.timeout(60)

FastRLock = type(h5py._objects.phil)
INNER = {
    "own": lambda: None,
    "Lock": threading.Lock,
    "RLock": threading.RLock,
    "FastRLock": FastRLock,
}


# Both implementations, whichever is active: they must behave the same.
IMPLEMENTATIONS = {"python": PythonWatchedLock}
if CompiledWatchedLock is not None:
    IMPLEMENTATIONS["compiled"] = CompiledWatchedLock


@pytest.fixture(params=[(impl, inner) for impl in sorted(IMPLEMENTATIONS) for inner in sorted(INNER)],
                ids=lambda p: f"{p[0]}-{p[1]}")
def make_lock(request):
    impl, inner = request.param
    return lambda: IMPLEMENTATIONS[impl](f"test.{inner}", INNER[inner]())


def in_thread(func):
    """Run ``func`` on another thread and return its result (bounded)."""
    result = {}

    def run():
        try:
            result["value"] = func()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "helper thread hung"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_reentrancy(make_lock):
    lock = make_lock()
    for _depth in range(1, 6):
        assert lock.acquire() is True
        assert lock.locked()
    for _ in range(4):
        lock.release()
        assert lock.locked()
        assert in_thread(lambda: lock.acquire(blocking=False)) is False
    lock.release()
    assert not lock.locked()
    assert lock.stats.acquisitions == 1 and lock.stats.reentries == 4


def test_inner_lock_is_held_while_the_wrapper_is(make_lock):
    lock = make_lock()
    inner = lock._inner
    with lock:
        assert in_thread(lambda: inner.acquire(False)) is False
    # The wrapper's users stay excluded while someone holds the inner lock directly
    # (a thread that stays alive: a re-entrant lock would recognise a reused ident).
    taken, checked = threading.Event(), threading.Event()

    def hold_inner():
        assert inner.acquire(False)
        taken.set()
        checked.wait(10)
        inner.release()

    holder = threading.Thread(target=hold_inner)
    holder.start()
    assert taken.wait(10)
    try:
        assert in_thread(lambda: lock.acquire(blocking=False)) is False
    finally:
        checked.set()
        holder.join(10)
    assert in_thread(lambda: lock.acquire(blocking=False) and (lock.release() or True)) is True


def test_non_blocking_and_timeout(make_lock):
    lock = make_lock()
    lock.acquire()
    assert in_thread(lambda: lock.acquire(blocking=False)) is False
    start = time.monotonic()
    assert in_thread(lambda: lock.acquire(timeout=0.2)) is False
    assert time.monotonic() - start >= 0.2
    lock.release()
    assert in_thread(lambda: lock.acquire(timeout=0.2) and (lock.release() or True)) is True


@pytest.mark.parametrize("args", [(False, 1), (True, -2)])
def test_bad_arguments_like_rlock(make_lock, args):
    with pytest.raises(ValueError) as expected:
        threading.RLock().acquire(*args)
    with pytest.raises(ValueError) as got:
        make_lock().acquire(*args)
    assert str(got.value) == str(expected.value)


def test_release_by_non_owner_and_unheld(make_lock):
    lock = make_lock()
    with pytest.raises(RuntimeError):
        lock.release()
    lock.acquire()
    with pytest.raises(RuntimeError):
        in_thread(lock.release)
    assert lock.locked()
    lock.release()


def test_exception_inside_with_releases(make_lock):
    lock = make_lock()
    with pytest.raises(KeyError):
        with lock:
            with lock:
                raise KeyError("boom")
    assert not lock.locked()
    assert in_thread(lambda: lock.acquire(blocking=False) and (lock.release() or True)) is True


def test_many_threads_mutual_exclusion(make_lock):
    lock = make_lock()
    counter = {"value": 0, "inside": 0, "overlap": 0}

    def work():
        for _ in range(2000):
            with lock:
                counter["inside"] += 1
                if counter["inside"] != 1:
                    counter["overlap"] += 1
                value = counter["value"]
                counter["value"] = value + 1
                counter["inside"] -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert counter == {"value": 16000, "inside": 0, "overlap": 0}
    assert lock.stats.acquisitions == 16000


def test_condition_wait_notify(make_lock):
    lock = make_lock()
    condition = threading.Condition(lock)
    ready = []

    def consumer():
        with condition:
            with condition:  # re-entered: wait() must release every level
                assert condition.wait_for(lambda: ready, timeout=5)
                return lock._count

    thread_result = {}
    thread = threading.Thread(target=lambda: thread_result.setdefault("depth", consumer()))
    thread.start()
    time.sleep(0.1)
    with condition:
        ready.append(1)
        condition.notify_all()
    thread.join(10)
    assert thread_result["depth"] == 2
    assert not lock.locked()


# -- property: the same answers as threading.RLock ---------------------------

OPERATIONS = st.lists(
    st.sampled_from(["acquire", "try", "timeout", "release", "other_try", "other_release"]),
    max_size=40,
)


def apply(lock, operations):
    """Results of each operation on ``lock``; the other thread only tries and releases."""
    out = []
    for op in operations:
        try:
            if op == "acquire":
                out.append(lock.acquire())
            elif op == "try":
                out.append(lock.acquire(blocking=False))
            elif op == "timeout":
                out.append(lock.acquire(timeout=0.001))
            elif op == "release":
                lock.release()
                out.append(None)
            elif op == "other_try":
                # The other thread lets go at once if it got the lock.
                out.append(in_thread(lambda: lock.acquire(blocking=False) and (lock.release() or True)))
            elif op == "other_release":
                in_thread(lock.release)
                out.append(None)
        except RuntimeError:
            out.append("RuntimeError")
    held = 0
    while True:
        try:
            lock.release()
            held += 1
        except RuntimeError:
            break
    out.append(("held at end", held))
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=OPERATIONS, inner=st.sampled_from(sorted(INNER)), impl=st.sampled_from(sorted(IMPLEMENTATIONS)))
def test_same_results_as_rlock(operations, inner, impl):
    expected = apply(threading.RLock(), operations)
    assert apply(IMPLEMENTATIONS[impl]("test.property", INNER[inner]()), operations) == expected


def test_compiled_implementation_is_built_and_active():
    import os

    import h5watch

    if os.environ.get("H5WATCH_EXPECT_IMPLEMENTATION"):
        assert h5watch.snapshot()["implementation"] == os.environ["H5WATCH_EXPECT_IMPLEMENTATION"]
    else:
        pytest.skip("H5WATCH_EXPECT_IMPLEMENTATION not set")
