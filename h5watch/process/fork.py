"""Every at-fork action of h5watch, and what a child does about orphaned locks.

Before a fork (``os.fork`` and everything built on it), the forking thread
takes every watched lock, ``h5py.phil`` included, by ``fork_timeout``:

- fairly: a gate holds back new acquisitions by threads that hold no watched
  lock, so the fork is served as soon as the current holders let go instead
  of losing every race to threads that barge in (for at most
  ``FORK_GATE_SECONDS``); a busy ``phil`` is queued for, not polled;
- without inverting the service's lock order: it never holds one watched
  lock while it blocks on another. It blocks on one lock holding nothing,
  then tries the others without waiting; if one is busy it lets go of all
  and blocks on that one first (all or none, then back off).

A lock it cannot get in time is logged (``fork.lock_timeout``) with its
holder and left: the fork goes on, and the child finds that lock orphaned.
h5py >= 3.14 registers its own before-fork hook, a ``phil.acquire()`` with no
timeout; ``h5watch.process.h5py_hook`` hands that registration to ``adopt_h5py_hooks``
while h5py imports, so phil is taken here, bounded, instead.

After a fork the child has exactly one thread, the one that forked. Any lock
whose recorded owner is another thread is orphaned: no timing heuristics. The
child marks it at once (before any new thread could be given the dead
holder's ident) and applies ``on_orphan`` when it matters: ``recover`` and
``warn`` at once, ``kill`` and ``raise`` when a thread of the child first
waits for that lock. A child that never touches the lock (subprocess's
pre-exec child, a child that execs) is left alone.

A fork that skipped Python's at-fork hooks (C code calling ``fork()``, or
``_posixsubprocess`` for ``user=``/``group=``/``extra_groups=``) is noticed by
a lock's slow path as a changed pid, the first time the child waits for a
watched lock. Nothing runs in such a child before that: no Python code, no
call into CPython's after-fork functions (their before-fork half did not
run), no thread started. (The compiled core's libc fork handler only bumps a
number, so that the child's counters leave its parent's state file.)

In the child, nothing here may take a lock a dead thread could hold: logs
are written with ``os.write`` (see ``logs``), internal locks are replaced.
"""

from __future__ import annotations

import faulthandler  # noqa: F401  (the compiled core's kill path prints stacks through it)
import functools
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from h5watch import logs
from h5watch.process import lock as lock_module
from h5watch.process.evidence import current_stack, holder_operation, thread_stack
from h5watch.process.lock import ForkGate, OrphanedLockError, WatchedLock, reinit_registry_after_fork, thread_identity, watched_locks, wiring
from h5watch.process.stats import ForkStats

if TYPE_CHECKING:
    from h5watch.process.flight import Recorder

__all__ = [
    "FORK_GATE_SECONDS",
    "ForkGuard",
    "ForkParts",
    "RealLocks",
    "child_of_unhooked_fork",
    "fork_stats",
    "fork_in_progress_since_ns",
]

# How long new acquisitions wait at the gate while a fork takes the locks.
FORK_GATE_SECONDS = 1.0
# After fork_timeout, each lock still missing gets this much more, once.
_LAST_CHANCE_NS = 100_000_000

_log = logs.get_logger(logger="h5watch.fork")

fork_stats = ForkStats()

# Written by the forking thread only (the before-hook runs on it).
_fork_started_ns: int | None = None
_forking_thread: int | None = None
_taken: list[WatchedLock] = []
_threads_at_fork: dict[int, threading.Thread] = {}
# The fork under way (or, in a child, the one that made it) is subprocess's.
_fork_for_exec = False
# This process is the child of a fork that skipped Python's hooks.
_unhooked_child = False
# Held by a thread doing what a fork must not cut in half (the watchdog
# importing the deadlock detector: the child would inherit the import half
# done). A hooked fork takes it first, by fork_timeout, and holds it until
# the fork is over; the child makes a new one.
_fork_exclusion = threading.Lock()
_exclusion_taken = False


