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
  made), and in the child of a fork that goes on running Python
  (``os.fork()``, ``multiprocessing``);
- on 3.12+, in a before-fork hook of such a fork in a process where it is the
  only other thread, it stops (the idle callbacks write the state file once
  more, marked "watchdog not running"), unless ``hold_timeout`` or
  ``metrics_port`` is set: a hold is watched by this thread alone, and the
  exporter has a thread of its own anyway;
- stopped that way, or in the child of subprocess's ``preexec_fn`` fork
  (which execs), it starts again when a thread begins to wait for a watched
  lock, or when ``install()`` changes an option; never in a child whose fork skipped
  Python's hooks (its ``threading`` is not re-initialised).

subprocess's ``preexec_fn`` fork is told from the others by the Python frame
that forks (``subprocess.Popen._execute_child``): it does not warn, and its
child execs. Nothing is hooked per thread start (an audit hook would: every
audited event, ``id()`` included, would call into Python) and nothing of
``threading`` is patched. The thread is a daemon thread.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from h5watch import logs
from h5watch.process import fork
from h5watch.process.evidence import lock_evidence, thread_stack
from h5watch.process.lock import WatchedLock, policy, watched_locks

__all__ = ["Watchdog", "add_idle_callback", "add_tick_callback", "add_wait_callback"]

_log = logs.get_logger(logger="h5watch.watchdog")
_tick_callbacks: list[Callable[[], None]] = []
_idle_callbacks: list[Callable[[], None]] = []
_wait_callbacks: list[Callable[[WatchedLock], None]] = []

# Where os.fork() warns about other threads.
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


def _forked_by_subprocess_to_exec(frame: Any) -> bool:
    """Is ``frame`` subprocess's, forking a child that runs ``preexec_fn`` and execs?"""
    return frame is not None and frame.f_code.co_name == "_execute_child" and frame.f_globals.get("__name__") == "subprocess"


class Watchdog:
    snapshot_key = "watchdog"

    def __init__(self) -> None:
        self.options: Any = None
        self._thread: threading.Thread | None = None
        # The process that started _thread: a child forked without Python's
        # hooks still holds its parent's Thread object, whose thread is gone.
        self._thread_pid = 0
        self._stop = threading.Event()
        self._fork_reported: int | None = None
        self.ticks = 0
        # Between start() and stop(): this process wants a watchdog (running or not).
        self._enabled = False
        # Set by the before-fork hook: this fork's child execs (subprocess's
        # preexec_fn child); the child inherits it.
        self._child_execs = False
        self._fork_hooks_registered = False
        # Serialises starting and stopping the thread.
        self._lifecycle = threading.Lock()
        fork.add_child_callback(self._restart_in_child)

    # -- lifecycle ---------------------------------------------------------

    def start(self, options: Any) -> None:
        self.options = options
        # lock.py calls it with the lock's _LockLogic self, always a WatchedLock.
        policy.on_wait_timeout = cast("Callable[[Any, int], None]", self._on_wait_raised)
        # Left in place by stop(): the wait callbacks (the state file) outlive
        # a stopped watchdog; uninstall() clears it.
        # lock.py calls it with the lock's _LockLogic self, always a WatchedLock.
        policy.on_wait_started = cast("Callable[[Any], None]", self._on_wait_started)
        self._enabled = True
        if not self._fork_hooks_registered:
            self._fork_hooks_registered = True
            os.register_at_fork(before=self._before_fork, after_in_parent=self._after_fork_in_parent)
        with self._lifecycle:
            self._start_thread()

    def stop(self) -> None:
        self._enabled = False
        self._stop.set()
        policy.on_wait_timeout = None
        thread, self._thread = self._thread, None
        if thread is not None and self._thread_pid == os.getpid() and thread is not threading.current_thread():
            thread.join(5)

    def wake(self) -> None:
        """A thread blocks on a watched lock: start the watchdog if it is not
        running (cheap when it is)."""
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
        self._thread_pid = os.getpid()
        try:
            thread.start()
        except RuntimeError:  # interpreter shutting down
            self._thread = None

    def _before_fork(self) -> None:
        """Before-fork hook, on the forking thread, before h5watch's lock taking
        (registered later, it runs earlier): leave a single-threaded program
        single-threaded for the fork."""
        self._child_execs = _forked_by_subprocess_to_exec(sys._getframe(1))
        thread = self._thread
        options = self.options
        if not FORK_WARNS_ABOUT_THREADS or self._child_execs or thread is None or not self._enabled or options is None:
            return
        if self._thread_pid != os.getpid():
            return  # the parent's thread, in a child forked without Python's hooks
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

    def _after_fork_in_parent(self) -> None:
        self._child_execs = False

    def _restart_in_child(self) -> None:
        """After a fork, in the child: only the forking thread survived."""
        child_execs, self._child_execs = self._child_execs, False
        self._lifecycle = threading.Lock()
        self._thread = None
        self._fork_reported = None
        self.ticks = 0
        if not child_execs and self._enabled and self.options is not None:
            # It goes on running Python: watched like its parent. subprocess's
            # preexec_fn child is woken on demand, or execs.
            self._start_thread()

    def snapshot(self) -> dict[str, Any]:
        thread = self._thread
        running = thread is not None and self._thread_pid == os.getpid() and thread.is_alive()
        return {"running": running, "ticks": self.ticks}

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
        fork.check_orphan_waiters()
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
        if started is None or limit is None or self._fork_reported == started:
            return
        if now_ns - started < fork.fork_stall_limit_seconds(limit) * 1e9:
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
