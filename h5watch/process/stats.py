"""Counters and log-scale histograms of one lock, and of forks.

Buckets are fixed for every process and every version of the state file: a
log scale from 1 us to 60 s with a boundary at each alert threshold of
``deploy/prometheus`` (0.1 s, 1 s, 5 s, 10 s, 30 s). Values are kept in
integer nanoseconds; bucketing is one ``bisect`` over a tuple.

Who writes: the fields of :class:`LockStats` that describe holds and waits
that ended in an acquisition are written only by the thread that holds the
lock, so the lock itself serialises them. The rare counters written by
threads that do not hold it (timeouts, orphans) go through :meth:`bump`,
which takes a small lock of its own.
"""

from __future__ import annotations

import struct
import threading
from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from h5watch.records import OperationRecord
from h5watch.schema import (
    BUCKET_BOUNDS_NS,
    C_ACQUISITIONS,
    C_CONTENTIONS,
    C_HOLD_BUCKETS,
    C_HOLD_MAX,
    C_HOLD_SUM,
    C_ORPHANS,
    C_REENTRIES,
    C_TIMEOUTS,
    C_WAIT_BUCKETS,
    C_WAIT_MAX,
    C_WAIT_SUM,
    COUNTERS_BYTES,
    N_BUCKETS,
    N_COUNTERS,
    N_OPERATION_WORDS,
    O_CAUSED_WAIT_SUM,
    O_HOLD_MAX,
    O_HOLD_SUM,
    O_HOLDS,
    O_WAIT_SUM,
    O_WAITS,
    OPERATION_NAME_BYTES,
    OPERATION_NAME_ENTRY,
    OPERATION_NAMED,
    OPERATION_OTHER,
    OPERATION_SLOTS,
    OPERATION_UNNAMED_ROW,
    ORPHAN_ACTIONS,
    TIMEOUT_KINDS,
    counter_index,
)

__all__ = ["LockStats", "CoreLockStats", "ForkStats", "OperationTable", "add_operation_words", "snapshot_of", "merge_lock_snapshots",
           "write_operation_name"]

_NAME_HEAD = struct.Struct("<II")  # a name entry's kind and padding


def snapshot_of(counters: Any) -> dict[str, Any]:
    """A snapshot (as :meth:`LockStats.snapshot`) from the 64 counter words."""
    c = list(counters)
    return {
        "acquisitions": c[C_ACQUISITIONS],
        "contentions": c[C_CONTENTIONS],
        "reentries": c[C_REENTRIES],
        "wait": _histogram(c[C_WAIT_BUCKETS:C_WAIT_SUM], c[C_WAIT_SUM], c[C_WAIT_MAX]),
        "hold": _histogram(c[C_HOLD_BUCKETS:C_HOLD_SUM], c[C_HOLD_SUM], c[C_HOLD_MAX]),
        "timeouts": dict(zip(TIMEOUT_KINDS, c[C_TIMEOUTS:C_ORPHANS])),
        "orphans": dict(zip(ORPHAN_ACTIONS, c[C_ORPHANS:N_COUNTERS])),
    }


def _private_counters() -> memoryview:
    return memoryview(bytearray(COUNTERS_BYTES)).cast("Q")


def _field(index: int) -> property:
    def set_(self: Any, value: int) -> None:  # pure-Python counters only (tests set them)
        self._c[index] = value

    return property(lambda self: self.counters()[index], set_)


def _fields(start: int, count: int) -> property:
    return property(lambda self: self.counters()[start : start + count])


class _CounterFields:
    """Named read access to a lock's 64 counter words, for both implementations."""

    __slots__ = ()

    def counters(self) -> list[int]:
        raise NotImplementedError

    acquisitions = _field(C_ACQUISITIONS)
    contentions = _field(C_CONTENTIONS)
    reentries = _field(C_REENTRIES)
    wait_buckets = _fields(C_WAIT_BUCKETS, N_BUCKETS)
    wait_sum_ns = _field(C_WAIT_SUM)
    wait_max_ns = _field(C_WAIT_MAX)
    hold_buckets = _fields(C_HOLD_BUCKETS, N_BUCKETS)
    hold_sum_ns = _field(C_HOLD_SUM)
    hold_max_ns = _field(C_HOLD_MAX)

    def snapshot(self) -> dict[str, Any]:
        return snapshot_of(self.counters())


