"""This process's flight recorder: notable lock events, in its state file.

What is recorded (kinds in ``schema.RECORDER_KINDS``): blocked waits and
holds of a watched lock at least ``recorder_threshold`` long (their lock's
slow path and release step call in, see ``lock.connect``), forks and their
wait, the child's start, wait, hold and fork timeouts, orphans, deadlocks,
and garbage collections at least the threshold long that ran while
``phil`` was held.

The ring (``h5watch.recorder``) lives in a private buffer until the state
file exists, then in the file's mapping, where the daemon, ``h5watch
status`` and ``h5watch dump`` read it even when this process is frozen.
Writing takes no lock. A forked child starts a ring of its own, whose first
entry says whose child it is; the child of a fork that skipped Python's
hooks writes nothing (its ring would be its parent's) until its h5watch
notices the fork.
"""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol

from h5watch import recorder
from h5watch.schema import RECORDER_LOG_ENTRIES, RECORDER_THRESHOLD_SECONDS, RECORDER_VIEW_ENTRIES

__all__ = ["FlightRecorder", "Recorder", "current_thread"]

_monotonic_ns = time.monotonic_ns


def current_thread() -> tuple[int | None, str | None]:
    """(native id, name) of the calling thread."""
    thread = threading.current_thread()
    return getattr(thread, "native_id", None) or threading.get_native_id(), thread.name


if TYPE_CHECKING:  # interfaces for the type checker only: each Protocol class made costs start-up about 0.05 ms
    class Recorder(Protocol):
        """The flight recorder as the other parts see it (``FlightRecorder``)."""

        def record(self, kind: str, *, lock: str | None = None, operation: str | None = None, duration_ns: int = 0,
                   extra: int = 0, thread: tuple[int | None, str | None] | None = None) -> None:
            """One entry of ``kind`` (schema.RECORDER_KINDS); never raises."""

        def records_above(self, duration_ns: int) -> bool:
            """Is a hold, wait or collection this long recorded?"""

        def tail(self, limit: int = RECORDER_LOG_ENTRIES) -> list[dict[str, Any]]:
            """The newest entries, oldest first, for a log event."""


class FlightRecorder:
    """Writes this process's ring; every method is safe on any thread, in
    an at-fork hook, in a signal-free garbage-collection callback, and
    never raises."""

    snapshot_key = "recorder"

    def __init__(self) -> None:
        self._ring: recorder.Ring | None = recorder.Ring()
        self._pid = os.getpid()
        self._in_file = False
        # Holds, waits and collections shorter than this are not recorded (None: none are).
        self.threshold_ns: int | None = int(RECORDER_THRESHOLD_SECONDS * 1e9)

    # -- lifecycle (runtime) -------------------------------------------------

    def start(self, options: Any) -> None:
        threshold = options.recorder_threshold
        self.threshold_ns = None if threshold is None else int(threshold * 1e9)

    def stop(self) -> None:
        """Entries already written stay; new ones keep coming only from the
        parts still running (none once uninstalled)."""

    def attach(self, region: Any, empty: bool = False) -> None:
        """The state file exists: from now on the ring is ``region``, its
        mapping (``empty``: a new file's, not read)."""
        try:
            self._ring = self._own_ring().moved_to(region, 0, empty)
            self._in_file = True
        except Exception:  # never a failure of the state file's creation
            pass

    def after_fork_in_child(self, lazily: bool = False) -> None:
        """A ring of the child's own (its parent's mapping is shared memory),
        starting with who forked it; the state file, made next, takes it over.
        ``lazily`` (subprocess's child, which execs at once): made by the
        child's first entry, if any."""
        self._ring = None
        self._pid = os.getpid()
        self._in_file = False
        if not lazily:
            self._own_ring()

    def _own_ring(self) -> recorder.Ring:
        ring = self._ring
        if ring is None:
            ring = self._ring = recorder.Ring()
            self.record("forked", extra=os.getppid(), operation="a fork's child")
        return ring

    # -- writing -----------------------------------------------------------

    def record(self, kind: str, *, lock: str | None = None, operation: str | None = None, duration_ns: int = 0,
               extra: int = 0, thread: tuple[int | None, str | None] | None = None) -> None:
        """One entry; ``thread``: (native id, name), the calling thread's by default."""
        if os.getpid() != self._pid:
            return  # the child of a fork that skipped Python's hooks: the ring is its parent's
        try:
            native_id, name = current_thread() if thread is None else thread
            self._own_ring().write(kind, _monotonic_ns(), time.time(), native_id, name, lock, operation, duration_ns, extra)
        except Exception:
            pass

    def long_wait(self, lock_name: str, waited_ns: int, behind: str | None, waiters: int) -> None:
        self.record("wait", lock=lock_name, operation=behind, duration_ns=waited_ns, extra=waiters)

    def long_hold(self, lock_name: str, held_ns: int, operation: str | None, waiters: int) -> None:
        self.record("hold", lock=lock_name, operation=operation, duration_ns=held_ns, extra=waiters)

    def records_above(self, duration_ns: int) -> bool:
        threshold = self.threshold_ns
        return threshold is not None and duration_ns >= threshold

    # -- reading -----------------------------------------------------------

    def tail(self, limit: int = RECORDER_LOG_ENTRIES) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, oldest first (for a log event)."""
        ring = self._ring
        if ring is None:
            return []
        try:
            return ring.entries(limit)
        except Exception:
            return []

    def snapshot(self) -> dict[str, Any]:
        return {"threshold_seconds": None if self.threshold_ns is None else self.threshold_ns / 1e9,
                "in_state_file": self._in_file, "entries": self.tail(RECORDER_VIEW_ENTRIES)}
