"""The per-process watchdog thread: timeouts, incidents, heartbeats.

Every tick (``tick_interval``, default 0.5 s) it checks each watched lock's
hold age against ``hold_timeout`` and its oldest waiter against
``wait_timeout``, and a fork stuck in its before-hooks against
``fork_timeout``. A breach is one incident: logged once, with the holder's
identity and the holder's and waiters' stacks, counted, and acted on by
``on_timeout`` (warn; raise, which the waiter itself does in ``acquire``;
kill). Then the deadlock detector (``deadlock``) reads the wait-for graph,
with or without a timeout configured, and acts by ``on_deadlock``. Then the
heartbeat (the state file's write) runs.

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
  lock, when a garbage collection begins while the program has a second
  thread, or when ``install()`` changes an option; never in a child whose fork skipped
  Python's hooks (its ``threading`` is not re-initialised).

subprocess's ``preexec_fn`` fork is told from the others by the Python frame
that forks (``subprocess.Popen._execute_child``): it does not warn, and its
child execs. Nothing is hooked per thread start (an audit hook would: every
audited event, ``id()`` included, would call into Python) and nothing of
``threading`` is patched. The thread is a daemon thread.
"""

from __future__ import annotations

import gc
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from h5watch import logs
from h5watch.process.evidence import lock_evidence, thread_stack
from h5watch.process.lock import WatchedLock, watched_locks
from h5watch.schema import DEADLOCK_KINDS

if TYPE_CHECKING:
    from _thread import LockType
    from collections.abc import Callable

    from h5watch.process.deadlock import DeadlockDetector
    from h5watch.process.flight import Recorder
    from h5watch.process.gc_activity import GcActivity

__all__ = ["Forks", "Heartbeat", "Watchdog"]

_log = logs.get_logger(logger="h5watch.watchdog")

# Where os.fork() warns about other threads.
FORK_WARNS_ABOUT_THREADS = sys.version_info >= (3, 12)
# How long a fork may wait for the watchdog to finish its tick and exit.
_STOP_FOR_FORK_SECONDS = 1.0
# A tick starts only while this many more allocations cannot start a garbage
# collection (see Watchdog._wait_for_gc_headroom): a routine tick's objects
# alive at once are about 45, whatever the number of locks and operations.
GC_HEADROOM = 100
_GC_HEADROOM_POLL_SECONDS = 0.005
# How long a tick waits for that at most: one tick_interval, within these.
_GC_HEADROOM_WAIT_SECONDS = (0.05, 1.0)


if TYPE_CHECKING:  # interfaces for the type checker only: each Protocol class made costs start-up about 0.05 ms
    class Forks(Protocol):
        """The fork state the watchdog reads (``fork.ForkGuard``)."""

        def in_progress_since_ns(self) -> int | None: ...
        def stall_limit_seconds(self, fork_timeout: float) -> float: ...
        def child_of_unhooked_fork(self) -> bool: ...
        def fork_for_exec(self) -> bool: ...
        def check_orphan_waiters(self) -> None: ...
        def excluding_forks(self) -> LockType: ...


    class Heartbeat(Protocol):
        """What the watchdog drives (the state publisher)."""

        def beat(self) -> None:
            """After every tick's checks, on the watchdog thread."""

        def watchdog_stopped(self) -> None:
            """The watchdog stops ticking in a live process (before a fork), on
            the thread that stopped it."""


