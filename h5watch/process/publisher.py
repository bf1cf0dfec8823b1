"""Keeps this process's state file current, and lets outsiders dump its stacks.

Started when h5watch activates (h5py imported, or a ``WatchedLock`` made)
with ``state_files`` on. The file (and its stacks file) is made then, so
that every count is in it from the start (see ``h5watch.statefile``), and
written:

- every watchdog tick: every lock record, then the header (the heartbeat);
- from a lock's slow path, when a thread starts to block on it: at once
  when no watchdog is ticking, else when more threads wait for the lock
  than its record in the file shows (so a crowd forming is in the file as
  it forms, while under steady contention, thousands of waits a second
  that come and go, the ticks write who waits);
- at once, when a forked child finds an orphaned lock (before its policy:
  a killed child leaves the evidence behind);
- when the watchdog stops for a fork: a last write, marked "watchdog not
  running" (the daemon then judges the process by its records alone);
- at exit: a last write marked ``exited``.

A forked child never writes its parent's file (the parent's mapping is
shared memory): it drops its copy of the mapping and of the stacks file
descriptor, and makes its own file at once, unless the fork was
``subprocess``'s (its ``preexec_fn`` child execs, and leaves no file) or
skipped Python's hooks (then nothing of h5watch runs there until a wait).
``faulthandler`` is registered for ``DUMP_SIGNAL`` on a per-process
stacks file, so the daemon can read every thread's Python stack even when
they are all blocked in C.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol

from h5watch import logs
from h5watch.process import lock_order
from h5watch.process.lock import WatchedLock, watched_locks
from h5watch.process.stats import ForkStats
from h5watch.records import Holder, LockRecord, ProcessStatus, running_versions
from h5watch.statedir import create_file_at, prune_unread, user_dir_path
from h5watch.statefile import DUMP_SIGNAL, StateDirError, StateFileError, StateWriter, ensure_state_dir

# Dead processes' files kept in a directory no daemon reads (see prune_unread).
KEEP_UNREAD_DEAD = 1000

__all__ = ["StatePublisher", "DUMP_SIGNAL", "lock_record"]


_log = logs.get_logger(logger="h5watch.state")


if TYPE_CHECKING:  # interfaces for the type checker only: each Protocol class made costs start-up about 0.05 ms
    from collections.abc import Iterator

    class Forks(Protocol):
        """The fork state the publisher reads (``fork.ForkGuard``)."""

        @property
        def stats(self) -> ForkStats: ...
        def in_progress_since_ns(self) -> int | None: ...
        def child_of_unhooked_fork(self) -> bool: ...
        def fork_for_exec(self) -> bool: ...


    class WatchdogStatus(Protocol):
        def running(self) -> bool: ...
        def deadlocks_by_kind(self) -> tuple[int, ...]: ...
        def threads_in_deadlock(self) -> int: ...


    class RingHolder(Protocol):
        """The flight recorder (``flight.FlightRecorder``), which moves its ring
        into each state file this process makes."""

        def attach(self, region: Any, empty: bool = False) -> None: ...


class StatePublisher:
    """Writes this process's state file; driven by the watchdog's heartbeat,
    the locks' slow paths and the fork path (see ``runtime``)."""

    snapshot_key = "state"

    def __init__(self, forks: Forks, watchdog: WatchdogStatus, recorder: RingHolder | None = None) -> None:
        self._forks = forks
        self._watchdog = watchdog
        self._recorder = recorder
        self.options: Any = None
        self.writer: StateWriter | None = None
        self._stacks_fd: int | None = None
        self._exit_registered = False
        self._enabled = False
        # The pid whose attempt to create its file failed (logged once, not retried).
        self._failed_pid: int | None = None
        self._open_lock = threading.Lock()
        # The file does not name the h5py and HDF5 versions yet (h5py not imported yet).
        self._versions_pending = True
        # Per lock (its _seq): how many waiters its record in the file shows.
        self._waiters_shown: dict[int, int] = {}
        # In subprocess's child: its parent's writer, kept unclosed until the exec.
        self._parent_writer: StateWriter | None = None

    def start(self, options: Any) -> None:
        self.options = options
        if not options.state_files:
            self.stop()
            return
        writer = self.writer
        if writer is not None and writer.owned_here() and user_dir_path(options.state_dir) != writer.directory:
            # The file lives as long as the process image: its counters are
            # in it, and a second file would count them twice.
            _log.warning("state.dir_kept", state_dir=options.state_dir, path=writer.path,
                         hint="a process keeps its first state file until it exits")
        self._enabled = True
        self._failed_pid = None
        if writer is not None and writer.owned_here() and self._stacks_fd is None:
            self._register_dump(writer.stacks_path)
        # The file is made now, not at the first tick: from here on every
        # count is in it, whatever ends the process.
        self._writer(create=True)
        if not self._exit_registered:
            self._exit_registered = True
            atexit.register(self._at_exit)

    def stop(self) -> None:
        """Stop writing. The file stays until the process exits (or execs):
        the locks count in it still, and the daemon keeps their totals."""
        self._enabled = False
        writer = self.writer
        if writer is not None and writer.owned_here():
            self._write_all(writer)
        self._unregister_dump()

    def snapshot(self) -> dict[str, Any]:
        writer = self.writer
        return {"path": writer.path if writer else None, "stacks_path": writer.stacks_path if writer else None,
                "dump_signal": DUMP_SIGNAL if writer else None}

    # -- writing -------------------------------------------------------------

    def beat(self) -> None:
        """The watchdog's heartbeat: every record, then the header."""
        self._write_all(self._writer(create=True))

    def watchdog_stopped(self) -> None:
        """Rewrite an existing file as it is now (the watchdog is stopping)."""
        self._write_all(self._writer(create=False))

    def _write_all(self, writer: StateWriter | None) -> None:
        if writer is None:
            return
        if self._versions_pending:
            self._versions_pending = not _set_versions(writer)
        writer.write_all(self._lock_records(watched_locks()), self._status())

    def _lock_records(self, locks: list[WatchedLock]) -> Iterator[LockRecord]:
        """Each lock's record, made as the writer takes it."""
        shown: dict[int, int] = {}
        for lock in locks:
            record = lock_record(lock)
            shown[record.seq] = len(record.waiters)
            yield record
        self._waiters_shown = shown

    def _status(self) -> ProcessStatus:
        return ProcessStatus(watchdog_running=self._watchdog.running(), fork_since_ns=self._forks.in_progress_since_ns(),
                             deadlocks=self._watchdog.deadlocks_by_kind(), order_inversions=lock_order.inversions(),
                             threads_in_deadlock=self._watchdog.threads_in_deadlock())

    def lock_waited(self, lock: WatchedLock) -> None:
        writer = self._writer(create=True)
        if writer is None:
            return
        if self._watchdog.running() and len(lock._waiters) <= self._waiters_shown.get(lock._seq, 0):
            return  # the next tick writes who waits now
        record = lock_record(lock)
        self._waiters_shown[lock._seq] = len(record.waiters)
        writer.write_one(record)

    def lock_created(self, lock: WatchedLock) -> None:
        writer = self.writer
        if writer is not None and writer.owned_here():
            writer.attach_locks([lock_record(lock)])

    def orphan_acted_on(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        writer = self._writer(create=True)
        if writer is not None:
            writer.write_one(lock_record(lock, orphan=evidence))
            self._write_all(writer)

    def _at_exit(self) -> None:
        # Nothing may make or adopt a file after this (a tick on another thread
        # would clear the exited mark the daemon relies on).
        enabled, self._enabled = self._enabled, False
        failed, self._failed_pid = self._failed_pid == os.getpid(), os.getpid()
        writer = self.writer if self.writer is not None and self.writer.owned_here() else None
        if writer is None and enabled and not failed and self.options is not None and _used_a_watched_lock():
            writer = self._open_now(dumps=False)
        if writer is not None:
            self._write_all(writer)
            writer.close(exited=True)
            self.writer = None

    # -- per process -----------------------------------------------------------

    def _writer(self, create: bool, dumps: bool = True) -> StateWriter | None:
        """This process's writer; with ``create``, made now if it has none yet
        (with ``dumps``, with its stacks file: not for a last write at exit)."""
        writer = self.writer
        if writer is not None:
            # A child forked without Python's hooks still holds its parent's
            # until its child callbacks run: never write that one.
            return writer if writer.owned_here() else None
        if not create or not self._enabled or self._failed_pid == os.getpid():
            return None
        with self._open_lock:
            if self.writer is None and self._enabled and self._failed_pid != os.getpid():
                self._open(dumps)
        return self.writer

    def _open_now(self, dumps: bool) -> StateWriter | None:
        with self._open_lock:
            if self.writer is None:
                self._open(dumps)
        return self.writer

    def _open(self, dumps: bool) -> None:
        try:
            # This user's own directory, <state_dir>/<uid>, opened once and checked.
            directory = ensure_state_dir(self.options.state_dir)
            writer = StateWriter(directory, self.options.service, DUMP_SIGNAL, self.options.tick_interval,
                                 self.options.wait_timeout, self.options.hold_timeout)
        except (StateDirError, StateFileError, OSError) as exc:
            self._failed_pid = os.getpid()
            _log.error("state.unavailable", state_dir=self.options.state_dir, error=str(exc))
            return
        self._versions_pending = not _set_versions(writer)
        if self._recorder is not None:
            self._recorder.attach(writer.recorder_region(), empty=not writer.adopted)
        writer.attach_forks(self._forks.stats)
        writer.attach_locks([lock_record(lock) for lock in watched_locks()])
        # Whether the watchdog runs, from the start: the heartbeat is the
        # file's making until its first tick, so a process that freezes
        # before that tick (a thread keeping the GIL in C) is stuck by its
        # heartbeat too, not a process with no watchdog to judge by.
        writer.write_header(self._status(), beat=False)
        try:
            pruned = prune_unread(directory, KEEP_UNREAD_DEAD)
        except OSError:
            pruned = 0
        if pruned:
            _log.warning("state.pruned", state_dir=directory, removed=pruned, kept=KEEP_UNREAD_DEAD,
                         hint="no h5watch daemon reads this directory: dead processes' files were removed unfolded")
        if dumps:
            self._register_dump(writer.stacks_path)
        self.writer = writer

    def after_fork_in_child(self) -> None:
        """After a fork, in the child: its own file, made at once unless the
        fork was subprocess's (or skipped Python's hooks)."""
        self._open_lock = threading.Lock()
        self._waiters_shown = {}
        self._failed_pid = None
        old, self.writer = self.writer, None
        if self._forks.fork_for_exec():
            # subprocess's child execs at once, which unmaps the parent's file
            # and closes its descriptors: set aside, not closed here (it only
            # makes a file of its own if preexec_fn finds an orphan).
            self._parent_writer = old
            return
        if old is not None:
            # The parent's mapping and file: dropped unwritten (closing the
            # mapping here unmaps the child's view only).
            old.close(exited=False)
        self._unregister_dump()
        if self._enabled and not self._forks.child_of_unhooked_fork():
            # The child's own file at once (its counts start now).
            self._writer(create=True)

    def _register_dump(self, path: str) -> None:
        try:
            fd = create_file_at(path, os.O_WRONLY | os.O_APPEND)  # O_EXCL: never through a planted link
        except OSError as exc:
            _log.warning("state.no_stack_dumps", error=str(exc))
            return
        try:
            # A descriptor, not a file object: nothing to flush or finalise.
            faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True, chain=False)
        except (OSError, ValueError, RuntimeError) as exc:
            os.close(fd)
            _log.warning("state.no_stack_dumps", error=str(exc))
            return
        self._stacks_fd = fd

    def _unregister_dump(self) -> None:
        """Unregister the dump handler, then close the stacks file (a forked
        child closes only its own copy of the descriptor)."""
        fd, self._stacks_fd = self._stacks_fd, None
        if fd is None:
            return
        try:
            faulthandler.unregister(DUMP_SIGNAL)
        except (ValueError, RuntimeError):
            pass
        try:
            os.close(fd)
        except OSError:
            pass


def _set_versions(writer: StateWriter) -> bool:
    """Name what this process runs in its file; False while h5py's version is unknown."""
    versions = running_versions()
    writer.set_versions(versions)
    return bool(versions["h5py_version"])


def _used_a_watched_lock() -> bool:
    """Did this process acquire any watched lock (since its fork, in a child)?"""
    for lock in watched_locks():
        try:
            if lock.stats.snapshot()["acquisitions"]:
                return True
        except Exception:
            continue
    return False


def lock_record(lock: WatchedLock, orphan: dict[str, Any] | None = None) -> LockRecord:
    """``lock`` as the state file records it now; an orphan (``orphan``, else
    the lock's own) shows its dead holder."""
    orphan = orphan or lock._orphan_evidence()
    holder = lock._holder_record()
    if orphan is not None:
        dead = orphan.get("holder") or {}
        holder = Holder(dead.get("pid"), dead.get("thread_ident"), dead.get("thread_name"), dead.get("native_id"),
                        dead.get("operation"), dead.get("since_ns"), dead.get("depth") or 0)
    return LockRecord(lock._seq, lock.name, holder, orphan is not None, lock._waiter_records(), lock.stats, weakref.ref(lock))
