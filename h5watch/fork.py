"""Every at-fork action of h5watch, and what a child does about orphaned locks.

Before a fork, the forking thread takes every watched lock (``h5py.phil``
first, then the rest in creation order, so the hook itself cannot deadlock
on lock order), each bounded by ``fork_timeout``. A lock it cannot get in
time is logged (``fork.lock_timeout``) with its holder and skipped: the fork
goes on, and the child finds that lock orphaned.

After a fork, the child has exactly one thread, the one that forked. Any
lock whose recorded owner is another thread is orphaned: no timing
heuristics needed. The child then applies ``on_orphan`` (kill, recover,
raise, warn). A fork that skipped Python's at-fork hooks (a C extension
calling ``fork()``) is noticed by the lock's slow path as a changed pid, and
runs the same child path from there.

Hook order matters: before-hooks run in reverse order of registration, so
h5watch registers its hooks again (a new generation; older ones go inert)
each time h5py is instrumented, to run before h5py's own hook (h5py >= 3.14
takes the real ``phil`` there, with no timeout).

In the child, nothing here may take a lock a dead thread could hold: logs
are written with ``os.write`` (see ``logs``), internal locks are replaced.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from typing import Any, Callable

from . import logs
from .evidence import current_stack, thread_stack
from .lock import OrphanedLockError, WatchedLock, policy, reinit_registry_after_fork, thread_identity, watched_locks
from .stats import ForkStats

__all__ = [
    "ForkGuard",
    "add_child_callback",
    "add_orphan_callback",
    "fork_stats",
    "fork_in_progress_since_ns",
]

_log = logs.get_logger(logger="h5watch.fork")

_child_callbacks: list[Callable[[], None]] = []
_orphan_callbacks: list[Callable[[Any, dict], None]] = []

fork_stats = ForkStats()

# Written by the forking thread only (the before-hook runs on it).
_fork_started_ns: int | None = None
_taken: list[WatchedLock] = []
_timed_out: dict[str, dict[str, Any]] = {}
_threads_at_fork: dict[int, dict[str, Any]] = {}
# True from h5watch's before-hook to its after-hook: a libc fork handler that
# runs while it is False saw a fork that skipped Python's hooks.
_python_fork_in_progress = False
_libc_child_handler: Any = None
_forkrepair: Any = None


def add_child_callback(callback: Callable[[], None]) -> None:
    """Run ``callback()`` in every forked child once h5watch's own state is re-initialised."""
    if callback not in _child_callbacks:
        _child_callbacks.append(callback)


def add_orphan_callback(callback: Callable[[Any, dict], None]) -> None:
    """Run ``callback(lock, evidence)`` when an orphaned lock is found, before its policy applies."""
    if callback not in _orphan_callbacks:
        _orphan_callbacks.append(callback)


def fork_in_progress_since_ns() -> int | None:
    """When the current fork's before-hook started, while a fork is under way."""
    return _fork_started_ns


