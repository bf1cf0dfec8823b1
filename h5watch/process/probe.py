"""Read (and, in a forked child, reset) h5py's ``FastRLock`` through its layout.

``FastRLock`` (h5py/_locks.pxi) is a Cython class. On 64-bit CPython its
instance is 48 bytes: the object header (16), ``PyThread_type_lock
_real_lock`` (8), ``long _owner`` (8, -1 when free), then ``int _count``,
``int _pending_requests`` and ``bint _is_locked`` (4 each). Reading those
with ctypes costs h5py's hot path nothing and shows the true owner even of
holds taken by C code that no Python wrapper sees.

The layout is an assumption about someone else's build, so it is checked
before use: the type's basic size, then a fresh instance read while free,
while held by a helper thread, and re-entered. Any mismatch turns the probe
off with the reason; nothing else depends on it.
"""

from __future__ import annotations

import ctypes
import struct
import sys
import threading
from typing import Any

__all__ = ["FastRLockProbe", "ProbeUnavailable"]

_OWNER_FREE = -1
# No thread ident is -2 (idents are addresses): marks a holder that died in a fork.
_DEAD_OWNER = -2
_LAYOUT = {"real_lock": 16, "owner": 24, "count": 32, "pending": 36, "is_locked": 40}
_BASICSIZE = 48


class ProbeUnavailable(Exception):
    """The probe cannot be trusted on this build; the message says why."""


def _read_long(address: int) -> int:
    return ctypes.c_long.from_address(address).value


def _read_int(address: int) -> int:
    return ctypes.c_int.from_address(address).value


def _as_ident(owner: int) -> int | None:
    """``_owner`` is a C long; thread idents are unsigned longs."""
    if owner == _OWNER_FREE:
        return None
    return owner & ((1 << (8 * ctypes.sizeof(ctypes.c_long))) - 1)


class FastRLockProbe:
    """A validated view into one ``FastRLock`` instance."""

    def __init__(self, lock: Any) -> None:
        self._lock = lock
        self._address = id(lock)
        validate_layout(type(lock))

    def read(self) -> dict[str, Any]:
        base = self._address
        return {
            "owner_ident": _as_ident(_read_long(base + _LAYOUT["owner"])),
            "count": _read_int(base + _LAYOUT["count"]),
            "pending_requests": _read_int(base + _LAYOUT["pending"]),
            "is_locked": bool(_read_int(base + _LAYOUT["is_locked"])),
        }

    def poison_dead_owner(self, alive_ident: int) -> bool:
        """Make a dead owner's ident unmatchable; True if there was one.

        A thread started later in the child can be given the dead holder's
        ident (pthread ids are addresses, and the dead thread's are free for
        reuse); FastRLock would then let it "re-enter" a lock it never took.
        """
        base = self._address
        owner = _read_long(base + _LAYOUT["owner"])
        if owner == _OWNER_FREE or _as_ident(owner) == alive_ident:
            return False
        ctypes.c_long.from_address(base + _LAYOUT["owner"]).value = _DEAD_OWNER
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
        base = self._address
        ctypes.c_void_p.from_address(base + _LAYOUT["real_lock"]).value = fresh
        ctypes.c_long.from_address(base + _LAYOUT["owner"]).value = _OWNER_FREE
        ctypes.c_int.from_address(base + _LAYOUT["count"]).value = 0
        ctypes.c_int.from_address(base + _LAYOUT["pending"]).value = 0
        ctypes.c_int.from_address(base + _LAYOUT["is_locked"]).value = 0


def validate_layout(lock_type: type) -> None:
    if getattr(sys, "_is_gil_enabled", lambda: True)() is False:
        raise ProbeUnavailable("free-threaded Python: h5py's phil is not a FastRLock there")
    if struct.calcsize("P") != 8 or ctypes.sizeof(ctypes.c_long) != 8:
        raise ProbeUnavailable("not a 64-bit build with 8-byte C long")
    if lock_type.__name__ != "FastRLock":
        raise ProbeUnavailable(f"lock type is {lock_type.__module__}.{lock_type.__qualname__}, not FastRLock")
    if lock_type.__basicsize__ != _BASICSIZE:
        raise ProbeUnavailable(f"FastRLock basicsize is {lock_type.__basicsize__}, expected {_BASICSIZE}")
    _check_with_helper_thread(lock_type)


def _check_with_helper_thread(lock_type: type) -> None:
    specimen = lock_type()
    base = id(specimen)

    def view() -> tuple[int | None, int, int, int]:
        return (
            _as_ident(_read_long(base + _LAYOUT["owner"])),
            _read_int(base + _LAYOUT["count"]),
            _read_int(base + _LAYOUT["pending"]),
            _read_int(base + _LAYOUT["is_locked"]),
        )

    if view() != (None, 0, 0, 0):
        raise ProbeUnavailable(f"a free FastRLock reads as {view()}, expected (None, 0, 0, 0)")
    acquired = threading.Event()
    release = threading.Event()
    seen: dict[str, Any] = {}

    def hold() -> None:
        specimen.acquire()
        specimen.acquire()
        seen["ident"] = threading.get_ident()
        acquired.set()
        release.wait(5)
        specimen.release()
        specimen.release()

    helper = threading.Thread(target=hold, name="h5watch-probe-check", daemon=True)
    helper.start()
    try:
        if not acquired.wait(5):
            raise ProbeUnavailable("helper thread did not acquire the specimen lock")
        held = view()
        if held[0] != seen["ident"] or held[1] != 2:
            raise ProbeUnavailable(
                f"a FastRLock held twice by thread {seen['ident']} reads as owner={held[0]} count={held[1]}"
            )
    finally:
        release.set()
        helper.join(5)
    if view() != (None, 0, 0, 0):
        raise ProbeUnavailable(f"a released FastRLock reads as {view()}, expected (None, 0, 0, 0)")
