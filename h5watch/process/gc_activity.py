"""Garbage collections, as the watchdog and the deadlock detector need them.

A ``gc.callbacks`` entry notes which thread is collecting and since when: an
h5py object's deallocation takes ``phil`` at C level, so a thread in a
collection may be waiting for ``phil`` where no wrapper sees it (the
deadlock detector reads this). A collection at least the flight recorder's
threshold long that ran while ``phil`` was held is recorded. And each
collection's start calls the watchdog back (a stopped watchdog starts again
once the program has a second thread).

Loaded when h5watch starts watching; the detector itself is loaded on the
watchdog's first tick.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from h5watch.process.lock import thread_label

if TYPE_CHECKING:
    from h5watch.process.deadlock import RealPhil
    from h5watch.process.flight import Recorder

__all__ = ["GcActivity"]


class GcActivity:
    """Which thread is collecting garbage, and since when (a few field
    writes per collection, on the collecting thread); and, to the flight
    recorder, each collection at least its threshold long that ran while
    ``phil`` was held."""

    def __init__(self, real_phil: RealPhil | None = None, recorder: Recorder | None = None) -> None:
        self.collecting_ident: int | None = None
        self.since_ns = 0
        # Called as each collection begins (the watchdog's wake_if_threaded).
        self.on_start: Callable[[], None] | None = None
        self._real_phil = real_phil
        self._recorder = recorder
        # phil's holder (ident) as the collection began, or None.
        self._phil_owner: int | None = None

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self.since_ns = time.monotonic_ns()
            self.collecting_ident = threading.get_ident()
            phil = self._real_phil.watched if self._real_phil is not None else None
            self._phil_owner = phil._owner if phil is not None else None
            if self.on_start is not None:
                try:
                    self.on_start()
                except Exception:  # never an error in the program's collection
                    pass
        else:
            self.collecting_ident = None
            if self._phil_owner is not None and self._recorder is not None:
                self._record(info)

    def _record(self, info: dict[str, int]) -> None:
        recorder = self._recorder
        took_ns = time.monotonic_ns() - self.since_ns
        if recorder is None or not recorder.records_above(took_ns):
            return
        owner = self._phil_owner
        phil = self._real_phil.watched if self._real_phil is not None else None
        who = "this thread" if owner == threading.get_ident() else repr(thread_label(owner)) if owner is not None else "?"
        operation = phil._operation if phil is not None and phil._owner == owner else None
        recorder.record("gc_under_phil", lock=phil.name if phil is not None else None, duration_ns=took_ns,
                        operation=f"phil held by {who}" + (f" in {operation}" if operation else ""),
                        extra=int(info.get("generation", -1)))

    def start(self, on_start: Callable[[], None] | None = None) -> None:
        self.on_start = on_start
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def stop(self) -> None:
        while self in gc.callbacks:
            gc.callbacks.remove(self)

    def after_fork_in_child(self) -> None:
        # The collecting thread, if any, did not survive the fork.
        self.collecting_ident = None

    def collecting(self) -> tuple[int, int] | None:
        """(thread ident, monotonic ns the collection began), or None."""
        ident, since_ns = self.collecting_ident, self.since_ns
        return None if ident is None else (ident, since_ns)