class ForkGuard:
    """The at-fork hooks and the orphan policy, armed by ``install()``."""

    snapshot_key = "forks"

    def __init__(self) -> None:
        self.options: Any = None
        self._generation = 0
        self._armed = False
        self.probe_reader: Callable[[WatchedLock], dict[str, Any] | None] | None = None
        self.probe_resetter: Callable[[WatchedLock], bool] | None = None
        self.probe_poisoner: Callable[[WatchedLock, int], bool] | None = None
        # Re-takes what h5py's own after-in-child hook released in a fork that
        # skipped the before-hooks (it releases a phil it never took).
        self.rebalance_after_unhooked_fork: Callable[[int], None] | None = None
        self._unhooked = False

    # -- lifecycle ---------------------------------------------------------

    def start(self, options: Any) -> None:
        self.options = options
        self._armed = True
        if self._generation == 0:
            self.register_hooks()
            self._register_libc_child_handler()
        policy.on_pid_change = self._after_fork_without_hooks
        policy.on_orphan_wait = self._on_orphan_wait

    def stop(self) -> None:
        self._armed = False
        policy.on_pid_change = None
        policy.on_orphan_wait = None

    def _register_libc_child_handler(self) -> None:
        """Catch forks that skip Python's hooks as they happen, not at the first wait.

        libc runs ``pthread_atfork`` child handlers for every ``fork()``,
        including one called by a C extension. The compiled handler
        (``h5watch._forkrepair``) calls ``PyOS_AfterFork_Child`` before any
        Python bytecode runs in the child; that runs our after-in-child hook.
        Without the compiled part, a ctypes handler does the same from Python,
        which can itself hang when the fork caught a pending GIL hand-over.
        """
        global _libc_child_handler, _forkrepair
        if _libc_child_handler is not None or _forkrepair is not None:
            return
        try:
            from . import _forkrepair as compiled  # type: ignore[attr-defined]
        except ImportError:
            compiled = None
        if compiled is not None:
            compiled.arm(True)
            _forkrepair = compiled
            return
        try:
            libc = ctypes.CDLL(None)
            register = libc.pthread_atfork
        except (OSError, AttributeError):
            return
        handler_type = ctypes.CFUNCTYPE(None)

        def child_handler() -> None:
            if _python_fork_in_progress or not self._armed:
                return
            try:
                self._after_fork_without_hooks()
            except BaseException:
                pass

        _libc_child_handler = handler_type(child_handler)
        register.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
        register(None, None, ctypes.cast(_libc_child_handler, ctypes.c_void_p))

    def register_hooks(self) -> None:
        """Register a new generation of hooks; the older ones do nothing from now on."""
        self._generation += 1
        generation = self._generation

        def before() -> None:
            if self._armed and generation == self._generation:
                self._before_fork()

        def after_in_parent() -> None:
            if self._armed and generation == self._generation:
                self._after_fork_in_parent()

        def after_in_child() -> None:
            if self._armed and generation == self._generation:
                hooked = _python_fork_in_progress and not self._unhooked
                self._after_fork_in_child(hooked=hooked)

        os.register_at_fork(before=before, after_in_parent=after_in_parent, after_in_child=after_in_child)

    def snapshot(self) -> dict[str, Any]:
        return fork_stats.snapshot()

    # -- the hooks ---------------------------------------------------------

    def _before_fork(self) -> None:
        global _fork_started_ns, _python_fork_in_progress
        _python_fork_in_progress = True
        if _forkrepair is not None:
            _forkrepair.set_python_fork(True)
        start_ns = time.monotonic_ns()
        _fork_started_ns = start_ns
        _threads_at_fork.clear()
        for ident, thread in list(threading._active.items()):  # type: ignore[attr-defined]
            _threads_at_fork[ident] = {"thread_name": thread.name, "native_id": getattr(thread, "native_id", None)}
        _taken.clear()
        _timed_out.clear()
        timeout = self.options.fork_timeout
        for lock in watched_locks():
            if lock._acquire_for_fork(timeout):
                _taken.append(lock)
                continue
            evidence = self._holder_evidence(lock)
            _timed_out[lock.name] = evidence
            lock.stats.bump("timeouts", "fork")
            _log.error("fork.lock_timeout", fork_timeout=timeout, **evidence)
        fork_stats.record(time.monotonic_ns() - start_ns)

    def _after_fork_in_parent(self) -> None:
        global _fork_started_ns, _python_fork_in_progress
        _python_fork_in_progress = False
        if _forkrepair is not None:
            _forkrepair.set_python_fork(False)
        for lock in reversed(_taken):
            lock.release()
        _taken.clear()
        _fork_started_ns = None

    def _after_fork_in_child(self, hooked: bool) -> None:
        global _fork_started_ns, fork_stats, _python_fork_in_progress
        _python_fork_in_progress = False
        if _forkrepair is not None:
            _forkrepair.set_python_fork(False)
        parent_pid = policy.pid
        policy.pid = os.getpid()
        _fork_started_ns = None
        reinit_registry_after_fork()
        me = threading.get_ident()
        for lock in watched_locks():
            # Waiters were other threads: none of them exists here.
            lock._waiters = {}
            lock._reported.clear()
            lock.stats.reset_after_fork()
        for lock in reversed(_taken):
            lock.release()
        _taken.clear()
        if not hooked and self.rebalance_after_unhooked_fork is not None:
            self.rebalance_after_unhooked_fork(me)
        fork_stats = ForkStats()
        # Find orphans before any new thread starts: a new thread may be given
        # a dead holder's ident, and would then look like the owner.
        orphans = [(lock, evidence) for lock in watched_locks() if (evidence := self._orphan_evidence(lock, me)) is not None]
        for lock in watched_locks():
            if lock._owner is None and all(lock is not orphan for orphan, _ in orphans):
                self._clear_stale_handoff(lock, me)
        for lock, evidence in orphans:
            evidence.update(parent_pid=parent_pid, fork_hooks_ran=hooked)
            lock._mark_owner_dead()
            if self.probe_poisoner is not None:
                self.probe_poisoner(lock, me)
        for callback in list(_child_callbacks):
            _call_quietly(callback)
        for lock, evidence in orphans:
            self._apply_policy(lock, evidence)

    def _after_fork_without_hooks(self) -> None:
        """Called from a lock's slow path when ``os.getpid()`` changed under us.

        The fork skipped everything CPython's ``os.fork`` does in a child, not
        only the at-fork hooks: the GIL's condition variable may still count
        waiters that no longer exist, so the first release of the GIL (any
        blocking call, a thread start, even ``os.write``) can hang forever.
        ``PyOS_AfterFork_Child`` is CPython's documented repair for "forked
        by C code": it re-creates the GIL, drops dead thread states and runs
        the after-in-child hooks, ours included. Names of the dead threads are
        saved first, since threading's own hook forgets them.
        """
        if os.getpid() == policy.pid:
            return
        _threads_at_fork.clear()
        for ident, thread in list(threading._active.items()):  # type: ignore[attr-defined]
            _threads_at_fork[ident] = {"thread_name": thread.name, "native_id": getattr(thread, "native_id", None)}
        _taken.clear()
        self._unhooked = True
        try:
            after_fork_child = ctypes.pythonapi.PyOS_AfterFork_Child
        except AttributeError:
            after_fork_child = None
        # Other libraries' hooks may fail here (h5py's releases a phil its
        # before-hook never took); their reports would go through sys.stderr,
        # whose lock a dead thread may hold.
        unraisable_hook, sys.unraisablehook = sys.unraisablehook, _ignore_unraisable
        try:
            if after_fork_child is not None:
                after_fork_child.restype = None
                after_fork_child.argtypes = []
                after_fork_child()
            if os.getpid() != policy.pid:
                # No repair available, or our hook was not part of it.
                self._after_fork_in_child(hooked=False)
        finally:
            sys.unraisablehook = unraisable_hook
            self._unhooked = False

    # -- orphans -----------------------------------------------------------

    def _orphan_evidence(self, lock: WatchedLock, me: int) -> dict[str, Any] | None:
        owner = lock._owner
        if owner is not None and owner != me:
            holder = lock.holder() or {}
            holder.update(self._dead_thread_identity(owner))
            return {"lock": lock.name, "seen_by": "wrapper", "holder": holder}
        if self.probe_reader is not None:
            real = self.probe_reader(lock)
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

    def _clear_stale_handoff(self, lock: WatchedLock, me: int) -> None:
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
            return dict(known)
        # Without our before-hook: threading's table, if its own after-fork
        # hook has not emptied it yet, else any Thread object still referenced.
        identity = thread_identity(ident)
        if identity["thread_name"] is not None:
            return {"thread_name": identity["thread_name"], "native_id": identity["native_id"]}
        for thread in list(threading._dangling):  # type: ignore[attr-defined]
            if getattr(thread, "_ident", None) == ident:
                return {"thread_name": thread.name, "native_id": getattr(thread, "native_id", None)}
        return {"thread_name": None, "native_id": None}

    def _apply_policy(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        action = self.options.on_orphan
        evidence["child_stack"] = current_stack(skip=2)
        if action == "recover":
            if self._recover(lock):
                lock.stats.bump("orphans", "recovered")
                _notify_orphan(lock, evidence)
                _log.warning("lock.recovered", action="recovered", **evidence)
                return
            evidence["recover_failed"] = "no safe way to reset this lock's inner lock"
            action = "kill"
        if action == "kill":
            lock.stats.bump("orphans", "killed")
            _notify_orphan(lock, evidence)
            _log.critical("lock.orphaned", action="killed", exit_code=self.options.kill_exit_code, **evidence)
            _log.critical("process.killed", reason="lock.orphaned", exit_code=self.options.kill_exit_code,
                          lock=lock.name, holder=evidence.get("holder"))
            os._exit(self.options.kill_exit_code)
        lock._orphan = evidence
        if action == "warn":
            lock.stats.bump("orphans", "warned")
            _log.error("lock.orphaned", action="warned", **evidence)
        _notify_orphan(lock, evidence)

    def _recover(self, lock: WatchedLock) -> bool:
        if lock._inner_kind == "fastrlock":
            if self.probe_resetter is None or not self.probe_resetter(lock):
                return False
        elif not lock._reinit_inner():
            return False
        lock._force_reset()
        return True

    def _on_orphan_wait(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        """A thread is about to wait on a lock known to be orphaned."""
        if self.options is not None and self.options.on_orphan == "raise":
            lock.stats.bump("orphans", "raised")
            _notify_orphan(lock, evidence)
            _log.error("lock.orphaned", action="raised", **evidence)
            raise OrphanedLockError(
                f"lock {lock.name!r} is held by thread {evidence['holder'].get('thread_name')!r}, "
                "which did not survive the fork",
                evidence,
            )

    def _holder_evidence(self, lock: WatchedLock) -> dict[str, Any]:
        holder = lock.holder()
        if holder is None and self.probe_reader is not None:
            real = self.probe_reader(lock)
            if real is not None and real["owner_ident"] is not None:
                holder = {**thread_identity(real["owner_ident"]), "operation": None, "seen_by": "probe"}
        if holder is not None:
            holder["stack"] = thread_stack(holder.get("thread_ident"))
        return {"lock": lock.name, "holder": holder, "forking_thread_stack": current_stack(skip=3)}


def _ignore_unraisable(unraisable: Any) -> None:
    pass


def _notify_orphan(lock: WatchedLock, evidence: dict[str, Any]) -> None:
    """Orphan callbacks run after the action is counted, before it is carried out."""
    for callback in list(_orphan_callbacks):
        _call_quietly(lambda: callback(lock, evidence))


def _call_quietly(callback: Callable[[], Any]) -> None:
    try:
        callback()
    except Exception as exc:  # an extension's failure must not break a fork
        _log.error("fork.callback_failed", error=repr(exc))