class LockStats(_CounterFields):
    """The counters of one pure-Python lock, in 64 words (see ``C_*``).

    They start in private memory and move into the state file's mapping
    when the process's file is made (:meth:`move_to`), so that what the
    process counted is in the file whenever it dies.
    """

    __slots__ = ("_c", "_bump_lock", "_owner_lock")

    def __init__(self) -> None:
        self._c = _private_counters()
        self._bump_lock = threading.Lock()
        # The lock these counters belong to (a weak reference): a move takes
        # it first (see move_to), and points its hot path at the new place.
        self._owner_lock: Any = None

    def record_wait(self, wait_ns: int) -> None:
        # The acquisition that follows charges it to its operation (as
        # LockCore_record_wait in _lockcore.c).
        lock = self._owner_lock() if self._owner_lock is not None else None
        if lock is not None:
            lock._pending_wait_ns = wait_ns
        c = self._c
        c[C_CONTENTIONS] += 1
        c[C_WAIT_BUCKETS + bisect_left(BUCKET_BOUNDS_NS, wait_ns)] += 1
        c[C_WAIT_SUM] += wait_ns
        if wait_ns > c[C_WAIT_MAX]:
            c[C_WAIT_MAX] = wait_ns

    def bump(self, table: str, key: str) -> None:
        index = counter_index(table, key)
        with self._bump_lock:
            self._c[index] += 1

    def counters(self) -> list[int]:
        return self._c.tolist()

    def move_to(self, target: memoryview, table: tuple[memoryview, memoryview] | None = None) -> bool:
        """Carry on counting in ``target`` (64 words of the state file's
        mapping, the same memoryview object at every call for one place),
        after copying what was counted so far; with ``table`` (the rows'
        words and their names in the mapping), the lock's operation rows
        move there too. False when the lock is busy now:
        its holder moves them at its outermost release (see
        ``_adopt_pending``), and ``target`` holds a copy until then.

        Every counter and row is written by the thread holding the lock, or
        (counters) under ``_bump_lock``: holding both, nobody is half-way
        through an update.
        """
        if self._c is target:
            return True
        lock = self._owner_lock() if self._owner_lock is not None else None
        if lock is not None and not lock._acquire_for_fork(0):
            with self._bump_lock:
                # Under _bump_lock, as _move: never a stale copy over counts
                # the holder has already moved there.
                if self._c is not target:
                    lock._counters_pending = (target, table)
                    target[:] = self._c
                    if table is not None:
                        lock.operations.copy_to(*table)
            return False
        try:
            self._move(target, table, lock)
        finally:
            if lock is not None:
                lock._release_for_fork()
        return True

    def _adopt_pending(self) -> None:
        """Called by the holder at its outermost release: the move that found the lock busy."""
        lock = self._owner_lock()
        if lock is not None and lock._counters_pending is not None:
            target, table = lock._counters_pending
            self._move(target, table, lock)

    def _move(self, target: memoryview, table: tuple[memoryview, memoryview] | None, lock: Any) -> None:
        with self._bump_lock:
            target[:] = self._c
            self._c = target
            if lock is not None:
                if table is not None:
                    lock.operations.move_to(*table)
                    lock._op_words = lock.operations.words
                lock._counters = target
                lock._counters_pending = None

    def reset_after_fork(self) -> None:
        """A forked child is a new process: its statistics start at zero, in
        private memory (the parent's mapping is not the child's to write)."""
        self._c = _private_counters()
        self._bump_lock = threading.Lock()
        lock = self._owner_lock() if self._owner_lock is not None else None
        if lock is not None:
            lock._counters = self._c
            lock._counters_pending = None



class CoreLockStats(_CounterFields):
    """The counters of a compiled lock: they live in the compiled core, which
    writes every one of them in C under the GIL (so a move is atomic)."""

    __slots__ = ("_core",)

    def __init__(self, core: Any) -> None:
        self._core = core

    def record_wait(self, wait_ns: int) -> None:
        self._core._record_wait(wait_ns)

    def bump(self, table: str, key: str) -> None:
        self._core._bump(counter_index(table, key))

    def counters(self) -> list[int]:
        return list(self._core._counters())

    def move_to(self, target: memoryview, table: tuple[memoryview, memoryview] | None = None) -> bool:
        if table is None:
            self._core._move_counters(target)
        else:
            self._core._move_counters(target, *table)
        return True

    def reset_after_fork(self) -> None:
        self._core._move_counters(None)