if TYPE_CHECKING:  # interfaces for the type checker only: each Protocol class made costs start-up about 0.05 ms
    class ForkParts(Protocol):
        """The rest of h5watch as the fork path sees it (the runtime's component graph)."""

        def before_fork(self) -> None:
            """On the forking thread, before any lock is taken for the fork."""

        def after_fork_in_child(self) -> None:
            """The other parts' child steps, in their fixed order; h5watch's own
            state is re-initialised and orphans are marked by then."""

        def orphan_acted_on(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
            """An orphan's policy is counted and about to be carried out."""


    class RealLocks(Protocol):
        """What only the probe of a wrapped FastRLock (h5py's real ``phil``) can do."""

        def real_state(self, lock: WatchedLock) -> dict[str, Any] | None:
            """The real FastRLock's owner and counts, or None: not a probed lock."""

        def reset_real(self, lock: WatchedLock) -> bool:
            """Make the real FastRLock free (in a child); False: not a probed lock."""

        def poison_real(self, lock: WatchedLock, alive_ident: int) -> bool:
            """Mark the real FastRLock's dead owner so no new thread matches it."""


def fork_in_progress_since_ns() -> int | None:
    """When the current fork's before-hook started, while a fork is under way."""
    return _fork_started_ns


def fork_stall_limit_seconds(fork_timeout: float) -> float:
    """How long a fork may sit in its before-hooks before the watchdog calls it
    stalled: h5watch's own hook may take ``fork_timeout`` plus a last chance
    per lock; anything longer is another hook (h5py's, when not taken over)."""
    return fork_timeout + len(watched_locks()) * _LAST_CHANCE_NS / 1e9 + 0.5


def fork_for_exec() -> bool:
    """In a child: was the fork ``subprocess``'s, which execs at once?"""
    return _fork_for_exec


def child_of_unhooked_fork() -> bool:
    """True in a process forked without Python's at-fork hooks: its interpreter
    was not re-initialised for the fork, so h5watch starts no thread there."""
    return _unhooked_child


class ForkGuard:
    """The at-fork hooks and the orphan policy, armed by ``install()``."""

    snapshot_key = "forks"

    def __init__(self, real_locks: RealLocks, parts: ForkParts, recorder: Recorder | None = None) -> None:
        self.options: Any = None
        self._real = real_locks
        self._parts = parts
        self._recorder = recorder
        self._armed = False
        self._registered = False
        # h5py's own (before, after_in_parent, after_in_child), taken over
        # while h5py imported; run as they are whenever h5watch is disarmed.
        self._h5py_hooks: tuple[Callable[[], Any], ...] | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self, options: Any) -> None:
        self.options = options
        self._armed = True
        self._ensure_registered()
        _set_compiled_orphan_kill(options.kill_exit_code if options.on_orphan == "kill" else 0, options.service)

    def stop(self) -> None:
        self._armed = False
        _set_compiled_orphan_kill(0)

    # -- what the other parts ask (see watchdog.Forks, publisher.Forks) -----

    @property
    def stats(self) -> ForkStats:
        return fork_stats

    def in_progress_since_ns(self) -> int | None:
        return _fork_started_ns

    def stall_limit_seconds(self, fork_timeout: float) -> float:
        return fork_stall_limit_seconds(fork_timeout)

    def child_of_unhooked_fork(self) -> bool:
        return _unhooked_child

    def fork_for_exec(self) -> bool:
        return _fork_for_exec

    def excluding_forks(self) -> Any:
        """A lock: while it is held, a fork with Python's hooks waits (by
        ``fork_timeout``); a fork holds it until it is over."""
        return _fork_exclusion

    def adopt_h5py_hooks(self, before: Callable[[], Any], after_in_parent: Callable[[], Any] | None,
                         after_in_child: Callable[[], Any] | None) -> bool:
        """Take over h5py's at-fork registration (h5py >= 3.14): while armed,
        h5watch's bounded acquisition of ``h5py.phil`` stands in for it."""
        self._h5py_hooks = (before, after_in_parent or _nothing, after_in_child or _nothing)
        self._ensure_registered()
        return True

    def _ensure_registered(self) -> None:
        """Register h5watch's hooks once; disarmed, they run h5py's adopted ones."""
        if not self._registered:
            self._registered = True
            os.register_at_fork(
                before=self._before_hook, after_in_parent=self._after_in_parent_hook, after_in_child=self._after_in_child_hook
            )

    def fork_bounded(self) -> bool:
        """Does ``os.fork()`` return within ``fork_timeout`` whatever holds phil?

        False only when h5py registered its own unbounded before-fork hook
        before h5watch could take it over (h5py imported before ``install()``).
        """
        if self._h5py_hooks is not None:
            return True
        objects = sys.modules.get("h5py._objects")
        return objects is None or not hasattr(objects, "_phil_before_fork")

    def snapshot(self) -> dict[str, Any]:
        return {**fork_stats.snapshot(), "fork_bounded": self.fork_bounded()}

    # -- the hooks ---------------------------------------------------------

    def _before_hook(self) -> None:
        global _fork_for_exec
        # subprocess forks to exec at once (its preexec_fn child runs the
        # hooks): such a child makes no state file of its own.
        caller = sys._getframe(1)
        _fork_for_exec = caller.f_code.co_name == "_execute_child" and caller.f_globals.get("__name__") == "subprocess"
        if self._armed:
            self._parts.before_fork()
            self._before_fork()
        elif self._h5py_hooks is not None:
            self._h5py_hooks[0]()

    def _after_in_parent_hook(self) -> None:
        if _forking_thread is not None:
            self._after_fork_in_parent()
        elif self._h5py_hooks is not None and not self._armed:
            self._h5py_hooks[1]()

    def _after_in_child_hook(self) -> None:
        if _forking_thread is not None or self._armed:
            # Hooked when our before-hook ran on this very thread.
            self._after_fork_in_child(hooked=_forking_thread == threading.get_ident())
        elif self._h5py_hooks is not None:
            self._h5py_hooks[2]()

    def _before_fork(self) -> None:
        global _fork_started_ns, _forking_thread, _exclusion_taken
        me = threading.get_ident()
        start_ns = time.monotonic_ns()
        _forking_thread = me
        _fork_started_ns = start_ns
        _taken.clear()
        timeout = self.options.fork_timeout
        _exclusion_taken = _fork_exclusion.acquire(True, -1 if timeout is None else timeout)
        deadline_ns = None if timeout is None else start_ns + int(timeout * 1e9)
        locks = watched_locks()
        gate = ForkGate(me)
        for lock in locks:
            lock._raise_fork_gate(gate)

        def lower_gates() -> None:
            gate.open()
            for lock in locks:
                lock._lower_fork_gate()

        try:
            taken, missing = _take_all(locks, deadline_ns, start_ns + int(FORK_GATE_SECONDS * 1e9), lower_gates)
        finally:
            lower_gates()
        _taken.extend(taken)
        recorder = self._recorder
        _remember_threads(bool(missing))
        for lock in missing:
            evidence = self._holder_evidence(lock)
            lock.stats.bump("timeouts", "fork")
            if recorder is not None:
                holder = evidence.get("holder") or {}
                recorder.record("fork_timeout", lock=lock.name, operation=holder.get("operation"),
                                duration_ns=time.monotonic_ns() - start_ns, extra=len(lock._waiters),
                                thread=(holder.get("native_id"), holder.get("thread_name")))
                evidence["recorder"] = recorder.tail()
            _log.error("fork.lock_timeout", fork_timeout=timeout, **evidence)
        waited_ns = time.monotonic_ns() - start_ns
        fork_stats.record(waited_ns)
        if recorder is not None:
            recorder.record("fork", operation="subprocess" if _fork_for_exec else "os.fork", duration_ns=waited_ns,
                            extra=len(missing))

    def _after_fork_in_parent(self) -> None:
        global _fork_started_ns, _forking_thread, _exclusion_taken
        for lock in reversed(_taken):
            lock._release_for_fork()
        _taken.clear()
        if _exclusion_taken:
            _exclusion_taken = False
            _fork_exclusion.release()
        _fork_started_ns = None
        _forking_thread = None

    def _after_fork_in_child(self, hooked: bool) -> None:
        """The child's steps, in this order (as ``threading._after_fork``)."""
        parent_pid = _adopt_child_pid(hooked)
        reinit_registry_after_fork()  # internal locks a dead thread may hold
        _forget_parent_threads()
        self._give_back_fork_locks(hooked)
        orphans = self._mark_orphans(parent_pid, hooked)
        _call_quietly(self._parts.after_fork_in_child)
        self._apply_policies_at_fork(orphans)

    def _give_back_fork_locks(self, hooked: bool) -> None:
        """What the before-hook took for this fork is this thread's to give back."""
        if hooked:
            for lock in reversed(_taken):
                lock._release_for_fork()
        _taken.clear()

    def _mark_orphans(self, parent_pid: int, hooked: bool) -> list[tuple[WatchedLock, dict[str, Any]]]:
        """Orphans are marked before any new thread starts: a new thread may
        be given a dead holder's ident, and would then look like the owner."""
        me = threading.get_ident()
        orphans = [(lock, evidence) for lock in watched_locks() if (evidence := self._orphan_evidence(lock, me)) is not None]
        orphaned = {id(lock) for lock, _ in orphans}
        for lock in watched_locks():
            if lock._owner_ident() is None and id(lock) not in orphaned:
                self._clear_stale_handoff(lock)
        for lock, evidence in orphans:
            evidence.update(parent_pid=parent_pid, fork_hooks_ran=hooked)
            lock._mark_orphaned(evidence)
            self._real.poison_real(lock, me)
        return orphans

    def _apply_policies_at_fork(self, orphans: list[tuple[WatchedLock, dict[str, Any]]]) -> None:
        """Policies that act at once; kill and raise wait for a waiter."""
        for lock, evidence in orphans:
            self._apply_policy_at_fork(lock, evidence)

    def after_fork_without_hooks(self) -> None:
        """Called from a lock's slow path when ``os.getpid()`` changed under us:
        a fork that skipped Python's hooks. Runs h5watch's own child steps and
        nothing else: threading's table still lists the parent's threads,
        which names the dead holders."""
        if not self._armed or os.getpid() == wiring.pid:
            return
        _remember_threads()
        # Locks taken by a hooked fork under way on another thread are that
        # thread's, and it is gone here: they are orphans like any other.
        _taken.clear()
        self._after_fork_in_child(hooked=False)

    # -- orphans -----------------------------------------------------------

    def _orphan_evidence(self, lock: WatchedLock, me: int) -> dict[str, Any] | None:
        owner = lock._owner_ident()
        if owner is not None and owner != me:
            holder = lock.holder() or {}
            holder.update(self._dead_thread_identity(owner))
            return {"lock": lock.name, "seen_by": "wrapper", "holder": holder}
        real = self._real.real_state(lock)
        if real is not None and real["owner_ident"] not in (None, me):
            holder = {
                "pid": None,
                "thread_ident": real["owner_ident"],
                "operation": None,
                "since_ns": None,
                "depth": real["count"],
                **self._dead_thread_identity(real["owner_ident"]),
            }
            return {"lock": lock.name, "seen_by": "probe", "holder": holder}
        return None

    def _clear_stale_handoff(self, lock: WatchedLock) -> None:
        """No holder inside, yet the inner lock is taken: a dead thread was
        between taking it and recording itself (or the reverse on release), or
        a dead waiter held FastRLock's hand-off lock. Nobody was inside the
        critical section, so a reset is safe under every policy."""
        if lock._inner_acquire(False):
            lock._inner_release()
            return
        if not self._recover(lock):
            return
        lock.stats.bump("orphans", "recovered")
        _log.warning("lock.recovered", lock=lock.name, reason="stale hand-off state from a thread that did not survive the fork")

    def _dead_thread_identity(self, ident: int) -> dict[str, Any]:
        known = _threads_at_fork.get(ident)
        if known is not None:
            return {"thread_name": known.name, "native_id": getattr(known, "native_id", None)}
        identity = thread_identity(ident)
        if identity["thread_name"] is not None:
            return {"thread_name": identity["thread_name"], "native_id": identity["native_id"]}
        for thread in list(threading._dangling):  # type: ignore[attr-defined]
            if getattr(thread, "_ident", None) == ident:
                return {"thread_name": thread.name, "native_id": getattr(thread, "native_id", None)}
        return {"thread_name": None, "native_id": None}

    def _apply_policy_at_fork(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        action = self.options.on_orphan
        if action == "recover":
            evidence["child_stack"] = current_stack(skip=2)
            if self._recover(lock):
                lock.stats.bump("orphans", "recovered")
                self._notify_orphan(lock, evidence)
                _log.warning("lock.recovered", action="recovered", **evidence)
                return
            # No safe way to reset this lock's inner lock: kill at the first wait.
            evidence["recover_failed"] = "no safe way to reset this lock's inner lock"
            lock._mark_orphaned(evidence)
        elif action == "warn":
            lock.stats.bump("orphans", "warned")
            evidence["child_stack"] = current_stack(skip=2)
            self._notify_orphan(lock, evidence)
            _log.error("lock.orphaned", action="warned", **evidence)

    def orphan_wait(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        """A thread of the child is about to wait for a lock known to be orphaned."""
        if not self._armed:
            return
        action = self.options.on_orphan
        if action == "recover" and "recover_failed" not in evidence:
            return
        if action == "warn":
            return  # logged when the orphan was found; the wait goes on, as asked
        evidence = {**evidence, "child_stack": current_stack(skip=3)}
        if action == "raise":
            lock.stats.bump("orphans", "raised")
            self._notify_orphan(lock, evidence)
            _log.error("lock.orphaned", action="raised", **evidence)
            raise OrphanedLockError(
                f"lock {lock.name!r} is held by thread {evidence['holder'].get('thread_name')!r}, "
                "which did not survive the fork",
                evidence,
            )
        self.kill_for_orphan(lock, evidence)

    def kill_for_orphan(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        """Evidence out, then exit with ``kill_exit_code``: waiting could only hang."""
        code = self.options.kill_exit_code
        lock.stats.bump("orphans", "killed")
        self._notify_orphan(lock, evidence)
        _log.critical("lock.orphaned", action="killed", exit_code=code, **evidence)
        _log.critical("process.killed", reason="lock.orphaned", exit_code=code, lock=lock.name, holder=evidence.get("holder"))
        os._exit(code)

    def check_orphan_waiters(self) -> None:
        """From the child's watchdog: a thread blocked on an orphaned lock at C
        level (h5py's own code takes the real phil directly) never reaches the
        slow path; the probe's count of pending requests shows it."""
        if not self._armed or self.options.on_orphan not in ("kill", "raise"):
            return
        for lock in watched_locks():
            evidence = lock._orphan_evidence()
            if evidence is None:
                continue
            real = self._real.real_state(lock)
            if real is not None and real["pending_requests"] > 0:
                self.kill_for_orphan(lock, {**evidence, "seen_waiting_by": "probe"})

    def _notify_orphan(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        """After the action is counted, before it is carried out (and logged:
        the log event carries the flight recorder's newest entries, this one's
        included)."""
        _call_quietly(functools.partial(self._parts.orphan_acted_on, lock, evidence))
        if self._recorder is not None:
            evidence["recorder"] = self._recorder.tail()

    def _recover(self, lock: WatchedLock) -> bool:
        if lock._inner_kind == "fastrlock":
            if not self._real.reset_real(lock):
                return False
        elif not lock._reinit_inner():
            return False
        lock._force_reset()
        return True

    def _holder_evidence(self, lock: WatchedLock) -> dict[str, Any]:
        holder = lock.holder()
        if holder is None:
            real = self._real.real_state(lock)
            if real is not None and real["owner_ident"] is not None:
                holder = {**thread_identity(real["owner_ident"]), "operation": None, "seen_by": "probe"}
        if holder is not None:
            if holder.get("operation") is None:
                holder["operation"] = holder_operation(holder.get("thread_ident"))
            holder["stack"] = thread_stack(holder.get("thread_ident"))
        return {"lock": lock.name, "holder": holder, "forking_thread_stack": current_stack(skip=3)}


def _take_all(
    locks: list[WatchedLock], deadline_ns: int | None, gate_until_ns: int, lower_gates: Callable[[], None]
) -> tuple[list[WatchedLock], list[WatchedLock]]:
    """Every lock, or as many as can be had by the deadline: (taken, missing).

    Blocks on one lock at a time while holding none; tries the rest without
    waiting, and on the first busy one lets go of everything and blocks on
    that one next. So the fork never holds a lock while it waits for another,
    whatever order the service takes them in.
    """
    if not locks:
        return [], []
    order = list(locks)
    lead = 0
    gates_up = True
    while True:
        first = order[lead]
        while True:
            step_ns = deadline_ns
            if gates_up:
                step_ns = gate_until_ns if deadline_ns is None else min(deadline_ns, gate_until_ns)
            if first._acquire_for_fork(step_ns):
                break
            if gates_up and time.monotonic_ns() >= gate_until_ns:
                lower_gates()
                gates_up = False
                continue
            return _last_chance(order)
        taken = [first]
        busy = None
        for lock in order[lead + 1:] + order[:lead]:
            if lock._acquire_for_fork(0):
                taken.append(lock)
            else:
                busy = lock
                break
        if busy is None:
            return taken, []
        for lock in reversed(taken):
            lock._release_for_fork()
        lead = order.index(busy)
        now_ns = time.monotonic_ns()
        if deadline_ns is not None and now_ns >= deadline_ns:
            return _last_chance(order)
        if gates_up and now_ns >= gate_until_ns:
            lower_gates()
            gates_up = False


def _last_chance(order: list[WatchedLock]) -> tuple[list[WatchedLock], list[WatchedLock]]:
    """Past the deadline: whatever comes free within a moment, one lock at a time."""
    taken, missing = [], []
    for lock in order:
        if lock._acquire_for_fork(time.monotonic_ns() + _LAST_CHANCE_NS):
            taken.append(lock)
        else:
            missing.append(lock)
    return taken, missing


def _adopt_child_pid(hooked: bool) -> int:
    """The child's first step: its own pid, no fork under way; the parent's pid."""
    global _fork_started_ns, _forking_thread, _unhooked_child, _fork_exclusion, _exclusion_taken
    parent_pid = wiring.pid
    wiring.pid = os.getpid()
    _fork_started_ns = None
    _forking_thread = None
    _unhooked_child = not hooked
    _fork_exclusion = threading.Lock()
    _exclusion_taken = False
    return parent_pid


def _forget_parent_threads() -> None:
    """Waiters, gates and statistics were the parent's."""
    global fork_stats
    for lock in watched_locks():
        lock._forget_other_threads()
        lock._restart_counters_after_fork()
    fork_stats = ForkStats()


def _remember_threads(needed: bool = True) -> None:
    """This process's threads as the fork finds them: in the child, the dead
    holders' names (threading forgets them there). Copied only when a lock
    could not be taken for the fork (the only way a hooked fork leaves an
    orphan): copying touches every thread object, and after a fork every
    page the parent writes to is copied again while a child shares it."""
    global _threads_at_fork
    if needed:
        _threads_at_fork = threading._active.copy()  # type: ignore[attr-defined]
    elif _threads_at_fork:
        _threads_at_fork = {}  # an earlier fork's table could name the wrong threads


def _nothing() -> None:
    pass


def _set_compiled_orphan_kill(exit_code: int, workload: str | None = None) -> None:
    """The compiled slow path kills a hook-skipping fork's child itself (see
    ``kill_if_orphaned_in_unhooked_child`` in ``_lockcore.c``), and logs it
    naming ``workload``."""
    if lock_module._lockcore is not None:
        if workload is not None:
            lock_module._lockcore.set_log_workload(workload)
        lock_module._lockcore.set_orphan_kill(exit_code)


def _call_quietly(callback: Callable[[], Any]) -> None:
    try:
        callback()
    except Exception as exc:  # an extension's failure must not break a fork
        _log.error("fork.callback_failed", error=repr(exc))
