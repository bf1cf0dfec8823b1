"""The per-process watchdog thread: timeouts, incidents, heartbeats.

Every tick (``tick_interval``, default 0.5 s) it checks each watched lock's
hold age against ``hold_timeout`` and its oldest waiter against
``wait_timeout``, and a fork stuck in its before-hooks against
``fork_timeout``. A breach is one incident: logged once, with the holder's
identity and the holder's and waiters' stacks, counted, and acted on by
``on_timeout`` (warn; raise, which the waiter itself does in ``acquire``;
kill). Then the tick callbacks run (the state file's heartbeat).

When it runs. CPython 3.12+ warns at ``os.fork()`` in a process with more
than one thread ("This process is multi-threaded, use of fork() may lead to
deadlocks in the child"), so the watchdog must not be the thread that makes
a single-threaded program multi-threaded when it forks:

- it starts when h5watch starts watching (h5py imported, a ``WatchedLock``
  made), and in the child of an ``os.fork()``;
- on 3.12+, right before ``os.fork()`` or ``os.forkpty()`` in a process where
  it is the only other thread, it stops (the tick callbacks' idle half writes
  the state file once more, marked "watchdog not running"), unless
  ``hold_timeout`` or ``metrics_port`` is set: a hold is watched by this
  thread alone, and the exporter has a thread of its own anyway;
- stopped that way, or in the child of any other fork (subprocess's
  ``preexec_fn`` child, a fork by C code), it starts when the process starts
  a thread or a thread begins to wait for a watched lock; never in a child
  whose fork skipped Python's hooks (its ``threading`` is not re-initialised).

Thread starts and forks are seen through an audit hook (the events
``_thread.start_new_thread``, 3.13's ``_thread.start_joinable_thread``,
``os.fork`` and ``os.forkpty``), so nothing of ``threading`` is patched.
The thread is a daemon thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any, Callable

from . import fork, logs
from .evidence import lock_evidence, thread_stack
from .lock import WatchedLock, policy, watched_locks

__all__ = ["Watchdog", "add_idle_callback", "add_tick_callback", "add_wait_callback"]

_log = logs.get_logger(logger="h5watch.watchdog")
_tick_callbacks: list[Callable[[], None]] = []
_idle_callbacks: list[Callable[[], None]] = []
_wait_callbacks: list[Callable[[WatchedLock], None]] = []

_THREAD_EVENTS = frozenset({"_thread.start_new_thread", "_thread.start_joinable_thread"})
_FORK_EVENTS = frozenset({"os.fork", "os.forkpty"})
_AUDIT_EVENTS = _THREAD_EVENTS | _FORK_EVENTS
# Where os.fork() warns about other threads (and the thread-start events exist).
FORK_WARNS_ABOUT_THREADS = sys.version_info >= (3, 12)
# How long a fork may wait for the watchdog to finish its tick and exit.
_STOP_FOR_FORK_SECONDS = 1.0


def add_tick_callback(callback: Callable[[], None]) -> None:
    """Run ``callback()`` in the watchdog thread after every tick's checks."""
    if callback not in _tick_callbacks:
        _tick_callbacks.append(callback)


def add_idle_callback(callback: Callable[[], None]) -> None:
    """Run ``callback()`` when the watchdog stops ticking in a live process
    (before a fork), on the thread that stopped it."""
    if callback not in _idle_callbacks:
        _idle_callbacks.append(callback)


def add_wait_callback(callback: Callable[[WatchedLock], None]) -> None:
    """Run ``callback(lock)`` on a thread that starts to block on ``lock``."""
    if callback not in _wait_callbacks:
        _wait_callbacks.append(callback)


# The watchdog the audit hook serves (audit hooks cannot be removed: it stays,
# inert once this is None or the watchdog is stopped).
_audited: Watchdog | None = None
_audit_hook_added = False


def _audit(event: str, args: tuple[Any, ...]) -> None:
    """Called for every audited event of the process: one set lookup for the rest."""
    if event not in _AUDIT_EVENTS:
        return
    watchdog = _audited
    if watchdog is None:
        return
    try:
        if event in _FORK_EVENTS:
            watchdog._before_os_fork()
        else:
            watchdog.wake()
    except Exception:  # raising here would fail the thread start or the fork
        pass