class Watchdog:
    snapshot_key = "watchdog"

    def __init__(self, forks: Forks, heartbeat: Heartbeat, gc_activity: GcActivity | None = None,
                 make_deadlock_detector: Callable[[], DeadlockDetector] | None = None,
                 recorder: Recorder | None = None) -> None:
        self.options: Any = None
        self._forks = forks
        self._heartbeat = heartbeat
        self._gc_activity = gc_activity
        # The detector is made at the first tick (see _deadlock_detector).
        self._make_deadlock_detector = make_deadlock_detector
        self._deadlocks: DeadlockDetector | None = None
        self._recorder = recorder
        self._thread: threading.Thread | None = None
        # The process that started _thread: a child forked without Python's
        # hooks still holds its parent's Thread object, whose thread is gone.
        self._thread_pid = 0
        self._stop = threading.Event()
        self._fork_reported: int | None = None
        # Incidents already reported: {(lock's sequence number, kind, ident, since_ns)}.
        self._reported: set[tuple[int, str, int, int]] = set()
        self.ticks = 0
        # Between start() and stop(): this process wants a watchdog (running or not).
        self._enabled = False
        # Serialises starting and stopping the thread.
        self._lifecycle = threading.Lock()

    # -- lifecycle ---------------------------------------------------------

    def start(self, options: Any) -> None:
        self.options = options
        self._enabled = True
        if self._gc_activity is not None:
            self._gc_activity.start(self.wake_if_threaded)
        with self._lifecycle:
            self._start_thread()

    def stop(self) -> None:
        self._enabled = False
        self._stop.set()
        if self._gc_activity is not None:
            self._gc_activity.stop()
        thread, self._thread = self._thread, None
        if thread is not None and self._thread_pid == os.getpid() and thread is not threading.current_thread():
            thread.join(5)

    def wake(self) -> None:
        """A thread blocks on a watched lock: start the watchdog if it is not
        running (cheap when it is)."""
        if self._thread is not None or not self._enabled:
            return
        if self._forks.in_progress_since_ns() is not None:
            return  # on the forking thread, inside the at-fork hooks
        if not self._lifecycle.acquire(False):
            return  # being started or stopped right now
        try:
            self._start_thread()
        finally:
            self._lifecycle.release()

    def wake_if_threaded(self) -> None:
        """A garbage collection begins, on any thread: a watchdog stopped for a
        fork starts again once the program has a thread besides this one (a
        deadlock needs two; a wait for a watched lock wakes it too, but a
        deadlock under garbage collection has none)."""
        if self._thread is not None or not self._enabled:
            return
        # threading's own table lock (a Lock before 3.12, an RLock since) may
        # be held right now, by this very thread (a collection inside
        # Thread.start) or another: then try again at the next collection.
        limbo = threading._active_limbo_lock  # type: ignore[attr-defined]
        if not limbo.acquire(False):
            return
        try:
            threads = len(threading._active) + len(threading._limbo)  # type: ignore[attr-defined]
        finally:
            limbo.release()
        if threads >= 2:
            self.wake()

    def _start_thread(self) -> None:
        """Start the thread unless it runs; the caller holds ``_lifecycle``."""
        if self._thread is not None or not self._enabled or self._forks.child_of_unhooked_fork():
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

    def before_fork(self) -> None:
        """On the forking thread, before h5watch takes the locks for the fork:
        leave a single-threaded program single-threaded for the fork."""
        thread = self._thread
        options = self.options
        if not FORK_WARNS_ABOUT_THREADS or self._forks.fork_for_exec() or thread is None or not self._enabled or options is None:
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
        try:
            self._heartbeat.watchdog_stopped()
        except Exception as exc:
            _log.error("watchdog.callback_failed", error=repr(exc))

    def after_fork_in_child(self) -> None:
        """After a fork, in the child: only the forking thread survived."""
        self._lifecycle = threading.Lock()
        self._thread = None
        self._fork_reported = None
        self._reported.clear()
        self.ticks = 0
        if self._gc_activity is not None:
            self._gc_activity.after_fork_in_child()
        if self._deadlocks is not None:
            self._deadlocks.after_fork_in_child()
        if not self._forks.fork_for_exec() and self._enabled and self.options is not None:
            # It goes on running Python: watched like its parent. subprocess's
            # preexec_fn child is woken on demand, or execs.
            self._start_thread()

    def running(self) -> bool:
        thread = self._thread
        return thread is not None and self._thread_pid == os.getpid() and thread.is_alive()

    def snapshot(self) -> dict[str, Any]:
        deadlocks = self._deadlocks.snapshot() if self._deadlocks is not None else dict.fromkeys(DEADLOCK_KINDS, 0)
        return {"running": self.running(), "ticks": self.ticks, "deadlocks": deadlocks,
                "threads_in_deadlock": self.threads_in_deadlock()}

    def deadlocks_by_kind(self) -> tuple[int, ...]:
        """Deadlocks reported in this process, in ``DEADLOCK_KINDS`` order."""
        counts = self._deadlocks.counts if self._deadlocks is not None else {}
        return tuple(counts.get(kind, 0) for kind in DEADLOCK_KINDS)

    def threads_in_deadlock(self) -> int:
        return self._deadlocks.threads_in_deadlock if self._deadlocks is not None else 0

    # -- the loop ----------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        while not stop.wait(self.options.tick_interval):
            if self._wait_for_gc_headroom(stop):
                return
            try:
                self.tick()
            except Exception as exc:  # the watchdog must outlive its own bugs
                _log.error("watchdog.tick_failed", error=repr(exc))

    def _wait_for_gc_headroom(self, stop: threading.Event) -> bool:
        """Leave the program's garbage collections to the program's threads.

        A collection runs on the thread whose allocation takes the youngest
        generation past its threshold, and calls every finalizer there:
        h5py's take ``phil``. Run on this thread, one would take ``phil``
        from a thread the program does not know of, at a moment it never
        would without h5watch (a thread that has just let go of ``phil``
        could find it taken; a stuck holder would block the watchdog). So a
        tick waits while its own allocations could cross the threshold: a
        busy program collects within milliseconds. An idle one does not: the
        tick waits at most one more ``tick_interval`` (50 ms to 1 s), and
        its collection then leaves the next ticks their headroom; or, while
        a fork of this process waits for its locks, until that fork is done
        or overdue (see ``_fork_waiting``). True: stopped."""
        threshold = gc.get_threshold()[0]
        if not threshold or not gc.isenabled():
            return False
        shortest, longest = _GC_HEADROOM_WAIT_SECONDS
        give_up = time.monotonic() + min(max(self.options.tick_interval, shortest), longest)
        while gc.get_count()[0] + GC_HEADROOM > threshold and (time.monotonic() < give_up or self._fork_waiting()):
            if stop.wait(_GC_HEADROOM_POLL_SECONDS):
                return True
        return False

    def _fork_waiting(self) -> bool:
        """A fork of this process waits for its locks, within its bound.

        Its wait is when a program blocked behind ``phil`` allocates nothing,
        and a collection here would queue h5py's finalizers for ``phil``
        behind the fork: the fork's release would then give ``phil`` to this
        thread before the forking thread's program could take it again (as
        h5py's ``test_phil_fork_with_threads`` does at once). The ticks wait
        no longer than the fork may: it reports its own timeout, and a stall
        past its limit (another hook's wait) ends this, so a tick reports it."""
        started = self._forks.in_progress_since_ns()
        limit = self.options.fork_timeout
        if started is None or limit is None:
            return False
        return time.monotonic_ns() - started < self._forks.stall_limit_seconds(limit) * 1e9

    def tick(self) -> None:
        now_ns = time.monotonic_ns()
        locks = watched_locks()
        self._check_holds(locks, now_ns)
        self._check_waits(locks, now_ns)
        self._check_fork(now_ns)
        self._forks.check_orphan_waiters()
        deadlocks = self._deadlock_detector()
        if deadlocks is not None:
            deadlocks.check(self.options, self._beat)
        self.ticks += 1
        self._beat()

    def _deadlock_detector(self) -> DeadlockDetector | None:
        """Made at the first tick, not when the watchdog starts: a process that
        ends before it never loads the detector (about 0.7 ms of start-up).
        Its module is imported on this thread while no hooked fork can begin:
        a child forked in the middle would inherit the import half done, and
        its own watchdog would wait for it forever. A fork under way holds
        that off: then the next tick makes it (this one must not wait out
        the fork, whose stall it is here to report)."""
        if self._deadlocks is None and self._make_deadlock_detector is not None:
            exclusion = self._forks.excluding_forks()
            if exclusion.acquire(False):
                try:
                    self._deadlocks = self._make_deadlock_detector()
                finally:
                    exclusion.release()
        return self._deadlocks

    def _beat(self) -> None:
        try:
            self._heartbeat.beat()
        except Exception as exc:
            _log.error("watchdog.callback_failed", error=repr(exc))

    # -- checks ------------------------------------------------------------

    def _check_holds(self, locks: list[WatchedLock], now_ns: int) -> None:
        limit = self.options.hold_timeout
        if limit is None:
            return
        for lock in locks:
            holder = lock.holder(now_ns)
            if holder is None or holder["hold_age_seconds"] < limit:
                continue
            incident = (lock._seq, "hold", holder["thread_ident"], holder["since_ns"])
            if incident not in self._reported:
                self._reported.add(incident)
                self._incident(lock, "hold", "lock.hold_timeout", limit)

    def _check_waits(self, locks: list[WatchedLock], now_ns: int) -> None:
        limit = self.options.wait_timeout
        if limit is None or self.options.on_timeout == "raise":
            # With raise, each waiter reports its own timeout as it raises.
            return
        limit_ns = int(limit * 1e9)
        for lock in locks:
            overdue = [
                (lock._seq, "wait", ident, since_ns)
                for ident, since_ns in lock._wait_starts()
                if now_ns - since_ns >= limit_ns and (lock._seq, "wait", ident, since_ns) not in self._reported
            ]
            if overdue:
                self._reported.update(overdue)
                self._incident(lock, "wait", "lock.wait_timeout", limit, waiting_threads=[ident for _, _, ident, _ in overdue])

    def _check_fork(self, now_ns: int) -> None:
        """A fork still in its before-hooks past ``fork_timeout``: h5watch's hook is
        bounded, so this is another hook (h5py >= 3.14 takes phil with no timeout)."""
        started = self._forks.in_progress_since_ns()
        limit = self.options.fork_timeout
        if started is None or limit is None or self._fork_reported == started:
            return
        if now_ns - started < self._forks.stall_limit_seconds(limit) * 1e9:
            return
        self._fork_reported = started
        locks = [lock_evidence(lock) for lock in watched_locks() if lock.locked()]
        extra: dict[str, Any] = {}
        if self._recorder is not None:
            self._recorder.record("fork_stalled", operation="os.fork in another before-fork hook",
                                  duration_ns=now_ns - started, extra=len(locks), thread=(None, None))
            extra["recorder"] = self._recorder.tail()
        _log.error(
            "fork.stalled",
            fork_timeout=limit,
            waiting_seconds=(now_ns - started) / 1e9,
            locks=locks,
            **extra,
        )

    def _incident(self, lock: WatchedLock, kind: str, event: str, limit: float, **extra: Any) -> None:
        lock.stats.bump("timeouts", kind)
        evidence = lock_evidence(lock)
        self._record_timeout(lock, kind, evidence, extra.get("waiting_threads"))
        action = self.options.on_timeout
        if action == "kill":
            _log.critical(event, timeout=limit, action="killed", exit_code=self.options.kill_exit_code, **extra, **evidence)
            _log.critical("process.killed", reason=event, exit_code=self.options.kill_exit_code, lock=lock.name,
                          holder=evidence.get("holder"))
            self._beat()  # the last state-file write before the process exits
            os._exit(self.options.kill_exit_code)
        _log.error(event, timeout=limit, action=action, **extra, **evidence)

    def wait_timed_out(self, lock: WatchedLock, waited_ns: int) -> None:
        """Called on the waiting thread just before it raises ``LockTimeout``."""
        if self.options is None:
            return
        lock.stats.bump("timeouts", "wait")
        evidence = lock_evidence(lock)
        self._record_timeout(lock, "wait", evidence, [threading.get_ident()])
        evidence["waiter_stack"] = thread_stack(threading.get_ident())
        _log.error("lock.wait_timeout", timeout=self.options.wait_timeout, action="raised", waited_seconds=waited_ns / 1e9, **evidence)


    def _record_timeout(self, lock: WatchedLock, kind: str, evidence: dict[str, Any], waiting: list[int] | None) -> None:
        """The flight recorder's entry of a timeout (one per overdue waiter of
        a wait timeout), and its newest entries in the incident's evidence."""
        recorder = self._recorder
        if recorder is None:
            return
        holder = evidence.get("holder") or {}
        waiters = evidence.get("waiters") or []
        n_waiters = len(waiters) + (evidence.get("waiters_more") or 0)
        if kind == "hold":
            recorder.record("hold_timeout", lock=lock.name, operation=holder.get("operation"), extra=n_waiters,
                            duration_ns=int((holder.get("hold_age_seconds") or 0) * 1e9),
                            thread=(holder.get("native_id"), holder.get("thread_name")))
        else:
            for waiter in waiters:
                if waiting is None or waiter.get("thread_ident") in waiting:
                    recorder.record("wait_timeout", lock=lock.name, operation=holder.get("operation"), extra=n_waiters,
                                    duration_ns=int((waiter.get("wait_seconds") or 0) * 1e9),
                                    thread=(waiter.get("native_id"), waiter.get("thread_name")))
        evidence["recorder"] = recorder.tail()
