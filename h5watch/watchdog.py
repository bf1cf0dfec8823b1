"""The per-process watchdog thread: timeouts, incidents, heartbeats.

Every tick (``tick_interval``, default 0.5 s) it checks each watched lock's
hold age against ``hold_timeout`` and its oldest waiter against
``wait_timeout``, and a fork stuck in its before-hooks against
``fork_timeout``. A breach is one incident: logged once, with the holder's
identity and the holder's and waiters' stacks, counted, and acted on by
``on_timeout`` (warn; raise, which the waiter itself does in ``acquire``;
kill). Then the tick callbacks run (the state file's heartbeat).

The thread is a daemon thread; a forked child starts its own.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from . import fork, logs
from .evidence import lock_evidence, thread_stack
from .lock import WatchedLock, policy, watched_locks

__all__ = ["Watchdog", "add_tick_callback"]

_log = logs.get_logger(logger="h5watch.watchdog")
_tick_callbacks: list[Callable[[], None]] = []


def add_tick_callback(callback: Callable[[], None]) -> None:
    """Run ``callback()`` in the watchdog thread after every tick's checks."""
    if callback not in _tick_callbacks:
        _tick_callbacks.append(callback)


class Watchdog:
    snapshot_key = "watchdog"

    def __init__(self) -> None:
        self.options: Any = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._fork_reported: int | None = None
        self.ticks = 0
        fork.add_child_callback(self._restart_in_child)

    # -- lifecycle ---------------------------------------------------------

    def start(self, options: Any) -> None:
        self.options = options
        policy.on_wait_timeout = self._on_wait_raised
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="h5watch-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        policy.on_wait_timeout = None
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _restart_in_child(self) -> None:
        if self.options is None or self._thread is None:
            return
        limbo = threading._active_limbo_lock  # type: ignore[attr-defined]
        if not limbo.acquire(False):
            # A fork that skipped the hooks, taken while another thread was
            # starting or ending: threading's own lock is orphaned too.
            _log.warning("watchdog.not_restarted", reason="threading's internal lock is held by a dead thread")
            self._thread = None
            return
        limbo.release()
        self._thread = None
        self._fork_reported = None
        self.start(self.options)

    def snapshot(self) -> dict[str, Any]:
        thread = self._thread
        return {"running": bool(thread is not None and thread.is_alive()), "ticks": self.ticks}

    # -- the loop ----------------------------------------------------------

    def _run(self) -> None:
        stop = self._stop
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
