"""``WatchedLock``: a re-entrant lock that records who holds it and who waits.

The wrapper holds an inner lock (a fresh ``_thread.lock``, or the lock it
was given: ``threading.Lock``, ``threading.RLock`` or h5py's ``FastRLock``)
for exactly as long as it is held itself, so code that takes the inner lock
directly stays mutually exclusive with the wrapper's users.

Hot path (an acquisition nobody else contends): one thread-ident read, one
non-blocking acquire of the inner lock, one clock read, a few slot writes.
Re-entry bumps two counters. Everything else (waiters, timeouts, orphans,
fork detection) lives on the slow path, reached only when the non-blocking
acquire fails.

Ownership of fields: ``_owner``, ``_count``, ``_since_ns``, ``_operation``
and the hold/wait/acquisition statistics are written only by the thread that
holds the inner lock. ``_waiters`` is a dict each waiting thread adds itself
to and removes itself from, through ``_wait_begin`` and ``_wait_end`` (each
atomic under the GIL; the compiled core keeps the waiters' count and start
times with the dict, so that a release charges the waits of its hold in
constant time). Readers on other threads (snapshots, the watchdog) may see a value a
moment old, never a half-written one.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import weakref
from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from h5watch.process import implementation, lock_order
from h5watch.process.stats import CoreLockStats, LockStats, OperationTable
from h5watch.records import Holder, Waiter
from h5watch.schema import (
    BUCKET_BOUNDS_NS,
    C_ACQUISITIONS,
    C_HOLD_BUCKETS,
    C_HOLD_MAX,
    C_HOLD_SUM,
    C_REENTRIES,
    DEAD_OWNER,
    N_OPERATION_WORDS,
    O_CAUSED_WAIT_SUM,
    O_HOLD_MAX,
    O_HOLD_SUM,
    O_HOLDS,
    O_WAIT_SUM,
    O_WAITS,
)

__all__ = [
    "WatchedLock",
    "PythonWatchedLock",
    "CompiledWatchedLock",
    "IMPLEMENTATION",
    "IMPLEMENTATION_REASON",
    "EXTENSION_MISSING",
    "DeadlockError",
    "LockTimeout",
    "OrphanedLockError",
    "interrupt_wait",
    "watched_locks",
    "thread_identity",
    "thread_label",
    "LockEvents",
    "connect",
    "wiring",
]

_get_ident = threading.get_ident
_TIMEOUT_MAX = threading.TIMEOUT_MAX
# acquire's default timeout (in CPython also the object a caller's -1 is; any
# other -1 goes through the check, which accepts it) and the timeout types it
# takes without asking threading.RLock about them.
_DEFAULT_TIMEOUT = -1
_PLAIN_TIMEOUT_TYPES = (float, int)
_monotonic_ns = time.monotonic_ns
# This thread's outermost holds, for lock-order checking (the pure-Python
# lock's; the compiled core keeps its own).
_held = lock_order.held


class LockTimeout(TimeoutError):
    """A wait for a watched lock exceeded ``wait_timeout`` (``on_timeout=raise``)."""

    def __init__(self, message: str, evidence: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.evidence = evidence or {}


class DeadlockError(RuntimeError):
    """This thread's wait for a watched lock closed a deadlock, and was
    interrupted to break it (``on_deadlock=raise``); ``evidence`` is the
    ``lock.deadlock`` event's cycle."""

    def __init__(self, message: str, evidence: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.evidence = evidence or {}


class OrphanedLockError(RuntimeError):
    """The lock is held by a thread that did not survive a fork (``on_orphan=raise``)."""

    def __init__(self, message: str, evidence: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.evidence = evidence or {}


if TYPE_CHECKING:  # interfaces for the type checker only: each Protocol class made costs start-up about 0.05 ms
    class LockEvents(Protocol):
        """What a lock's slow path tells the rest of h5watch (``install()`` connects
        one, see ``connect``). Every call is on the thread that is about to wait,
        or that made the lock."""

        def pid_changed(self) -> None:
            """``os.getpid()`` differs from the pid this process last knew: a fork
            that skipped Python's at-fork hooks. Must find and handle orphans."""

        def orphan_wait(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
            """About to wait on a lock known to be orphaned: may raise, exit, or
            return to let the wait go on."""

        def wait_started(self, lock: WatchedLock) -> None:
            """About to block on ``lock``."""

        def wait_timed_out(self, lock: WatchedLock, waited_ns: int) -> None:
            """Just before ``LockTimeout`` is raised (``on_timeout=raise``)."""

        def lock_created(self, lock: WatchedLock) -> None:
            """A new watched lock (the state file gives it its record at once)."""

        def long_wait(self, lock: WatchedLock, waited_ns: int, behind: str | None) -> None:
            """A blocked wait of at least ``record_after_ns`` (see ``connect``) just
            ended, acquired or not; ``behind``: who held the lock when it began."""

        def long_hold(self, lock: WatchedLock, held_ns: int, operation: str | None) -> None:
            """A hold of at least ``record_after_ns`` just ended (the lock is free
            again); on the thread that held it."""


class _Wiring:
    """What the slow path consults: this process's pid, the deadline of
    ``on_timeout=raise``, and the connected ``LockEvents`` (None: nobody listens)."""

    def __init__(self) -> None:
        # Tells the compiled core which pid to record as the holder's.
        self.pid_sink: Callable[[int], None] | None = None
        self._pid = os.getpid()
        self.raise_after_ns: int | None = None
        self.events: LockEvents | None = None
        # on_deadlock=raise: blocking waits wait in slices and look for an
        # interruption between them; {thread ident: (its wait's start ns, error)}.
        self.interruptible = False
        self.interrupts: dict[int, tuple[int, DeadlockError]] = {}

    @property
    def pid(self) -> int:
        return self._pid

    @pid.setter
    def pid(self, value: int) -> None:
        self._pid = value
        if self.pid_sink is not None:
            self.pid_sink(value)


wiring = _Wiring()


# Waits and holds at least this long are told to LockEvents (long_wait,
# long_hold): the release step's one comparison. Never, until connected.
_NEVER_NS = (1 << 63) - 1
_record_after_ns = _NEVER_NS


def connect(events: LockEvents | None, raise_after_ns: int | None = None, interruptible: bool = False,
            record_after_ns: int | None = None) -> None:
    """Connect the slow path to h5watch's parts (``install()``), or disconnect
    it. ``record_after_ns``: waits and holds this long or longer are told to
    ``events`` (None: none are)."""
    global _record_after_ns
    wiring.raise_after_ns = raise_after_ns
    wiring.interruptible = interruptible
    wiring.events = events
    if not interruptible:
        wiring.interrupts.clear()
    _record_after_ns = _NEVER_NS if events is None or record_after_ns is None else max(0, record_after_ns)
    if _lockcore is not None:
        _lockcore.set_hold_recorder(_record_after_ns, _long_hold if _record_after_ns != _NEVER_NS else None)


def _long_hold(lock: WatchedLock, held_ns: int, operation: str | None) -> None:
    """A hold at least ``_record_after_ns`` long ended (both implementations'
    release step call this, after the lock is free)."""
    events = wiring.events
    if events is not None:
        try:
            events.long_hold(lock, held_ns, operation)
        except Exception:  # never an error in the program's release
            pass


# How often an interruptible wait looks for its interruption.
_INTERRUPT_SLICE_NS = 50_000_000


def interrupt_wait(ident: int, wait_started_ns: int, error: DeadlockError) -> None:
    """Make thread ``ident``'s wait that began at ``wait_started_ns`` raise
    ``error`` (an interruptible wait only; a later wait is not affected)."""
    wiring.interrupts[ident] = (wait_started_ns, error)

# h5py's lock, the one a fork's hook takes first.
PHIL_NAME = "h5py.phil"
_registry_lock = threading.Lock()
_registry: list[weakref.ReferenceType[_LockLogic]] = []
# Dead references are dropped when the list reaches this length, which then
# doubles the live count: registering N locks costs O(N) in all.
_registry_compact_at = 64
_sequence = itertools.count()


def watched_locks() -> list[WatchedLock]:
    """Every live watched lock, ``h5py.phil`` first, then in creation order
    (the registry is kept in that order: a fork's hook reads it as it is)."""
    # The copy is one C call under the GIL: no lock is needed to read.
    locks = [lock for lock in (ref() for ref in _registry[:]) if lock is not None]
    return cast("list[WatchedLock]", locks)  # every _LockLogic is one of the two implementations


def _register(lock: _LockLogic) -> None:
    global _registry_compact_at
    ref = weakref.ref(lock)
    with _registry_lock:
        if len(_registry) >= _registry_compact_at:
            _registry[:] = [entry for entry in _registry if entry() is not None]
            _registry_compact_at = max(64, 2 * len(_registry))
        if lock.name == PHIL_NAME:
            _registry.insert(_phil_count(), ref)
        else:
            _registry.append(ref)


def _phil_count() -> int:
    """How many of the registry's first entries are ``h5py.phil`` locks."""
    for index, ref in enumerate(_registry):
        lock = ref()
        if lock is None or lock.name != PHIL_NAME:
            return index
    return len(_registry)


def reinit_registry_after_fork() -> None:
    global _registry_lock
    _registry_lock = threading.Lock()


def thread_identity(ident: int | None) -> dict[str, Any]:
    """Name and native id of a thread of this process, from its ident."""
    thread = threading._active.get(ident) if ident is not None else None  # type: ignore[attr-defined]
    if thread is None:
        return {"thread_ident": ident, "thread_name": None, "native_id": None}
    return {"thread_ident": ident, "thread_name": thread.name, "native_id": getattr(thread, "native_id", None)}


def thread_label(ident: int) -> str:
    """A thread's name, else "thread <ident>"."""
    name = thread_identity(ident)["thread_name"]
    return name if name is not None else f"thread {ident}"


class ForkGate:
    """Holds back new acquisitions while a fork's before-hook takes the locks.

    Without it the forking thread, polling or queueing for a busy lock, loses
    to threads that barge in as soon as the lock is free. With the gate up, a
    thread that holds no watched lock waits at the gate instead of taking the
    lock; threads that already hold a watched lock pass (they must be able to
    finish and release, or the fork would wait for itself). The fork lowers
    the gate as soon as it has the locks, or after a short while.

    A fork's gate is its own (a thread can still be passing the last one):
    the forking thread holds ``_closed`` while it is up, and a thread at the
    gate passes by taking and giving it back.
    """

    __slots__ = ("forking_thread", "_up", "_closed")

    def __init__(self, forking_thread: int) -> None:
        self.forking_thread = forking_thread
        self._closed = threading.Lock()
        self._closed.acquire()
        self._up = True

    def lets_through(self, me: int) -> bool:
        if me == self.forking_thread or not self._up:
            return True
        return any(lock._owner == me for lock in watched_locks())

    def wait(self, timeout: float | None) -> bool:
        if not self._closed.acquire(timeout=-1 if timeout is None else min(timeout, threading.TIMEOUT_MAX)):
            return False
        self._closed.release()
        return True

    def open(self) -> None:
        """Lower the gate (the forking thread only; again is a no-op)."""
        if self._up:
            self._up = False
            self._closed.release()


def _inner_kind(lock: Any) -> str:
    type_name = type(lock).__name__
    if type_name == "FastRLock":
        return "fastrlock"
    if isinstance(lock, type(threading.Lock())):
        return "lock"
    return "rlock"


class _LockLogic:
    """What both implementations share: waiting, fork support, reading.

    The hot path (acquire, acquire_for, release, the context manager) is
    :class:`PythonWatchedLock`'s or the compiled ``_lockcore.LockCore``'s.
    """

    if TYPE_CHECKING:
        # What each implementation provides (PythonWatchedLock's slots, or
        # LockCore's fields and methods).
        name: str
        stats: LockStats | CoreLockStats
        operations: OperationTable
        _inner: Any
        _inner_kind: str
        _inner_timed: bool
        _inner_acquire: Callable[..., bool]
        _inner_release: Callable[[], None]
        _owner: int | None
        _owner_pid: int
        _count: int
        _since_ns: int
        _operation: str | None
        _waiters: dict[int, int]
        _fork_gate: ForkGate | None
        _orphan: dict[str, Any] | None
        _seq: int
        _order_class: int
        _order_tracked: bool
        _order_seen_from: int

        def acquire_for(self, operation: str | None = None) -> bool: ...
        def release(self) -> None: ...
        def _take_for_fork(self, operation: str) -> None: ...
        def _set_gated(self, gated: bool) -> None: ...
        def _use_operations(self, table: OperationTable) -> None: ...
        def _operation_word_list(self) -> list[int]: ...
        def _wait_begin(self, me: int) -> int: ...
        def _wait_end(self, me: int) -> None: ...
        def _clear_waiters(self) -> None: ...
    else:
        __slots__ = ()

    def _init_common(self, name: str, inner: Any) -> None:
        if not isinstance(name, str) or not name:
            raise ValueError("WatchedLock name: expected a non-empty string")
        self.name = name
        self._inner = inner
        self._inner_kind = _inner_kind(inner)
        # FastRLock.acquire takes no timeout: timed waits on it poll.
        self._inner_timed = self._inner_kind != "fastrlock"
        self._fork_gate: ForkGate | None = None
        self._orphan: dict[str, Any] | None = None
        self._seq = next(_sequence)
        self._order_class = lock_order.class_of(name)
        self.operations = OperationTable(name)
        self._use_operations(self.operations)
        _register(self)
        events = wiring.events
        if events is not None:
            events.lock_created(cast("WatchedLock", self))

    def __repr__(self) -> str:
        # threading.RLock's form, with the lock's name after the type.
        owner = self._owner
        state = "locked" if self.locked() else "unlocked"
        return (
            f"<{state} h5watch.WatchedLock object {self.name!r} owner={0 if owner is None else owner} "
            f"count={self._count} at {hex(id(self))}>"
        )

    def locked(self) -> bool:
        if self._owner is not None:
            return True
        inner_locked = getattr(self._inner, "locked", None)
        if inner_locked is not None:
            return bool(inner_locked())
        return False

    def _check_acquire_args(self, blocking: Any, timeout: Any) -> tuple[bool, float]:
        """Raise what ``threading.RLock().acquire(blocking, timeout)`` raises
        (its messages differ between Python versions) by asking a fresh one;
        reached only for arguments that are not plainly valid (blocking not a
        bool, or timeout not a float or int that is -1 or, blocking, within
        [0, TIMEOUT_MAX]). Returns them as ``acquire`` uses them, if accepted."""
        specimen = threading.RLock()
        if specimen.acquire(blocking, timeout):
            specimen.release()
        return bool(blocking), float(timeout)

    # threading.Condition support, as threading.RLock offers it.
    def _release_save(self) -> tuple[int, int | None, str | None]:
        if self._owner != _get_ident():
            raise RuntimeError("cannot release un-acquired lock")
        count, owner, operation = self._count, self._owner, self._operation
        self._count = 1
        self.release()
        return count, owner, operation

    def _acquire_restore(self, state: tuple[int, int | None, str | None]) -> None:
        count, _owner, operation = state
        self.acquire_for(operation)
        self._count = count

    # -- slow path ---------------------------------------------------------

    def _acquire_slow(self, me: int, timeout: float) -> bool:
        """Wait for the inner lock; True once it is ours.

        Reached when the inner lock was not free, or when a fork gate is up
        (then the inner lock was not tried: a gated thread must not barge).
        """
        events = wiring.events
        if os.getpid() != wiring.pid and events is not None:
            # A fork that skipped the at-fork hooks: find orphans first.
            events.pid_changed()
        if self._orphan is not None and events is not None:
            events.orphan_wait(cast("WatchedLock", self), self._orphan)
            if self._orphan is None and self._inner_acquire(False):
                # Recovered: the lock is free again.
                self.stats.record_wait(0)
                return True
        start_ns = self._wait_begin(me)
        owner = self._owner
        # Who the wait is behind, named now: by its end that thread may be gone.
        behind = (owner, threading._active.get(owner) if owner is not None else None,  # type: ignore[attr-defined]
                  self._operation)
        try:
            if events is not None:
                events.wait_started(cast("WatchedLock", self))
            gate = self._fork_gate
            if gate is not None and not gate.lets_through(me):
                remaining = None if timeout < 0 else max(0.0, timeout - (_monotonic_ns() - start_ns) / 1e9)
                if not gate.wait(remaining):
                    return False
                if timeout >= 0:
                    timeout = max(0.0, timeout - (_monotonic_ns() - start_ns) / 1e9)
            acquired = self._inner_acquire(False) or self._wait_inner(timeout, start_ns)
        finally:
            self._wait_end(me)
            waited_ns = _monotonic_ns() - start_ns
            if waited_ns >= _record_after_ns and events is not None:
                self._tell_long_wait(events, waited_ns, behind)
        if acquired:
            self.stats.record_wait(waited_ns)
        return acquired

    def _tell_long_wait(self, events: LockEvents, waited_ns: int, behind: tuple[int | None, Any, str | None]) -> None:
        owner, thread, operation = behind
        who = None
        if owner is not None:
            who = f"behind {thread.name!r}" if thread is not None else f"behind thread {owner}"
            if operation:
                who += f" in {operation}"
        try:
            events.long_wait(cast("WatchedLock", self), waited_ns, who)
        except Exception:  # never an error in the program's acquire
            pass

    def _wait_inner(self, timeout: float, start_ns: int) -> bool:
        raise_after_ns = wiring.raise_after_ns
        interruptible = wiring.interruptible
        if timeout < 0 and raise_after_ns is None and not interruptible:
            return self._inner_acquire(True)
        user_deadline = None if timeout < 0 else start_ns + int(timeout * 1e9)
        raise_deadline = None if raise_after_ns is None else start_ns + raise_after_ns
        deadlines = [d for d in (user_deadline, raise_deadline) if d is not None]
        if interruptible:
            acquired = self._wait_interruptibly(min(deadlines) if deadlines else None, start_ns)
            if acquired or not deadlines:
                return acquired
            deadline = min(deadlines)
        else:
            deadline = min(deadlines)
            acquired = self._wait_until(deadline)
        if acquired:
            return True
        if raise_deadline is not None and deadline == raise_deadline and (user_deadline is None or raise_deadline < user_deadline):
            waited_ns = _monotonic_ns() - start_ns
            events = wiring.events
            if events is not None:
                events.wait_timed_out(cast("WatchedLock", self), waited_ns)
            raise LockTimeout(
                f"waited {waited_ns / 1e9:.3f} s for lock {self.name!r} (wait_timeout)",
                self.evidence(),
            )
        return False

    def _wait_interruptibly(self, deadline_ns: int | None, start_ns: int) -> bool:
        """Wait in slices until ``deadline_ns`` (None: forever); between
        slices, raise the ``DeadlockError`` the deadlock detector left for
        this very wait (see ``interrupt_wait``)."""
        me = _get_ident()
        interrupts = wiring.interrupts
        while True:
            slice_end = _monotonic_ns() + _INTERRUPT_SLICE_NS
            if self._wait_until(slice_end if deadline_ns is None else min(slice_end, deadline_ns)):
                return True
            interruption = interrupts.get(me)
            if interruption is not None:
                del interrupts[me]
                if interruption[0] == start_ns:
                    raise interruption[1]
            if deadline_ns is not None and _monotonic_ns() >= deadline_ns:
                return False

    def _wait_until(self, deadline_ns: int) -> bool:
        if self._inner_timed:
            remaining = max(0, deadline_ns - _monotonic_ns()) / 1e9
            return self._inner_acquire(True, min(remaining, _TIMEOUT_MAX))
        if _timed_fastrlock is not None:
            # Queue on FastRLock's own real lock, as its blocking acquire does,
            # but with a deadline: fair to the threads already queued there.
            # None: not a FastRLock of the verified type.
            taken = _timed_fastrlock(self._inner, max(0, deadline_ns - _monotonic_ns()) / 1e9)
            if taken is not None:
                return taken
        # FastRLock of an unverified layout, or no compiled core: poll with a
        # short, growing sleep.
        delay = 50e-6
        while True:
            if self._inner_acquire(False):
                return True
            remaining = deadline_ns - _monotonic_ns()
            if remaining <= 0:
                return False
            time.sleep(min(delay, remaining / 1e9))
            delay = min(delay * 2, 1e-3)

    # -- fork support (used by h5watch.process.fork only) --------------------------

    def _acquire_for_fork(self, deadline_ns: int | None) -> bool:
        """Take the lock for the forking thread by ``deadline_ns`` (None: wait
        forever; 0: do not wait), never raising and passing any fork gate.

        Not counted as an acquisition, and its release records no hold: the
        fork's own hold is not the service's.
        """
        me = _get_ident()
        if self._owner == me:
            self._count += 1
            return True
        if not self._inner_acquire(False):
            if deadline_ns == 0:
                return False
            self._wait_begin(me)
            try:
                handoff = getattr(self, "_fork_wait_handoff", None)
                if deadline_ns is None:
                    acquired = self._inner_acquire(True)
                elif handoff is not None and self._fork_gate is not None:
                    # Compiled: the next release hands the lock over, ahead of
                    # the threads already queued for it.
                    acquired = handoff(max(0, deadline_ns - _monotonic_ns()) / 1e9)
                else:
                    acquired = self._wait_until(deadline_ns)
            finally:
                self._wait_end(me)
            if not acquired:
                return False
        self._take_for_fork("h5watch.fork.before_fork")
        return True

    def _release_for_fork(self) -> None:
        """Undo one ``_acquire_for_fork`` (in the parent, or in the child by
        the thread that forked): an uncounted hold records nothing."""
        self.release()

    def _restart_counters_after_fork(self) -> None:
        """A forked child counts from zero. A hold open now (the fork's own,
        or one the forking thread had taken before) was counted in the
        parent, so its release is not counted here (restart_counters in
        _lockcore.c marks it; the Python mirror overrides this)."""
        self.stats.reset_after_fork()

    def _raise_fork_gate(self, gate: ForkGate) -> None:
        self._fork_gate = gate
        self._set_gated(True)

    def _lower_fork_gate(self) -> None:
        self._set_gated(False)
        self._fork_gate = None

    def _owner_ident(self) -> int | None:
        """The holding thread's ident as recorded here, or None."""
        return self._owner

    def _mark_orphaned(self, evidence: dict[str, Any]) -> None:
        """The holder did not survive a fork: no later thread may match its
        ident, and a thread about to wait is told (``LockEvents.orphan_wait``)."""
        if self._owner is not None:
            self._owner = DEAD_OWNER
        self._orphan = evidence

    def _orphan_evidence(self) -> dict[str, Any] | None:
        """The evidence of the orphan this lock is, or None."""
        return self._orphan

    def _wait_starts(self) -> list[tuple[int, int]]:
        """(thread ident, monotonic ns the wait began) of every waiting thread."""
        return list(self._waiters.copy().items())

    def _force_reset(self) -> None:
        """Forget any holder and waiter; the caller re-creates the inner lock."""
        self._owner = None
        self._count = 0
        self._operation = None
        self._clear_waiters()
        self._orphan = None

    def _forget_other_threads(self) -> None:
        """In a forked child: waiters and gates belonged to threads that are gone."""
        self._clear_waiters()
        self._set_gated(False)
        self._fork_gate = None

    def _reinit_inner(self) -> bool:
        """Make a ``_thread.lock``/``RLock`` inner lock free again in a child."""
        reinit = getattr(self._inner, "_at_fork_reinit", None)
        if reinit is None:
            return False
        reinit()
        return True

    # -- reading -----------------------------------------------------------

    def _holder_record(self) -> Holder | None:
        owner = self._owner
        if owner is None:
            return None
        since_ns, pid, operation, depth = self._since_ns, self._owner_pid, self._operation, self._count
        thread = threading._active.get(owner)  # type: ignore[attr-defined]
        return Holder(pid, owner, thread.name if thread is not None else None, getattr(thread, "native_id", None),
                      operation, since_ns, depth)

    def _waiter_records(self) -> tuple[Waiter, ...]:
        """Oldest first."""
        waiters = []
        for ident, since_ns in sorted(self._waiters.copy().items(), key=lambda item: item[1]):
            thread = threading._active.get(ident)  # type: ignore[attr-defined]
            waiters.append(Waiter(ident, thread.name if thread is not None else None, getattr(thread, "native_id", None),
                                  since_ns))
        return tuple(waiters)

    def holder(self, now_ns: int | None = None) -> dict[str, Any] | None:
        record = self._holder_record()
        if record is None:
            return None
        since_ns = record.since_ns or 0
        now_ns = _monotonic_ns() if now_ns is None else now_ns
        return {
            "pid": record.pid,
            "thread_ident": record.thread_ident,
            "thread_name": record.thread_name,
            "native_id": record.native_id,
            "operation": record.operation,
            "since_ns": since_ns,
            "held_since_unix": time.time() - (now_ns - since_ns) / 1e9,
            "hold_age_seconds": max(0, now_ns - since_ns) / 1e9,
            "depth": record.depth,
        }

    def waiters(self, now_ns: int | None = None) -> list[dict[str, Any]]:
        now_ns = _monotonic_ns() if now_ns is None else now_ns
        return [
            {"thread_ident": w.thread_ident, "thread_name": w.thread_name, "native_id": w.native_id,
             "since_ns": w.since_ns, "wait_seconds": max(0, now_ns - w.since_ns) / 1e9}
            for w in self._waiter_records()
        ]

    def evidence(self) -> dict[str, Any]:
        now_ns = _monotonic_ns()
        return {"lock": self.name, "holder": self.holder(now_ns), "waiters": self.waiters(now_ns)}

    def snapshot(self, now_ns: int | None = None) -> dict[str, Any]:
        now_ns = _monotonic_ns() if now_ns is None else now_ns
        waiters = self.waiters(now_ns)
        return {
            "name": self.name,
            "inner": self._inner_kind,
            "stats": self.stats.snapshot(),
            # Contention by operation, the most held first.
            "operations": [row.to_plain() for row in self.operations.rows(self._operation_word_list())],
            "holder": self.holder(now_ns),
            "waiters": waiters,
            "oldest_wait_seconds": max((w["wait_seconds"] for w in waiters), default=0.0),
            "orphan": self._orphan,
        }



class PythonWatchedLock(_LockLogic):
    """A ``threading.RLock`` look-alike that records waits, holds and holders
    (the pure-Python implementation, used where the compiled one is not built)."""

    __slots__ = (
        "name",
        "stats",
        "_counters",
        "_counters_pending",
        "_inner",
        "_inner_acquire",
        "_inner_release",
        "_inner_kind",
        "_inner_timed",
        "_owner",
        "_owner_pid",
        "_count",
        "_since_ns",
        "_operation",
        "_hold_uncounted",
        "operations",
        "_op_words",
        "_op_row",
        "_last_op",
        "_last_op_row",
        "_pending_wait_ns",
        "_waiters",
        "_fork_gate",
        "_orphan",
        "_seq",
        "_order_class",
        "_order_tracked",
        "_order_seen_from",
        "__weakref__",
    )

    stats: LockStats

    def __init__(self, name: str, lock: Any = None) -> None:
        inner = lock if lock is not None else threading.Lock()
        self.stats = LockStats()
        self.stats._owner_lock = weakref.ref(self)
        # The counters' 64 words (see h5watch.process.stats), written here directly;
        # where they move next, when a move found the lock busy.
        self._counters = self.stats._c
        self._counters_pending: Any = None
        self._inner_acquire = inner.acquire
        self._inner_release = inner.release
        self._owner: int | None = None
        self._owner_pid = 0
        self._count = 0
        self._since_ns = 0
        self._operation: str | None = None
        self._hold_uncounted = False
        self._order_tracked = False
        self._order_seen_from = 0
        self._op_row = 0
        self._last_op: Any = self  # matches no operation
        self._last_op_row = 0
        self._pending_wait_ns = -1
        self._waiters: dict[int, int] = {}
        self._init_common(name, inner)

    def _use_operations(self, table: OperationTable) -> None:
        self._op_words = table.words

    def _operation_word_list(self) -> list[int]:
        """The operation rows' words now (in the state file once moved there)."""
        return self._op_words.tolist()

    # The waiters (LockCore_wait_begin and the rest in _lockcore.c, which
    # also keep their count and start times for the release).
    def _wait_begin(self, me: int) -> int:
        start_ns = _monotonic_ns()
        self._waiters[me] = start_ns
        return start_ns

    def _wait_end(self, me: int) -> None:
        self._waiters.pop(me, None)

    def _clear_waiters(self) -> None:
        self._waiters = {}

    # -- acquisition -------------------------------------------------------

    def acquire(self, blocking: bool = True, timeout: float = _DEFAULT_TIMEOUT) -> bool:
        # The checks LockCore_acquire makes: only arguments that are not
        # plainly valid are checked against threading.RLock.
        if timeout is not _DEFAULT_TIMEOUT or (blocking is not True and blocking is not False):
            if not (
                (blocking is True or blocking is False)
                and type(timeout) in _PLAIN_TIMEOUT_TYPES
                and (timeout == -1 or (blocking and 0 <= timeout <= _TIMEOUT_MAX))
            ):
                blocking, timeout = self._check_acquire_args(blocking, timeout)
        return self._acquire(blocking, timeout, None)

    def acquire_for(self, operation: str | None = None) -> bool:
        """Blocking acquire that names the operation the holder performs
        (the hot path of ``with lock:`` and of h5py's ``with_phil``)."""
        return self._acquire(True, -1, operation)

    def _acquire(self, blocking: bool, timeout: float, operation: str | None) -> bool:
        # core_acquire in _lockcore.c.
        me = _get_ident()
        if self._owner == me:
            self._count += 1
            self._counters[C_REENTRIES] += 1
            return True
        held = _held.locks
        if held and blocking:
            # Before waiting, as in core_acquire: the inversion about to
            # deadlock is reported too.
            lock_order.check(held, self)
        if not blocking:
            if not self._inner_acquire(False):
                return False
        elif (self._fork_gate is not None or not self._inner_acquire(False)) and not self._acquire_slow(me, timeout):
            return False
        self._commit(me, operation, True)
        self._order_tracked = lock_order.push(held, self)
        return True

    def _commit(self, me: int, operation: str | None, counted: bool) -> None:
        """The one step that makes ``me``, which has the inner lock, the
        holder (core_commit in _lockcore.c): every path goes through it, the
        before-fork acquisition with ``counted`` False. An uncounted hold
        records no hold time on release."""
        self._since_ns = _monotonic_ns()
        self._owner_pid = wiring.pid
        self._operation = operation
        self._count = 1
        self._hold_uncounted = not counted
        self._owner = me
        if counted:
            self._counters[C_ACQUISITIONS] += 1
            # op_row in _lockcore.c: the last operation's row is remembered.
            if operation is self._last_op:
                row = self._last_op_row
            else:
                row = self._last_op_row = self.operations.row(operation)
                self._last_op = operation
            self._op_row = row
            if self._pending_wait_ns >= 0:
                words, base = self._op_words, row * N_OPERATION_WORDS
                words[base + O_WAITS] += 1
                words[base + O_WAIT_SUM] += self._pending_wait_ns
                self._pending_wait_ns = -1

    def _take_for_fork(self, operation: str) -> None:
        # LockCore_take_for_fork in _lockcore.c.
        self._commit(_get_ident(), operation, False)
        self._order_tracked = False

    def _restart_counters_after_fork(self) -> None:
        # restart_counters in _lockcore.c.
        self.stats.reset_after_fork()
        self.operations.reset()
        self._op_words = self.operations.words
        if self._owner is not None:
            self._hold_uncounted = True

    __enter__ = acquire_for

    def release(self) -> None:
        """The one release step (core_release in _lockcore.c): every path
        (release, ``with``, ``with_phil``, the fork's own release) goes through it."""
        if self._owner != _get_ident():
            raise RuntimeError("cannot release un-acquired lock")
        count = self._count - 1
        if count:
            self._count = count
            return
        if self._order_tracked:
            self._order_tracked = False
            lock_order.pop(_held.locks, self)
        if self._counters_pending is not None:
            self.stats._adopt_pending()
        if not self._hold_uncounted:
            now_ns = _monotonic_ns()
            since_ns = self._since_ns
            held_ns = now_ns - since_ns
            counters = self._counters
            counters[C_HOLD_BUCKETS + bisect_left(BUCKET_BOUNDS_NS, held_ns)] += 1
            counters[C_HOLD_SUM] += held_ns
            if held_ns > counters[C_HOLD_MAX]:
                counters[C_HOLD_MAX] = held_ns
            words, base = self._op_words, self._op_row * N_OPERATION_WORDS
            words[base + O_HOLDS] += 1
            words[base + O_HOLD_SUM] += held_ns
            if held_ns > words[base + O_HOLD_MAX]:
                words[base + O_HOLD_MAX] = held_ns
            if self._waiters:
                # waited_during_hold in _lockcore.c: what the threads waiting
                # now waited during this hold, charged to its operation.
                words[base + O_CAUSED_WAIT_SUM] += sum(max(0, now_ns - max(began, since_ns)) for began in self._waiters.copy().values())
            if held_ns >= _record_after_ns:
                # As core_release: told once the lock is free.
                operation = self._operation
                self._count = 0
                self._owner = None
                self._inner_release()
                _long_hold(self, held_ns, operation)
                return
        self._hold_uncounted = False
        self._count = 0
        self._owner = None
        self._inner_release()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()

    def _is_owned(self) -> bool:
        return self._owner == _get_ident()

    def _recursion_count(self) -> int:
        """This thread's recursion depth, 0 if it does not hold the lock (as ``threading.RLock``)."""
        return self._count if self._owner == _get_ident() else 0

    def _set_gated(self, gated: bool) -> None:
        """The hot path reads ``_fork_gate`` itself (LockCore keeps a flag)."""



_lockcore = implementation.compiled_core
IMPLEMENTATION_REASON = implementation.REASON
EXTENSION_MISSING = implementation.EXTENSION_MISSING
_fastrlock_checked: set[type] = set()
# A FastRLock acquire with a deadline that queues like FastRLock's own
# blocking acquire (compiled; layout-verified FastRLock types only).
_timed_fastrlock: Callable[[Any, float], bool | None] | None = None


def _enable_direct_fastrlock(lock_type: type) -> None:
    """Let the compiled core take this FastRLock type through its fields, once
    the layout is verified (instance size, then a known acquisition)."""
    if lock_type in _fastrlock_checked:
        return
    _fastrlock_checked.add(lock_type)
    from h5watch.process.probe import ProbeUnavailable, fastrlock_layout, validate_layout

    if tuple(_lockcore.FASTRLOCK_LAYOUT) != fastrlock_layout():
        return  # the core's FastRLock struct is not the probe's: fields left alone
    try:
        validate_layout(lock_type)
        _lockcore.enable_fastrlock(lock_type)
        global _timed_fastrlock
        _timed_fastrlock = _lockcore.fastrlock_acquire_timed
    except (ProbeUnavailable, ValueError, TypeError):
        pass


if TYPE_CHECKING:
    from h5watch.process._lockcore import LockCore as _LockCoreBase
elif _lockcore is not None:
    _LockCoreBase = _lockcore.LockCore


if TYPE_CHECKING or _lockcore is not None:

    class CompiledWatchedLock(_LockCoreBase, _LockLogic):
        """A ``threading.RLock`` look-alike that records waits, holds and
        holders; its hot path is compiled (``h5watch/_lockcore.c``)."""

        __slots__ = ("name", "stats", "operations", "_inner", "_inner_kind", "_inner_timed", "_fork_gate", "_orphan", "_seq",
                     "__weakref__")
        # _waiters, _order_class, _order_tracked and _order_seen_from are LockCore's fields.

        def __init__(self, name: str, lock: Any = None) -> None:
            inner = lock if lock is not None else threading.Lock()
            if _inner_kind(inner) == "fastrlock":
                _enable_direct_fastrlock(type(inner))
            self._set_inner(inner)
            self.stats = CoreLockStats(self)
            self._init_common(name, inner)

        def _set_gated(self, gated: bool) -> None:
            self._gated = gated

        def _use_operations(self, table: OperationTable) -> None:
            self._set_operations(table.buffer, table.index, table.names)

        def _operation_word_list(self) -> list[int]:
            return memoryview(self._operation_words()).cast("Q").tolist()


if TYPE_CHECKING:
    # Both implementations have the same interface; type checkers see one.
    WatchedLock = PythonWatchedLock
    IMPLEMENTATION: str
elif _lockcore is not None:
    wiring.pid_sink = _lockcore.set_pid
    wiring.pid = os.getpid()
    _lockcore.set_timeout_max(_TIMEOUT_MAX)
    lock_order.set_checking(lock_order.is_checking())
    WatchedLock = CompiledWatchedLock
    IMPLEMENTATION = "compiled"
else:
    CompiledWatchedLock = None  # type: ignore[assignment,misc]
    WatchedLock = PythonWatchedLock
    IMPLEMENTATION = "python"
