"""The typed records a process hands its state file: what the writer takes.

A process turns each watched lock into a :class:`LockRecord` at the moment it
writes (``h5watch.process.publisher``); the writer (``h5watch.statefile``)
never sees a lock object. Public results (``snapshot()``, log events) stay
plain data.
"""

from __future__ import annotations

import collections
import platform
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

__all__ = ["CounterSource", "ForkCounters", "Holder", "LockRecord", "OperationRecord", "ProcessStatus", "Record", "Waiter",
           "running_versions"]

if TYPE_CHECKING:
    from typing import NamedTuple as Record
else:
    class _RecordMeta(type):
        """``typing.NamedTuple``'s class syntax, made into a plain
        ``collections.namedtuple`` without checking each field's annotation
        (which compiles every string annotation: about 10 us a field, paid
        by every instrumented process when h5py is imported)."""

        def __new__(mcs, name, bases, namespace):
            if not bases:
                return super().__new__(mcs, name, bases, namespace)
            if "__classcell__" in namespace:
                raise TypeError(f"{name}: a record's methods cannot use super() or __class__")
            annotations = namespace.get("__annotations__", {})
            fields = list(annotations)
            defaults = [namespace[field] for field in fields if field in namespace]
            if any(field not in namespace for field in fields[len(fields) - len(defaults):]):
                raise TypeError(f"{name}: a field without a default follows one with a default")
            record = collections.namedtuple(name, fields, defaults=defaults, module=namespace["__module__"])
            for key, value in namespace.items():
                if key not in annotations and key not in ("__module__", "__qualname__", "__annotations__"):
                    setattr(record, key, value)
            record.__qualname__ = namespace.get("__qualname__", name)
            record.__annotations__ = annotations
            return record

    Record = _RecordMeta("Record", (), {})


if TYPE_CHECKING:  # interfaces for the type checker only: each Protocol class made costs start-up about 0.05 ms
    class CounterSource(Protocol):
        """Counters that can move into the state file's shared memory
        (``h5watch.process.stats``): from then on they are counted there."""

        def move_to(self, target: memoryview, table: tuple[memoryview, memoryview] | None = None) -> bool:
            """Count in ``target`` from now on; False while the move must wait (a
            busy pure-Python lock: its holder moves them at its release)."""


    class ForkCounters(Protocol):
        """The process's fork counters (``h5watch.process.stats.ForkStats``)."""

        def move_to(self, target: memoryview, add: bool = False) -> None:
            """Count in ``target`` from now on; with ``add``, on top of what it holds."""


class Holder(Record):
    """Who holds a lock: its live holder, or an orphan's dead one."""

    pid: int | None
    thread_ident: int | None
    thread_name: str | None
    native_id: int | None
    operation: str | None
    # Monotonic ns the hold began; None when unknown (seen by the probe only).
    since_ns: int | None
    depth: int


class Waiter(Record):
    thread_ident: int
    thread_name: str | None
    native_id: int | None
    # Monotonic ns the wait began.
    since_ns: int


class LockRecord(Record):
    """One watched lock as of one moment."""

    # The lock's sequence number: one per lock instance in this process.
    seq: int
    name: str
    holder: Holder | None
    orphaned: bool
    # Oldest first.
    waiters: tuple[Waiter, ...]
    counters: CounterSource
    # A weak reference to the lock: None once it is collected (its record is
    # then retired). Not whether a write missed it: a lock made meanwhile is
    # in no earlier list of locks.
    lock_ref: Callable[[], object | None]


class OperationRecord(Record):
    """One operation's share of one lock (contention by operation): its
    outermost holds, the waits of other threads during them, and its own
    blocked waits. Times in ns."""

    lock: str
    operation: str
    holds: int
    hold_sum_ns: int
    hold_max_ns: int
    caused_wait_sum_ns: int
    waits: int
    wait_sum_ns: int

    def to_plain(self) -> dict[str, Any]:
        return {"operation": self.operation, "holds": self.holds, "hold_seconds": self.hold_sum_ns / 1e9,
                "hold_max_seconds": self.hold_max_ns / 1e9, "caused_wait_seconds": self.caused_wait_sum_ns / 1e9,
                "waits": self.waits, "wait_seconds": self.wait_sum_ns / 1e9}

    def plus(self, other: OperationRecord) -> OperationRecord:
        """The two as one (sums, and the longer hold)."""
        return self._replace(holds=self.holds + other.holds, hold_sum_ns=self.hold_sum_ns + other.hold_sum_ns,
                             hold_max_ns=max(self.hold_max_ns, other.hold_max_ns),
                             caused_wait_sum_ns=self.caused_wait_sum_ns + other.caused_wait_sum_ns,
                             waits=self.waits + other.waits, wait_sum_ns=self.wait_sum_ns + other.wait_sum_ns)


class ProcessStatus(Record):
    """What the header says about the process besides its identity."""

    watchdog_running: bool
    # Monotonic ns the fork under way started, or None.
    fork_since_ns: int | None
    # Deadlocks reported, in DEADLOCK_KINDS order; lock-order inversions
    # reported; threads in a reported deadlock that is still there.
    deadlocks: tuple[int, ...] = (0, 0, 0, 0)
    order_inversions: int = 0
    threads_in_deadlock: int = 0


def running_versions() -> dict[str, str]:
    """What this process runs, for its state file and ``h5watch_build_info``:
    h5watch and Python, and h5py and HDF5 once h5py is imported ("" before;
    never imported from here: install() may precede that import)."""
    from h5watch import __version__

    version = getattr(sys.modules.get("h5py"), "version", None)
    return {"h5watch_version": __version__, "python_version": platform.python_version(),
            "h5py_version": str(getattr(version, "version", "")), "hdf5_version": str(getattr(version, "hdf5_version", ""))}
