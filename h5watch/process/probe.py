"""Read (and, in a forked child, reset) h5py's ``FastRLock`` through its layout.

``FastRLock`` (h5py/_locks.pxi) is a Cython class; :class:`FastRLockFields`
below is its instance layout, declared as the Cython source declares it
(the compiled core's ``FastRLockLayout`` is the same struct, and exports
its offsets so that a test and the core's loader can compare). Reading those
fields with ctypes costs h5py's hot path nothing and shows the true owner
even of holds taken by C code that no Python wrapper sees.

The layout is an assumption about someone else's build, so it is checked
before use: the type's basic size, then a fresh instance read while free
and while held twice by the checking thread (no thread is started for it:
a thread's start costs a process up to milliseconds). Any mismatch turns the probe
off with the reason; nothing else depends on it.
"""

from __future__ import annotations

import ctypes
import struct
import sys
import threading
from typing import Any

from h5watch.schema import DEAD_OWNER

__all__ = ["FastRLockFields", "FastRLockProbe", "ProbeUnavailable", "fastrlock_layout", "validate_layout"]

_OWNER_FREE = -1


class FastRLockFields(ctypes.Structure):
    """``cdef class FastRLock`` in h5py/_locks.pxi, after the object header."""

    _fields_ = [
        ("ob_refcnt", ctypes.c_ssize_t),  # PyObject_HEAD
        ("ob_type", ctypes.c_void_p),
        ("_real_lock", ctypes.c_void_p),  # cdef pythread.PyThread_type_lock _real_lock
        ("_owner", ctypes.c_long),  # cdef long _owner (-1 when free)
        ("_count", ctypes.c_int),  # cdef int _count
        ("_pending_requests", ctypes.c_int),  # cdef int _pending_requests
        ("_is_locked", ctypes.c_int),  # cdef bint _is_locked
    ]


def fastrlock_layout() -> tuple[int, ...]:
    """(size, then the offsets of _real_lock, _owner, _count,
    _pending_requests, _is_locked): the form ``_lockcore.FASTRLOCK_LAYOUT`` has."""
    fields = FastRLockFields
    return (
        ctypes.sizeof(fields),
        fields._real_lock.offset,
        fields._owner.offset,
        fields._count.offset,
        fields._pending_requests.offset,
        fields._is_locked.offset,
    )


class ProbeUnavailable(Exception):
    """The probe cannot be trusted on this build; the message says why."""


def _as_ident(owner: int) -> int | None:
    """``_owner`` is a C long; thread idents are unsigned longs."""
    if owner == _OWNER_FREE:
        return None
    return owner & ((1 << (8 * ctypes.sizeof(ctypes.c_long))) - 1)


class FastRLockProbe:
    """A validated view into one ``FastRLock`` instance."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        validate_layout(type(lock))
        self._fields = FastRLockFields.from_address(id(lock))

    def read(self) -> dict[str, Any]:
        fields = self._fields
        return {
            "owner_ident": _as_ident(fields._owner),
            "count": fields._count,
            "pending_requests": fields._pending_requests,
            "is_locked": bool(fields._is_locked),
        }

    def poison_dead_owner(self, alive_ident: int) -> bool:
        """Make a dead owner's ident unmatchable; True if there was one.

        A thread started later in the child can be given the dead holder's
        ident (pthread ids are addresses, and the dead thread's are free for
        reuse); FastRLock would then let it "re-enter" a lock it never took.
        """
        fields = self._fields
        owner = fields._owner
        if owner == _OWNER_FREE or _as_ident(owner) == alive_ident:
            return False
        fields._owner = DEAD_OWNER
        return True

    def reset(self) -> None:
        """Make the lock free with a fresh underlying OS lock.

        Only for a forked child whose holder thread no longer exists: the old
        ``_real_lock`` may be locked forever, so it is abandoned (leaked on
        purpose: freeing a locked lock is undefined) and replaced.
        """
        allocate = ctypes.pythonapi.PyThread_allocate_lock
        allocate.restype = ctypes.c_void_p
        allocate.argtypes = []
        fresh = allocate()
        if not fresh:
            raise MemoryError("PyThread_allocate_lock failed")
        fields = self._fields
        fields._real_lock = fresh
        fields._owner = _OWNER_FREE
        fields._count = 0
        fields._pending_requests = 0
        fields._is_locked = 0


# Each FastRLock type's verdict, once checked: None (valid) or why not. The
# lock core and the probe check the same type.
_verdicts: dict[type, ProbeUnavailable | None] = {}


def validate_layout(lock_type: type) -> None:
    """Raise ``ProbeUnavailable`` unless instances of ``lock_type`` can be read
    (and, for a forked child's reset, written) through ``FastRLockFields``."""
    if lock_type in _verdicts:
        verdict = _verdicts[lock_type]
        if verdict is not None:
            raise ProbeUnavailable(str(verdict))
        return
    try:
        _validate_layout(lock_type)
    except ProbeUnavailable as exc:
        _verdicts[lock_type] = exc
        raise
    _verdicts[lock_type] = None


def _validate_layout(lock_type: type) -> None:
    if getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        raise ProbeUnavailable("free-threaded Python: h5py's phil is not a FastRLock there")
    if struct.calcsize("P") != 8 or ctypes.sizeof(ctypes.c_long) != 8:
        raise ProbeUnavailable("not a 64-bit build with 8-byte C long")
    if lock_type.__name__ != "FastRLock":
        raise ProbeUnavailable(f"lock type is {lock_type.__module__}.{lock_type.__qualname__}, not FastRLock")
    if lock_type.__basicsize__ != ctypes.sizeof(FastRLockFields):
        raise ProbeUnavailable(f"FastRLock basicsize is {lock_type.__basicsize__}, expected {ctypes.sizeof(FastRLockFields)}")
    _check_held_twice(lock_type)


def _check_held_twice(lock_type: type) -> None:
    specimen = lock_type()
    fields = FastRLockFields.from_address(id(specimen))

    def view() -> tuple[int | None, int, int, int]:
        return (_as_ident(fields._owner), fields._count, fields._pending_requests, fields._is_locked)

    if view() != (None, 0, 0, 0):
        raise ProbeUnavailable(f"a free FastRLock reads as {view()}, expected (None, 0, 0, 0)")
    me = threading.get_ident()
    specimen.acquire()
    specimen.acquire()
    try:
        held = view()
    finally:
        specimen.release()
        specimen.release()
    if held[0] != me or held[1] != 2:
        raise ProbeUnavailable(f"a FastRLock held twice by thread {me} reads as owner={held[0]} count={held[1]}")
    if view() != (None, 0, 0, 0):
        raise ProbeUnavailable(f"a released FastRLock reads as {view()}, expected (None, 0, 0, 0)")