def write_operation_name(names: Any, row: int, operation: Any) -> None:
    """Row ``row``'s name entry in ``names`` (see OPERATION_NAME_LAYOUT),
    unless already written (write_op_name in _lockcore.c): a name, once
    read, never changes."""
    offset = row * OPERATION_NAME_ENTRY
    if not isinstance(operation, str) or bytes(names[offset : offset + 8]) != bytes(8):
        return
    from h5watch.recorder import store_guarded  # the file exists: already imported

    text = operation.encode("utf-8", "replace")[:OPERATION_NAME_BYTES]
    store_guarded(names, offset, 2, _NAME_HEAD.pack(OPERATION_NAMED, 0) + text.ljust(OPERATION_NAME_BYTES, b"\0"))


class OperationTable:
    """Contention by operation for one lock: OPERATION_SLOTS rows of
    N_OPERATION_WORDS words (``O_*`` in h5watch.schema), one per operation
    that held the lock (a str; row OPERATION_UNNAMED_ROW is None's, the
    lock's own name), row 0 for those that came after every row was taken
    and for any other kind of operation.

    The lock writes the rows (the compiled core through the buffer, the
    pure-Python mirror through ``words``) from the thread that holds it; a
    new operation's row is assigned under the GIL by that thread too
    (``row``, or op_row_slow in _lockcore.c). The rows start in private
    memory and move with the lock's counters into its table in the state
    file (``move_to``; the compiled core moves its own), where each row's
    name is written before the row counts anything, so that what the process
    counted is in the file whenever it dies.
    """

    __slots__ = ("lock_name", "buffer", "words", "index", "names", "names_area")

    def __init__(self, lock_name: str) -> None:
        self.lock_name = lock_name
        self.buffer = bytearray(OPERATION_SLOTS * N_OPERATION_WORDS * 8)
        self.words = memoryview(self.buffer).cast("Q")
        # {operation (None: unnamed): row}; names[row] is the operation.
        self.index: dict[Any, int] = {None: OPERATION_UNNAMED_ROW}
        self.names: list[Any] = [OPERATION_OTHER, None]
        assert OPERATION_UNNAMED_ROW == 1
        # The names of the rows in the state file (pure-Python mirror), once moved there.
        self.names_area: memoryview | None = None

    def row(self, operation: Any) -> int:
        """The row ``operation`` counts in (op_row_slow in _lockcore.c)."""
        if operation is not None and not isinstance(operation, str):
            return 0
        try:
            found = self.index.get(operation)
        except TypeError:  # a str subclass that cannot be hashed: counted as other
            return 0
        if found is not None:
            return found
        names = self.names
        if len(names) >= OPERATION_SLOTS:
            return 0
        row = len(names)
        self.index[operation] = row
        names.append(operation)
        if self.names_area is not None:
            write_operation_name(self.names_area, row, operation)
        return row

    def move_to(self, words: memoryview, names: memoryview) -> None:
        """Count in ``words`` (the lock's rows in the state file, 8-byte
        words) from now on, with their names in ``names``: every row's name
        first, then the words. The pure-Python mirror's, by whoever keeps the
        rows from changing (see ``LockStats._move``)."""
        if self.words is words:
            return
        self.copy_to(words, names)
        self.words, self.names_area = words, names

    def copy_to(self, words: memoryview, names: memoryview) -> None:
        """Every row's name, then the words, into the file (a copy as of
        now, while a busy lock's move waits for its holder)."""
        for row, operation in enumerate(list(self.names)[OPERATION_UNNAMED_ROW + 1 :], start=OPERATION_UNNAMED_ROW + 1):
            write_operation_name(names, row, operation)
        words[:] = self.words

    def reset(self) -> None:
        """A forked child counts from zero, in private memory (the file's
        table is its parent's)."""
        self.buffer[:] = bytes(len(self.buffer))
        self.words = memoryview(self.buffer).cast("Q")
        self.names_area = None

    def rows(self, words: list[int] | None = None) -> list[OperationRecord]:
        """Every operation that held the lock, the most held first, from
        ``words`` (the rows' words now; else ``self.words``); an unnamed
        operation is named after the lock."""
        if words is None:
            words = self.words.tolist()  # one instant's counts for every row
        names = [self.lock_name if operation is None else str(operation) for operation in list(self.names)]
        used = [row for row in range(len(names))
                if words[row * N_OPERATION_WORDS + O_HOLDS] or words[row * N_OPERATION_WORDS + O_WAITS]]
        if len({names[row] for row in used}) < len(used):
            return self._rows_merged_by_name(words, names, used)
        used.sort(key=names.__getitem__)
        used.sort(key=lambda row: -words[row * N_OPERATION_WORDS + O_HOLD_SUM])
        out = []
        for row in used:
            base = row * N_OPERATION_WORDS
            out.append(OperationRecord(self.lock_name, names[row], words[base + O_HOLDS], words[base + O_HOLD_SUM],
                                       words[base + O_HOLD_MAX], words[base + O_CAUSED_WAIT_SUM], words[base + O_WAITS],
                                       words[base + O_WAIT_SUM]))
        return out

    def _rows_merged_by_name(self, words: list[int], names: list[str], used: list[int]) -> list[OperationRecord]:
        """Rows of one name as one (an unnamed hold and one named after the
        lock, or two operations whose names read the same)."""
        by_name: dict[str, list[int]] = {}
        for row in used:
            base = row * N_OPERATION_WORDS
            w = words[base : base + N_OPERATION_WORDS]
            into = by_name.get(names[row])
            by_name[names[row]] = w if into is None else add_operation_words(into, w)
        out = [OperationRecord(self.lock_name, name, w[O_HOLDS], w[O_HOLD_SUM], w[O_HOLD_MAX], w[O_CAUSED_WAIT_SUM], w[O_WAITS],
                               w[O_WAIT_SUM])
               for name, w in by_name.items()]
        out.sort(key=lambda r: (-r.hold_sum_ns, r.operation))
        return out