def _after_fork_in_parent() -> None:
    watchdog = _audited
    if watchdog is not None:
        watchdog._os_fork = False


def _add_audit_hook(watchdog: Watchdog) -> None:
    global _audited, _audit_hook_added
    _audited = watchdog
    if _audit_hook_added:
        return
    _audit_hook_added = True
    try:
        sys.addaudithook(_audit)
    except RuntimeError:  # another audit hook refused ours
        return
    os.register_at_fork(after_in_parent=_after_fork_in_parent)


class Watchdog:
    snapshot_key = "watchdog"

    def __init__(self) -> None:
        self.options: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._fork_reported: int | None = None
        self.ticks = 0
        # Between start() and stop(): this process wants a watchdog (running or not).
        self._enabled = False
        # Set by the audit hook just before os.fork(); the child inherits it.
        self._os_fork = False
        # Serialises starting and stopping the thread.
        self._lifecycle = threading.Lock()
        fork.add_child_callback(self._restart_in_child)

    # -- lifecycle ---------------------------------------------------------

    def start(self, options: Any) -> None:
        self.options = options
        policy.on_wait_timeout = self._on_wait_raised
        policy.on_wait_started = self._on_wait_started
        self._enabled = True
        _add_audit_hook(self)
        with self._lifecycle:
            self._start_thread()

    def stop(self) -> None:
        self._enabled = False
        self._stop.set()
        policy.on_wait_timeout = None
        policy.on_wait_started = None
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def wake(self) -> None:
        """The process starts a thread, or a thread blocks on a watched lock:
        start the watchdog if it is not running (cheap when it is)."""
        if self._thread is not None or not self._enabled:
            return
        if fork.fork_in_progress_since_ns() is not None:
            return  # on the forking thread, inside the at-fork hooks
        if not self._lifecycle.acquire(False):
            return  # being started or stopped right now
        try:
            self._start_thread()
        finally:
            self._lifecycle.release()

    def _start_thread(self) -> None:
        """Start the thread unless it runs; the caller holds ``_lifecycle``."""
        if self._thread is not None or not self._enabled or fork.child_of_unhooked_fork():
            return
        limbo = threading._active_limbo_lock  # type: ignore[attr-defined]
        if not limbo.acquire(False):
            # A fork that skipped the hooks, taken while another thread was
            # starting or ending: threading's own lock is orphaned too.
            _log.warning("watchdog.not_restarted", reason="threading's internal lock is held by a dead thread")
            return
        limbo.release()
        self._stop = stop = threading.Event()
        thread = threading.Thread(target=self._run, args=(stop,), name="h5watch-watchdog", daemon=True)
        self._thread = thread
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down
            self._thread = None

    def _before_os_fork(self) -> None:
        """From the audit hook, on the forking thread, before any at-fork hook:
        leave a single-threaded program single-threaded for the fork."""
        self._os_fork = True
        thread = self._thread
        options = self.options
        if not FORK_WARNS_ABOUT_THREADS or thread is None or not self._enabled or options is None:
            return
        if options.hold_timeout is not None or options.metrics_port is not None:
            return
        me = threading.current_thread()
        if any(other is not me and other is not thread for other in threading.enumerate()):
            return  # the program has threads of its own: CPython warns anyway
        with self._lifecycle:
            if self._thread is not thread:
                return
            self._stop.set()
            thread.join(_STOP_FOR_FORK_SECONDS)
            if thread.is_alive():
                return  # stuck in a tick: keep it (the fork will warn)
            self._thread = None
        for callback in list(_idle_callbacks):
            try:
                callback()
            except Exception as exc:
                _log.error("watchdog.callback_failed", error=repr(exc))

    def _restart_in_child(self) -> None:
        """After a fork, in the child: only the forking thread survived."""
        os_fork, self._os_fork = self._os_fork, False
        self._lifecycle = threading.Lock()
        self._thread = None
        self._fork_reported = None
        if os_fork and self._enabled and self.options is not None:
            # A child of os.fork() goes on running Python: watched like its parent.
            # Any other child (preexec_fn, C code) is woken on demand, or execs.
            self._start_thread()

    def snapshot(self) -> dict[str, Any]:
        thread = self._thread
        return {"running": bool(thread is not None and thread.is_alive()), "ticks": self.ticks}

    def _on_wait_started(self, lock: WatchedLock) -> None:
        """From a lock's slow path, on a thread about to block."""
        self.wake()
        for callback in list(_wait_callbacks):
            callback(lock)

    # -- the loop ----------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.options.tick_interval):
            try:
                self.tick()
            except Exception as exc:  # the watchdog must outlive its own bugs
                _log.error("watchdog.tick_failed", error=repr(exc))

    def tick(self) -> None:
        now_ns = time.monotonic_ns()
        for lock in watched_locks():
            self._check_hold(lock, now_ns)
            self._check_waits(lock, now_ns)
        self._check_fork(now_ns)
        self.ticks += 1
        for callback in list(_tick_callbacks):
            try:
                callback()
            except Exception as exc:
                _log.error("watchdog.callback_failed", error=repr(exc))

    # -- checks ------------------------------------------------------------

    def _check_hold(self, lock: WatchedLock, now_ns: int) -> None:
        limit = self.options.hold_timeout
        holder = lock.holder(now_ns)
        if limit is None or holder is None or holder["hold_age_seconds"] < limit:
            return
        incident = ("hold", holder["thread_ident"], holder["since_ns"])
        if incident in lock._reported:
            return
        lock._reported.add(incident)
        self._incident(lock, "hold", "lock.hold_timeout", limit)

    def _check_waits(self, lock: WatchedLock, now_ns: int) -> None:
        limit = self.options.wait_timeout
        if limit is None or self.options.on_timeout == "raise":
            # With raise, each waiter reports its own timeout as it raises.
            return
        limit_ns = int(limit * 1e9)
        overdue = [
            (ident, since_ns)
            for ident, since_ns in lock._waiters.copy().items()
            if now_ns - since_ns >= limit_ns and ("wait", ident, since_ns) not in lock._reported
        ]
        if not overdue:
            return
        for ident, since_ns in overdue:
            lock._reported.add(("wait", ident, since_ns))
        self._incident(lock, "wait", "lock.wait_timeout", limit, waiting_threads=[ident for ident, _ in overdue])

    def _check_fork(self, now_ns: int) -> None:
        """A fork still in its before-hooks past ``fork_timeout``: h5watch's hook is
        bounded, so this is another hook (h5py >= 3.14 takes phil with no timeout)."""
        started = fork.fork_in_progress_since_ns()
        limit = self.options.fork_timeout
        if started is None or limit is None or (now_ns - started) < limit * 1e9 or self._fork_reported == started:
            return
        self._fork_reported = started
        locks = [lock_evidence(lock) for lock in watched_locks() if lock.locked()]
        _log.error(
            "fork.stalled",
            fork_timeout=limit,
            waiting_seconds=(now_ns - started) / 1e9,
            locks=locks,
        )

    def _incident(self, lock: WatchedLock, kind: str, event: str, limit: float, **extra: Any) -> None:
        lock.stats.bump("timeouts", kind)
        evidence = lock_evidence(lock)
        action = self.options.on_timeout
        if action == "kill":
            _log.critical(event, timeout=limit, action="killed", exit_code=self.options.kill_exit_code, **extra, **evidence)
            _log.critical("process.killed", reason=event, exit_code=self.options.kill_exit_code, lock=lock.name,
                          holder=evidence.get("holder"))
            _run_tick_callbacks_once()
            os._exit(self.options.kill_exit_code)
        _log.error(event, timeout=limit, action=action, **extra, **evidence)

    def _on_wait_raised(self, lock: WatchedLock, waited_ns: int) -> None:
        """Called on the waiting thread just before it raises ``LockTimeout``."""
        lock.stats.bump("timeouts", "wait")
        evidence = lock_evidence(lock)
        evidence["waiter_stack"] = thread_stack(threading.get_ident())
        _log.error("lock.wait_timeout", timeout=self.options.wait_timeout, action="raised", waited_seconds=waited_ns / 1e9, **evidence)


def _run_tick_callbacks_once() -> None:
    """Last state-file write before the process exits."""
    for callback in list(_tick_callbacks):
        try:
            callback()
        except Exception:
            pass
