"""CPython's own RLock conformance tests run against ``WatchedLock``.

``test.lock_tests.RLockTests`` (the standard library's test package; what it
checks differs between Python versions) runs here on whichever implementation
is active (``H5WATCH_IMPLEMENTATION=python`` selects the pure-Python one), in
two forms: a fresh ``WatchedLock(name)``, and one wrapping h5py's FastRLock.
Beyond what those check: the repr has exactly RLock's form (plus the lock's
name), and odd ``acquire`` arguments get exactly what RLock gives them.
"""

from __future__ import annotations

import math
import os
import threading

import h5py
import pytest

import h5watch
from h5watch.process.lock import CompiledWatchedLock, PythonWatchedLock

pytestmark = pytest.mark.timeout(120)

lock_tests = pytest.importorskip(
    "test.lock_tests", reason="this interpreter has no test.lock_tests (the standard library's test package)"
)


def _fastrlock_type() -> type:
    """h5py's FastRLock class, even where h5watch has wrapped ``h5py._objects.phil``."""
    try:
        from h5py._locks import FastRLock  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        return FastRLock
    phil = h5py._objects.phil
    if type(phil).__name__ != "FastRLock":
        phil = phil._inner
    assert type(phil).__name__ == "FastRLock", type(phil)
    return type(phil)


FastRLock = _fastrlock_type()


def test_implementation_under_test():
    """The tests below exercise the implementation the environment asks for."""
    expected = os.environ.get("H5WATCH_EXPECT_IMPLEMENTATION")
    if not expected:
        pytest.skip("H5WATCH_EXPECT_IMPLEMENTATION not set")
    classes = {"python": PythonWatchedLock, "compiled": CompiledWatchedLock}
    assert h5watch.WatchedLock is classes[expected]


FORMS = {
    "own": lambda: h5watch.WatchedLock("test.parity.own"),
    "fastrlock": lambda: h5watch.WatchedLock("test.parity.fastrlock", lock=FastRLock()),
}


@pytest.mark.parametrize("form", sorted(FORMS))
def test_repr_has_the_form_of_rlocks(form):
    """``threading.RLock``'s repr on this Python, with the lock's name after the type."""
    lock, rlock = FORMS[form](), threading.RLock()

    def expected() -> str:
        rlock_type = f"{type(rlock).__module__}.{type(rlock).__qualname__}"
        text = repr(rlock).replace(f" {rlock_type} object ", f" h5watch.WatchedLock object {lock.name!r} ")
        return text.replace(f" at {hex(id(rlock))}>", f" at {hex(id(lock))}>")

    assert repr(lock) == expected()
    for _ in range(2):
        lock.acquire()
        rlock.acquire()
        assert repr(lock) == expected()
    for _ in range(2):
        lock.release()
        rlock.release()
    assert repr(lock) == expected()


# Arguments threading.RLock().acquire rejects or takes unusually, by version.
ODD_ARGUMENTS = [
    ((False, 1), {}),
    ((False,), {"timeout": 0}),
    ((False,), {"timeout": -2}),
    ((False,), {"timeout": math.nan}),
    ((), {"timeout": -100}),
    ((), {"timeout": -1.5}),
    ((), {"timeout": -math.inf}),
    ((), {"timeout": math.nan}),
    ((), {"timeout": math.inf}),
    ((), {"timeout": 1e100}),
    ((), {"timeout": threading.TIMEOUT_MAX + 1}),
    ((), {"timeout": math.nextafter(threading.TIMEOUT_MAX, math.inf)}),
    ((), {"timeout": 10**10}),
    ((), {"timeout": 2**63}),
    ((), {"timeout": 10**400}),
    ((), {"timeout": None}),
    ((), {"timeout": "1"}),
    ((), {"timeout": True}),
    ((None,), {}),
    ((0,), {}),
    ((2,), {"timeout": 0.01}),
    ((), {"timeout": -1.0}),
    ((False,), {"timeout": -1.0}),
]


def _outcome(lock, args, kwargs):
    try:
        acquired = lock.acquire(*args, **kwargs)
    except Exception as exc:
        return type(exc), str(exc)
    if acquired:
        lock.release()
    return acquired


@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("args,kwargs", ODD_ARGUMENTS, ids=repr)
def test_acquire_arguments_as_rlock(form, args, kwargs):
    """Whatever ``threading.RLock().acquire`` raises on this Python (type and
    message), or takes and returns, for arguments that are not plainly valid."""
    assert _outcome(FORMS[form](), args, kwargs) == _outcome(threading.RLock(), args, kwargs)


class TestRLockParityOwnLock(lock_tests.RLockTests):
    """``WatchedLock(name)``: its own inner lock."""

    locktype = staticmethod(FORMS["own"])


class TestRLockParityFastRLock(lock_tests.RLockTests):
    """``WatchedLock(name, lock=FastRLock())``: wrapping h5py's lock type."""

    locktype = staticmethod(FORMS["fastrlock"])