def add_operation_words(a: list[int], b: list[int]) -> list[int]:
    """Two operation rows as one: sums, and the larger maximum."""
    out = [x + y for x, y in zip(a, b)]
    out[O_HOLD_MAX] = max(a[O_HOLD_MAX], b[O_HOLD_MAX])
    return out


class ForkStats:
    """Forks this process made and how long their before-hooks waited: 64
    words laid out as a lock's (forks in the acquisitions word, waits in the
    wait histogram), in the state file once it exists."""

    __slots__ = ("_c", "_lock")

    def __init__(self) -> None:
        self._c = _private_counters()
        self._lock = threading.Lock()

    @property
    def forks(self) -> int:
        return self._c[C_ACQUISITIONS]

    def record(self, wait_ns: int) -> None:
        with self._lock:
            c = self._c
            c[C_ACQUISITIONS] += 1
            c[C_WAIT_BUCKETS + bisect_left(BUCKET_BOUNDS_NS, wait_ns)] += 1
            c[C_WAIT_SUM] += wait_ns
            if wait_ns > c[C_WAIT_MAX]:
                c[C_WAIT_MAX] = wait_ns

    def move_to(self, target: memoryview, add: bool = False) -> None:
        """Count in ``target`` from now on; with ``add``, on top of what it
        holds (an earlier image of this process, before an ``exec()``)."""
        with self._lock:
            for index, value in enumerate(self._c.tolist()):
                if not add:
                    target[index] = value
                elif index == C_WAIT_MAX:
                    target[index] = max(target[index], value)
                else:
                    target[index] += value
            self._c = target

    def snapshot(self) -> dict[str, Any]:
        c = self._c.tolist()
        return {"forks": c[C_ACQUISITIONS], "wait": _histogram(c[C_WAIT_BUCKETS:C_WAIT_SUM], c[C_WAIT_SUM], c[C_WAIT_MAX])}


def _histogram(buckets: list[int], sum_ns: int, max_ns: int) -> dict[str, Any]:
    return {"buckets": buckets, "count": sum(buckets), "sum_ns": sum_ns, "max_ns": max_ns}


def merge_histograms(into: dict[str, Any], other: dict[str, Any]) -> None:
    into["buckets"] = [a + b for a, b in zip(into["buckets"], other["buckets"])]
    into["count"] += other["count"]
    into["sum_ns"] += other["sum_ns"]
    into["max_ns"] = max(into["max_ns"], other["max_ns"])


def merge_lock_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counters and histograms of several snapshots of one lock."""
    merged = snapshot_of([0] * N_COUNTERS)
    for snap in snapshots:
        for key in ("acquisitions", "contentions", "reentries"):
            merged[key] += snap[key]
        merge_histograms(merged["wait"], snap["wait"])
        merge_histograms(merged["hold"], snap["hold"])
        for table in ("timeouts", "orphans"):
            for key, value in snap[table].items():
                merged[table][key] = merged[table].get(key, 0) + value
    return merged
