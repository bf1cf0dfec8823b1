"""The per-process state file: a fixed, versioned binary layout on an mmap.

Every instrumented process (every forked child too) owns one file,
``<pid>-<start ticks>.h5w`` in ``state_dir``, mode 0600::

    header    HEADER_SIZE bytes: magic, version, sizes, seq, pid, start
              ticks, uid, dump signal, workload, heartbeat, slots in use,
              locks that found no slot, the merge journal
    forks     COUNTERS_BYTES: the fork counters (live)
    records   CAPACITY x RECORD_SIZE bytes: one per watched lock instance
              (live), or per name for instances already collected
              (retired): name, state, counter block, holder, waiters
    blocks    CAPACITY x BLOCK_SIZE: the counters (live), then contention
              by operation (live): the lock's rows (holds, hold time, the
              waits it caused, its own waits)
    names     CAPACITY x OPERATION_NAMES_BYTES: each block's rows' names
              (see schema.OPERATION_NAME_LAYOUT)
    recorder  recorder.REGION_BYTES: the flight recorder, a ring of notable
              lock events written in place (``h5watch.recorder`` has its
              format, its writer and its reader)

All integers are little-endian. The same field list gives the writer's
``struct`` format and the reader's numpy dtype, so the two cannot drift.
Writing needs only ``struct`` and ``mmap``: numpy is imported by the first
read (the daemon, ``h5watch status``), never by a process that only writes.

Live counters: a lock's counters are not copied into the file now and
then: once the file exists, the lock counts in its block of the mapping
itself (see ``h5watch.process.stats``), and by operation in the block's
rows, so whatever kills the process, SIGKILL included, what it counted is
in the file. A record's block changes only by a merge (below); counters
are read without a sequence check (each is one aligned 8-byte word, and
only grows).

An operation row's name is written once, before the row counts anything,
and never again while its block is in use (row 0, other's, and row 1, the
unnamed operation's, have none). A reader reads a block's words first and
the names of the rows that counted after them: each such name was whole
before the words were read (a row whose name is not, forged or damaged, is
read as ``other``'s).

Torn reads of the rest: the header and each record start with a sequence
counter. The writer packs the new body, makes the
counter odd, copies the body over the old one, makes it even (a seqlock).
A reader copies the bytes twice and accepts them only when every counter is
even and unchanged; otherwise it retries. The file of a writer that died in
the middle of a write stays odd: it is read as it is (``torn``), which the
daemon accepts for a dead process only. Each field of a body it was
copying is then its old value or its new one, never zero (a copy, unlike
``struct.pack_into``, does not clear its target first), so no record is
lost. Such a reader (and a new image adopting the file) takes every record
written, also those made just before a header write that never came; one
whose very first write was cut short counts nothing.

Slots: a lock instance gets a live record when the file is made or when it
is first seen. When the instance is collected, its counts are merged into
its name's retired record: the sum (counters, and the operation rows of
one name as one) is written into a free block and its names, the merge
is noted in the header's journal, the retired record is pointed at the new
block, the live record is freed, and the journal is cleared. A reader of a
file whose writer died between two of these steps counts every block
exactly once by the journal: the live record is left out once the retired
record points at the new block.

A process that ``exec()``s keeps its pid and start time, and so its file
name: an instrumented new image adopts the file, retiring the old image's
records into its names' retired records, and counts on from there.

Next to it, ``<pid>-<start ticks>.stacks`` receives ``faulthandler``'s dump
of every thread's stack when the process gets its dump signal: the daemon's
way to see the stacks of a process whose threads are all blocked.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import stat
import struct
import threading
import time
from array import array
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from h5watch import recorder
from h5watch.recorder import store_guarded
from h5watch.records import LockRecord, OperationRecord, ProcessStatus
from h5watch.schema import (
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
    DEADLOCK_KINDS,
    N_BUCKETS,
    N_COUNTERS,
    N_OPERATION_WORDS,
    O_HOLD_MAX,
    O_HOLDS,
    O_WAITS,
    OPERATION_NAME_BYTES,
    OPERATION_NAME_ENTRY,
    OPERATION_NAMED,
    OPERATION_NAMES_BYTES,
    OPERATION_OTHER,
    OPERATION_SLOTS,
    OPERATION_UNNAMED_ROW,
    OPERATION_WORDS_BYTES,
    ORPHAN_ACTIONS,
    TIMEOUT_KINDS,
)
from h5watch.statedir import (  # noqa: F401 (re-exported: the directory's API)
    STACKS_SUFFIX,
    STATE_SUFFIX,
    StateDirError,
    check_state_dir,
    create_file_at,
    ensure_state_dir,
    list_state_files,
    open_at,
    open_for_reading,
    proc_start_ticks,
    proc_stat,
    process_identity,
    remove_at,
    rename_at,
)

__all__ = [
    "DUMP_SIGNAL",
    "MAGIC",
    "VERSION",
    "CAPACITY",
    "HEADER_DTYPE",  # noqa: F822 (built on first use by __getattr__)
    "RECORD_DTYPE",  # noqa: F822
    "StateDirError",
    "StateFileError",
    "StateWriter",
    "ProcessState",
    "ensure_state_dir",
    "check_state_dir",
    "proc_start_ticks",
    "read_state_file",
    "read_recorder",
    "concat_headers",
    "holds_seen_at",
    "concat_records",
    "state_file_name",
    "list_state_files",
    "process_identity",
    "STATE_SUFFIX",
    "STACKS_SUFFIX",
    "VERSION_FIELDS",
    "OPERATION_COUNTERS",
    "text_from_file",
]

# h5watch's stack-dump signal: a real-time signal nobody else is likely to
# use, the same number in every process (the daemon never takes it from a file).
DUMP_SIGNAL = int(signal.SIGRTMIN) + 6 if hasattr(signal, "SIGRTMIN") else int(signal.SIGUSR2)
MAGIC = b"H5WATCH\0"
VERSION = 5
CAPACITY = 256
MAX_WAITERS = 4
NAME_BYTES = 64
OPERATION_BYTES = 128
THREAD_NAME_BYTES = 48
VERSION_BYTES = 24

SLOT_FREE = 0
SLOT_LIVE = 1
SLOT_RETIRED = 2

VERSION_FIELDS = ("h5watch_version", "python_version", "h5py_version", "hdf5_version")

# (field, struct code, numpy dtype). Arrays: struct code "<n><c>", dtype (type, n).
_HEADER_FIELDS = [
    ("magic", "8s", "S8"),
    ("version", "I", "<u4"),
    ("header_size", "I", "<u4"),
    ("record_size", "I", "<u4"),
    ("capacity", "I", "<u4"),
    ("seq", "Q", "<u8"),
    ("pid", "q", "<i8"),
    ("start_ticks", "Q", "<u8"),
    ("uid", "I", "<u4"),
    ("dump_signal", "i", "<i4"),
    ("workload", f"{NAME_BYTES}s", f"S{NAME_BYTES}"),
    ("started_unix", "d", "<f8"),
    ("heartbeat_unix", "d", "<f8"),
    ("exited", "I", "<u4"),
    ("n_slots", "I", "<u4"),
    ("watchdog_running", "I", "<u4"),
    ("tick_interval", "f", "<f4"),
    ("fork_since_unix", "d", "<f8"),
    ("locks_unrecorded", "Q", "<u8"),
    ("images", "I", "<u4"),
    ("merge_active", "I", "<u4"),
    ("merge_from", "I", "<u4"),
    ("merge_into", "I", "<u4"),
    ("merge_block", "I", "<u4"),
    # The process's own wait_timeout and hold_timeout (0: off), for the verdict.
    ("wait_timeout", "d", "<f8"),
    ("hold_timeout", "d", "<f8"),
    # Deadlocks reported, by kind (schema.DEADLOCK_KINDS); lock-order
    # inversions reported; threads in a deadlock that is still there.
    ("deadlocks", f"{len(DEADLOCK_KINDS)}Q", ("<u8", len(DEADLOCK_KINDS))),
    ("order_inversions", "Q", "<u8"),
    ("threads_in_deadlock", "I", "<u4"),
    # What the process runs, for the daemon's h5watch_workload_info (it loads
    # no h5py itself); the h5py fields stay empty until h5py is imported.
    *((name, f"{VERSION_BYTES}s", f"S{VERSION_BYTES}") for name in VERSION_FIELDS),
]

_RECORD_FIELDS = [
    ("seq", "Q", "<u8"),
    ("state", "I", "<u4"),
    ("block", "I", "<u4"),
    ("instance", "Q", "<u8"),
    ("name", f"{NAME_BYTES}s", f"S{NAME_BYTES}"),
    ("held", "I", "<u4"),
    ("orphaned", "I", "<u4"),
    ("depth", "i", "<i4"),
    ("n_waiters", "I", "<u4"),
    ("holder_pid", "q", "<i8"),
    ("holder_ident", "Q", "<u8"),
    ("holder_native_id", "q", "<i8"),
    ("holder_name", f"{THREAD_NAME_BYTES}s", f"S{THREAD_NAME_BYTES}"),
    ("holder_operation", f"{OPERATION_BYTES}s", f"S{OPERATION_BYTES}"),
    ("held_since_unix", "d", "<f8"),
    ("oldest_wait_since_unix", "d", "<f8"),
    ("waiter_native_ids", f"{MAX_WAITERS}q", ("<i8", MAX_WAITERS)),
    ("waiter_since_unix", f"{MAX_WAITERS}d", ("<f8", MAX_WAITERS)),
    ("waiter_names", f"{MAX_WAITERS * THREAD_NAME_BYTES}s", f"S{MAX_WAITERS * THREAD_NAME_BYTES}"),
]

# Contention by operation as the reader returns it: a row's words, in this order.
OPERATION_COUNTERS = ("holds", "hold_sum_ns", "hold_max_ns", "caused_wait_sum_ns", "waits", "wait_sum_ns")
assert (O_HOLDS, O_HOLD_MAX, O_WAITS) == (0, 2, 4) and len(OPERATION_COUNTERS) == N_OPERATION_WORDS

# A lock's counters as the reader returns them, after its record's fields:
# (name, first word, number of words) of the 64 words (see h5watch.process.stats).
_COUNTER_WORDS = [
    ("acquisitions", C_ACQUISITIONS, 1),
    ("contentions", C_CONTENTIONS, 1),
    ("reentries", C_REENTRIES, 1),
    ("wait_buckets", C_WAIT_BUCKETS, N_BUCKETS),
    ("wait_sum_ns", C_WAIT_SUM, 1),
    ("wait_max_ns", C_WAIT_MAX, 1),
    ("hold_buckets", C_HOLD_BUCKETS, N_BUCKETS),
    ("hold_sum_ns", C_HOLD_SUM, 1),
    ("hold_max_ns", C_HOLD_MAX, 1),
    ("timeouts", C_TIMEOUTS, len(TIMEOUT_KINDS)),
    ("orphans", C_ORPHANS, len(ORPHAN_ACTIONS)),
]
_FORK_WORDS = [
    ("forks", C_ACQUISITIONS, 1),
    ("fork_wait_buckets", C_WAIT_BUCKETS, N_BUCKETS),
    ("fork_wait_sum_ns", C_WAIT_SUM, 1),
    ("fork_wait_max_ns", C_WAIT_MAX, 1),
]


def _struct(fields: list[tuple[str, str, Any]]) -> struct.Struct:
    return struct.Struct("<" + "".join(code for _, code, _ in fields))


if TYPE_CHECKING:
    import numpy as np

    from h5watch.records import ForkCounters


def _dtype(fields: list[tuple[str, str, Any]], size: int, extra: list[tuple[str, Any, int]] = ()) -> np.dtype:  # type: ignore[assignment]
    """The fields at their packed offsets, plus ``extra`` (name, dtype, offset)."""
    import numpy as np

    base = np.dtype([(name, dtype) for name, _, dtype in fields])
    assert base.names is not None and base.fields is not None  # a structured dtype: it has both
    names = list(base.names) + [name for name, _, _ in extra]
    formats = [base.fields[n][0] for n in base.names] + [dtype for _, dtype, _ in extra]
    offsets = [base.fields[n][1] for n in base.names] + [offset for _, _, offset in extra]
    return np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": size})


def _counter_fields(start: int, words: list[tuple[str, int, int]]) -> list[tuple[str, Any, int]]:
    return [(name, "<u8" if count == 1 else ("<u8", count), start + 8 * index) for name, index, count in words]


_HEADER_STRUCT = _struct(_HEADER_FIELDS)
_RECORD_STRUCT = _struct(_RECORD_FIELDS)
HEADER_SIZE = 512
RECORD_SIZE = (_RECORD_STRUCT.size + 63) // 64 * 64
assert _HEADER_STRUCT.size <= HEADER_SIZE
FORKS_OFFSET = HEADER_SIZE
RECORDS_OFFSET = FORKS_OFFSET + COUNTERS_BYTES
BLOCKS_OFFSET = RECORDS_OFFSET + CAPACITY * RECORD_SIZE
# A block: a lock's counters, then its operation rows' words.
BLOCK_SIZE = (COUNTERS_BYTES + OPERATION_WORDS_BYTES + 63) // 64 * 64
NAMES_OFFSET = BLOCKS_OFFSET + CAPACITY * BLOCK_SIZE
RECORDER_OFFSET = NAMES_OFFSET + CAPACITY * OPERATION_NAMES_BYTES
FILE_SIZE = RECORDER_OFFSET + recorder.REGION_BYTES

# struct.pack_into zero-fills its whole target before writing it, so a
# writer killed in between would leave zeros where the old values were (no
# lock records for a reader of a dead process's file).
# Each write packs into bytes first, then copies them over the old ones
# between the two writes of its sequence word (recorder.store_guarded). The
# header's constant prefix is written once.
_SEQ_INDEX = [name for name, _, _ in _HEADER_FIELDS].index("seq")
_HEADER_PREFIX_FIELDS = _HEADER_FIELDS[:_SEQ_INDEX]
_HEADER_TAIL_FIELDS = _HEADER_FIELDS[_SEQ_INDEX + 1 :]
_RECORD_TAIL_FIELDS = _RECORD_FIELDS[1:]
assert _RECORD_FIELDS[0][0] == "seq"
_HEADER_PREFIX = _struct(_HEADER_PREFIX_FIELDS)
_HEADER_TAIL = _struct(_HEADER_TAIL_FIELDS)
_RECORD_TAIL = _struct(_RECORD_TAIL_FIELDS)
_SEQ = struct.Struct("<Q")
_U32 = struct.Struct("<I")
# "<" formats have no padding: the sequence counter follows the prefix.
_HEADER_SEQ_OFFSET = _HEADER_PREFIX.size
_HEADER_TAIL_OFFSET = _HEADER_SEQ_OFFSET + 8
assert _HEADER_SEQ_OFFSET % 8 == 0  # sequence words are aligned (see recorder.store_seq)
_DTYPES: dict[str, Any] = {}


def _written_through(buffer: Any, offset: int, size: int, counted: int, limit: int) -> int:
    """How many of a table's places are in use: the header's count, or more
    when places after it (below ``limit``) were written (their first write
    finished: sequence word 2 or more) by a writer that never wrote the
    header again."""
    for index in range(limit - 1, counted - 1, -1):
        if _SEQ.unpack_from(buffer, offset + index * size)[0] >= 2:
            return index + 1
    return counted


def _offset_in(fields: list[tuple[str, str, Any]], field: str) -> int:
    """A field's offset in a packed ("<") layout."""
    names = [name for name, _, _ in fields]
    return struct.calcsize("<" + "".join(code for _, code, _ in fields[: names.index(field)]))


_N_SLOTS_OFFSET = _offset_in(_HEADER_FIELDS, "n_slots")

# Times a reader checks (a forged or damaged file may hold anything there):
# the header's from its raw bytes (a numpy scalar's field costs a microsecond
# or two each), the records' as 8-byte words of each row read.
_HEADER_TIMES = [(name, struct.Struct("<" + code), _offset_in(_HEADER_FIELDS, name)) for name, code, _ in _HEADER_FIELDS
                 if name in ("started_unix", "heartbeat_unix", "fork_since_unix", "tick_interval", "wait_timeout",
                             "hold_timeout")]
_MERGE_ACTIVE_OFFSET = _offset_in(_HEADER_FIELDS, "merge_active")
# Records read with the header in its first read (more take a second read).
_FIRST_READ_RECORDS = 8
assert FORKS_OFFSET == HEADER_SIZE and RECORDS_OFFSET == FORKS_OFFSET + COUNTERS_BYTES
_RECORD_PREFIX = _struct(_RECORD_FIELDS[:3])
assert [name for name, _, _ in _RECORD_FIELDS[:3]] == ["seq", "state", "block"]
_WAITERS_SINCE_WORD = _offset_in(_RECORD_FIELDS, "waiter_since_unix") // 8
_RECORD_TIME_WORDS = [_offset_in(_RECORD_FIELDS, "held_since_unix") // 8, _offset_in(_RECORD_FIELDS, "oldest_wait_since_unix") // 8,
                      *range(_WAITERS_SINCE_WORD, _WAITERS_SINCE_WORD + MAX_WAITERS)]
assert all(_offset_in(_RECORD_FIELDS, name) % 8 == 0 for name in ("held_since_unix", "oldest_wait_since_unix", "waiter_since_unix"))


def _dtypes() -> dict[str, Any]:
    """The file's dtypes (HEADER_DTYPE, RECORD_DTYPE) and what the reader
    returns (LOCK_DTYPE, PROCESS_DTYPE), built (and numpy imported) on first use."""
    if not _DTYPES:
        import numpy as np

        header, record = _dtype(_HEADER_FIELDS, HEADER_SIZE), _dtype(_RECORD_FIELDS, RECORD_SIZE)
        assert header.itemsize == HEADER_SIZE and record.itemsize == RECORD_SIZE
        assert header.fields is not None and header.fields["seq"][1] == _HEADER_SEQ_OFFSET
        # What the reader returns: a record's bytes followed by its block's,
        # and the header's followed by the fork counters' (as in the file).
        lock = _dtype(_RECORD_FIELDS, RECORD_SIZE + COUNTERS_BYTES, _counter_fields(RECORD_SIZE, _COUNTER_WORDS))
        process = _dtype(_HEADER_FIELDS, HEADER_SIZE + COUNTERS_BYTES, _counter_fields(HEADER_SIZE, _FORK_WORDS))
        _DTYPES.update(HEADER_DTYPE=header, RECORD_DTYPE=record, LOCK_DTYPE=lock, PROCESS_DTYPE=process,
                       RECORD_TIME_COLUMNS=np.array(_RECORD_TIME_WORDS, dtype=np.intp))
    return _DTYPES


def __getattr__(name: str) -> Any:
    if name in ("HEADER_DTYPE", "RECORD_DTYPE", "LOCK_DTYPE", "PROCESS_DTYPE"):
        return _dtypes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class StateFileError(Exception):
    """A state file that must be skipped: ``reason`` (a metric label), and a message."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def state_file_name(pid: int, start_ticks: int) -> str:
    return f"{pid}-{start_ticks}{STATE_SUFFIX}"


def _fixed(text: str | None, size: int) -> bytes:
    return (text or "").encode("utf-8", "replace")[:size]


def _create_or_open(directory: str, name: str) -> tuple[int, bool]:
    """(descriptor, adopted): a new file, made under a name no reader lists
    and renamed into place once initialised by the caller (see
    StateWriter), or this very process's existing file (after ``exec()``,
    or a new ``install()``), which is adopted."""
    path = os.path.join(directory, name)
    try:
        fd = open_at(path, os.O_RDWR)
    except FileNotFoundError:
        # O_EXCL through the checked directory: a link or FIFO planted at
        # the name is unlinked, never written through.
        fd = create_file_at(os.path.join(directory, f".{name}.new"))
        return fd, False
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid() or info.st_nlink != 1 or info.st_size != FILE_SIZE:
        os.close(fd)
        raise StateFileError("corrupt", f"{path}: exists and is not this process's state file")
    return fd, True


def _publish(directory: str, name: str) -> None:
    rename_at(os.path.join(directory, f".{name}.new"), os.path.join(directory, name))


# -- writing ---------------------------------------------------------------


class _Live:
    """A live lock instance's slot."""

    __slots__ = ("slot", "lock_ref", "counters", "table", "moved")

    def __init__(self, slot: int, lock_ref: Callable[[], object | None], counters: memoryview,
                 table: tuple[memoryview, memoryview]) -> None:
        self.slot = slot
        self.lock_ref = lock_ref
        # The lock's place in the mapping: one object, so a move can tell
        # whether the lock already counts there; and its operation rows' words and names.
        self.counters = counters
        self.table = table
        self.moved = False


class StateWriter:
    """This process's state file. Create it in the process that owns it (a
    forked child creates its own: the parent's mapping is shared)."""

    def __init__(self, directory: str, workload: str, dump_signal: int, tick_interval: float,
                 wait_timeout: float | None = None, hold_timeout: float | None = None) -> None:
        self.pid = os.getpid()
        self.start_ticks = proc_start_ticks(self.pid) or 0
        self.directory = directory
        name = state_file_name(self.pid, self.start_ticks)
        self.path = os.path.join(directory, name)
        self.stacks_path = self.path[: -len(STATE_SUFFIX)] + STACKS_SUFFIX
        self._lock = threading.Lock()
        # Set under _lock once the mapping is closed: a write from another
        # thread (the watchdog ticking during interpreter exit) then does nothing.
        self._closed = False
        self._live: dict[int, _Live] = {}
        self._retired: dict[str, list[int]] = {}
        self._unrecorded: set[int] = set()
        self._locks_unrecorded = 0
        self._full_logged = False
        self._free_slots: list[int] = []
        self._free_blocks: list[int] = []
        self._n_slots = 0
        self._n_blocks = 0
        self._merge = (0, 0, 0, 0)
        self._header_seq = 0
        self._header_dirty = False
        self._record_seqs = [0] * CAPACITY
        self._record_values: dict[int, dict[str, Any]] = {}
        self._record_names: dict[int, str] = {}
        self._blocks: dict[int, int] = {}
        self._heartbeat = time.time()
        self._last_status = ProcessStatus(watchdog_running=False, fork_since_ns=None)
        self._images = 1
        fd, adopted = _create_or_open(directory, name)
        # This process's file from before an exec(), taken over; else a new one, all zeros.
        self.adopted = adopted
        try:
            if not adopted:
                os.ftruncate(fd, FILE_SIZE)
            self._map = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._words = memoryview(self._map)
        if not adopted:
            recorder.init_region(self._map, RECORDER_OFFSET)
        self._fixed_header = dict(
            magic=MAGIC, version=VERSION, header_size=HEADER_SIZE, record_size=RECORD_SIZE, capacity=CAPACITY,
            pid=self.pid, start_ticks=self.start_ticks, uid=os.geteuid(), dump_signal=dump_signal,
            workload=_fixed(workload, NAME_BYTES), started_unix=time.time(), tick_interval=tick_interval,
            wait_timeout=wait_timeout or 0.0, hold_timeout=hold_timeout or 0.0,
        )
        self._fixed_header.update(dict.fromkeys(VERSION_FIELDS, b""))
        if adopted:
            self._adopt()
        self.write_header(self._last_status)
        if not adopted:
            try:
                _publish(directory, name)
            except OSError:
                self._release_map()
                try:
                    remove_at(os.path.join(directory, f".{name}.new"))
                except OSError:
                    pass
                raise

    def owned_here(self) -> bool:
        return os.getpid() == self.pid

    def recorder_region(self) -> memoryview:
        """The flight recorder's bytes in the mapping (``recorder.Ring`` writes them)."""
        return self._words[RECORDER_OFFSET:FILE_SIZE]

    def set_versions(self, versions: dict[str, str]) -> None:
        """What the process runs (keys of VERSION_FIELDS), in the header from its next write."""
        self._fixed_header.update({name: _fixed(versions.get(name), VERSION_BYTES) for name in VERSION_FIELDS})

    def close(self, exited: bool = True) -> None:
        if self.owned_here():
            with self._lock:
                if exited and not self._closed:
                    self.write_header(self._last_status, exited=True, beat=False)
                self._closed = True
                self._release_map()
        else:
            # A forked child's copy: its lock may be held by a thread that did
            # not survive the fork, and no other thread of the child uses it.
            self._closed = True
            self._release_map()

    def _release_map(self) -> None:
        """Close the mapping where nothing counts in it any more; where a
        lock still does (the process goes on after ``uninstall()``), it
        stays mapped, and counting, until the process ends."""
        try:
            self._words.release()
            self._map.close()
        except (ValueError, BufferError):
            pass

    # -- the counters' places ------------------------------------------------

    def counters_at(self, offset: int) -> memoryview:
        return self._words[offset : offset + COUNTERS_BYTES].cast("Q")

    def _block_offset(self, block: int) -> int:
        return BLOCKS_OFFSET + block * BLOCK_SIZE

    def rows_at(self, block: int) -> tuple[memoryview, memoryview]:
        """The operation rows of ``block`` (8-byte words) and their names, in the mapping."""
        offset = self._block_offset(block) + COUNTERS_BYTES
        names = NAMES_OFFSET + block * OPERATION_NAMES_BYTES
        return (self._words[offset : offset + OPERATION_WORDS_BYTES].cast("Q"),
                self._words[names : names + OPERATION_NAMES_BYTES])

    def attach_forks(self, fork_stats: ForkCounters) -> None:
        """Count this process's forks in the file from now on."""
        with self._lock:
            if not self._closed:
                fork_stats.move_to(self.counters_at(FORKS_OFFSET), add=True)

    def _new_block(self) -> int | None:
        if self._free_blocks:
            block = self._free_blocks.pop()
            used_before = True
        elif self._n_blocks < CAPACITY:
            block = self._n_blocks
            self._n_blocks += 1
            used_before = self.adopted  # perhaps by an earlier image
        else:
            return None
        offset = self._block_offset(block)
        self._map[offset : offset + BLOCK_SIZE] = _EMPTY_BLOCK
        if used_before:  # a new file's are empty, their pages untouched until used
            offset = NAMES_OFFSET + block * OPERATION_NAMES_BYTES
            self._map[offset : offset + OPERATION_NAMES_BYTES] = _EMPTY_NAMES
        return block

    def _new_slot(self) -> int | None:
        if self._free_slots:
            return self._free_slots.pop()
        if self._n_slots < CAPACITY:
            self._n_slots += 1
            return self._n_slots - 1
        return None

    def _slot_of(self, lock: LockRecord) -> _Live | None:
        """The live slot of ``lock``, made (and its counters moved into the
        file) when first seen; None when the file has no room left."""
        live = self._live.get(lock.seq)
        if live is None:
            if lock.seq in self._unrecorded:
                return None
            slot = self._new_slot()
            if slot is None:
                self._compact()
                slot = self._new_slot()
            block = self._new_block() if slot is not None else None
            if slot is None or block is None:
                if slot is not None:
                    self._free_slots.append(slot)
                self._no_room(lock)
                return None
            live = self._live[lock.seq] = _Live(slot, lock.lock_ref, self.counters_at(self._block_offset(block)),
                                                self.rows_at(block))
            self._write_record(slot, dict(_EMPTY_RECORD, state=SLOT_LIVE, block=block, instance=lock.seq,
                                          name=_fixed(lock.name, NAME_BYTES)))
            self._blocks[slot] = block
            self._header_dirty = True
        if not live.moved:
            # False while a pure-Python lock is busy: its holder moves the
            # counters at its release; until then the place holds a copy.
            live.moved = lock.counters.move_to(live.counters, live.table)
        return live

    def _no_room(self, lock: LockRecord) -> None:
        self._unrecorded.add(lock.seq)
        self._locks_unrecorded += 1
        self._header_dirty = True
        if not self._full_logged:
            self._full_logged = True
            from h5watch import logs

            logs.get_logger(logger="h5watch.state").error(
                "state.slots_full", path=self.path, capacity=CAPACITY, lock=lock.name,
                hint="more live watched locks than the state file holds: their counts are not exported",
            )

    def _retire_collected(self) -> None:
        """Instances that were collected: their records become their names' retired records."""
        for seq, live in list(self._live.items()):
            if live.lock_ref() is not None:
                continue
            del self._live[seq]
            name = self._record_names[live.slot]
            self._write_record_fields(live.slot, state=SLOT_RETIRED, held=0, n_waiters=0, depth=0, orphaned=0)
            self._retired.setdefault(name, []).append(live.slot)
        self._compact()

    def _compact(self) -> None:
        """Merge retired records of one name, two at a time, while blocks allow."""
        for slots in self._retired.values():
            while len(slots) > 1:
                if not self._merge_pair(slots[0], slots[-1]):
                    return
                slots.pop()

    def _merge_pair(self, into: int, source: int) -> bool:
        block = self._new_block()
        if block is None:
            return False
        old_into, old_source = self._blocks[into], self._blocks[source]
        total = self.counters_at(self._block_offset(block))
        a = self.counters_at(self._block_offset(old_into))
        b = self.counters_at(self._block_offset(old_source))
        for index in range(N_COUNTERS):
            total[index] = max(a[index], b[index]) if index in _MAX_WORDS else a[index] + b[index]
        _merge_rows(self.rows_at(block), self.rows_at(old_into), self.rows_at(old_source))
        # The journal, then the retired record's new block, then the freed
        # record: a reader counts each block once whatever the interruption.
        self._merge = (1, source, into, block)
        self.write_header(self._last_status, beat=False)
        self._write_record_fields(into, block=block)
        self._blocks[into] = block
        self._write_record_fields(source, state=SLOT_FREE)
        self._merge = (0, 0, 0, 0)
        self.write_header(self._last_status, beat=False)
        self._free_slots.append(source)
        self._free_blocks.extend((old_into, old_source))
        return True

    def _adopt(self) -> None:
        """This process's file from before an ``exec()`` (or a new
        ``install()``): every live record is the old image's, retired now."""
        self._header_seq = _SEQ.unpack_from(self._map, _HEADER_SEQ_OFFSET)[0] // 2 + 1
        tail = _unflatten(_HEADER_TAIL_FIELDS, _HEADER_TAIL.unpack_from(self._map, _HEADER_TAIL_OFFSET))
        # Records and entries made just before a header write that never
        # happened (another thread's tick, when the old image exec'd) count too.
        n_slots = _written_through(self._map, RECORDS_OFFSET, RECORD_SIZE, min(int(tail["n_slots"]), CAPACITY), CAPACITY)
        self._images = int(tail["images"]) + 1
        active, source, into, block = (int(tail[k]) for k in ("merge_active", "merge_from", "merge_into", "merge_block"))
        used_blocks = set()
        for slot in range(n_slots):
            offset = RECORDS_OFFSET + slot * RECORD_SIZE
            seq = _SEQ.unpack_from(self._map, offset)[0]
            self._record_seqs[slot] = seq // 2 + 1
            values = _unflatten(_RECORD_TAIL_FIELDS, _RECORD_TAIL.unpack_from(self._map, offset + 8))
            state, block_of = int(values["state"]), int(values["block"])
            if active and slot == source and self._merge_done(into, block):
                state = SLOT_FREE
            if state not in (SLOT_LIVE, SLOT_RETIRED) or block_of >= CAPACITY:
                self._write_record(slot, dict(_EMPTY_RECORD))
                self._free_slots.append(slot)
                continue
            name = text_from_file(values["name"])
            self._record_names[slot] = name
            self._blocks[slot] = block_of
            used_blocks.add(block_of)
            self._write_record(slot, dict(_EMPTY_RECORD, state=SLOT_RETIRED, block=block_of, instance=int(values["instance"]),
                                          name=values["name"]))
            self._retired.setdefault(name, []).append(slot)
        self._n_slots = n_slots
        self._n_blocks = max(used_blocks, default=-1) + 1
        self._free_blocks = [b for b in range(self._n_blocks) if b not in used_blocks]
        self._merge = (0, 0, 0, 0)
        self._compact()

    def _merge_done(self, into: int, block: int) -> bool:
        offset = RECORDS_OFFSET + into * RECORD_SIZE
        return int(_unflatten(_RECORD_TAIL_FIELDS, _RECORD_TAIL.unpack_from(self._map, offset + 8))["block"]) == block

    # -- records and header (callers hold self._lock, or are the only thread) --

    def _write_record(self, slot: int, fields: dict[str, Any]) -> None:
        self._record_values[slot] = dict(fields)
        if fields.get("name") is not None:
            self._record_names[slot] = text_from_file(fields["name"])
        offset = RECORDS_OFFSET + slot * RECORD_SIZE
        body = _RECORD_TAIL.pack(*_flatten(_RECORD_TAIL_FIELDS, fields))
        self._record_seqs[slot] += 1
        store_guarded(self._map, offset, self._record_seqs[slot] * 2, body)

    def _write_record_fields(self, slot: int, **changes: Any) -> None:
        self._write_record(slot, {**self._record_values[slot], **changes})

    def write_header(self, status: ProcessStatus, exited: bool = False, beat: bool = True) -> None:
        """``beat``: this write is a heartbeat (the watchdog's tick); else the last one is kept."""
        self._last_status = status
        if beat:
            self._heartbeat = time.time()
        fields = dict(self._fixed_header)
        fork_since = 0.0
        if status.fork_since_ns is not None:
            fork_since = time.time() - (time.monotonic_ns() - status.fork_since_ns) / 1e9
        active, source, into, block = self._merge
        fields.update(heartbeat_unix=self._heartbeat, exited=int(exited), n_slots=self._n_slots,
                      watchdog_running=int(status.watchdog_running), fork_since_unix=fork_since,
                      locks_unrecorded=self._locks_unrecorded, images=self._images,
                      merge_active=active, merge_from=source, merge_into=into, merge_block=block,
                      deadlocks=status.deadlocks, order_inversions=status.order_inversions,
                      threads_in_deadlock=status.threads_in_deadlock)
        if self._header_seq == 0:
            _HEADER_PREFIX.pack_into(self._map, 0, *_flatten(_HEADER_PREFIX_FIELDS, fields))
        body = _HEADER_TAIL.pack(*_flatten(_HEADER_TAIL_FIELDS, fields))
        self._header_seq += 1
        store_guarded(self._map, _HEADER_SEQ_OFFSET, self._header_seq * 2, body)
        self._header_dirty = False

    def write_lock(self, lock: LockRecord) -> None:
        live = self._slot_of(lock)
        if live is None:
            return
        now_ns = time.monotonic_ns()
        now_unix = time.time()

        def unix(since_ns: int) -> float:
            return now_unix - max(0, now_ns - since_ns) / 1e9

        holder, waiters = lock.holder, lock.waiters
        fields: dict[str, Any] = dict(
            self._record_values[live.slot],
            held=int(holder is not None), orphaned=int(lock.orphaned), n_waiters=len(waiters),
        )
        if holder is not None:
            fields.update(
                depth=holder.depth or 0,
                holder_pid=holder.pid or 0,
                holder_ident=max(0, holder.thread_ident or 0),
                holder_native_id=holder.native_id or 0,
                holder_name=_fixed(holder.thread_name, THREAD_NAME_BYTES),
                holder_operation=_fixed(holder.operation, OPERATION_BYTES),
                held_since_unix=unix(holder.since_ns) if holder.since_ns else 0.0,
            )
        else:
            fields.update(depth=0, holder_pid=0, holder_ident=0, holder_native_id=0, holder_name=b"",
                          holder_operation=b"", held_since_unix=0.0)
        shown = waiters[:MAX_WAITERS]
        fields.update(
            oldest_wait_since_unix=unix(waiters[0].since_ns) if waiters else 0.0,
            waiter_native_ids=[w.native_id or 0 for w in shown] + [0] * (MAX_WAITERS - len(shown)),
            waiter_since_unix=[unix(w.since_ns) for w in shown] + [0.0] * (MAX_WAITERS - len(shown)),
            waiter_names=b"".join(_fixed(w.thread_name, THREAD_NAME_BYTES).ljust(THREAD_NAME_BYTES, b"\0") for w in shown),
        )
        self._write_record(live.slot, fields)

    def write_all(self, locks: Iterable[LockRecord], status: ProcessStatus) -> None:
        """Every lock's record, then the header."""
        with self._lock:
            if self._closed:
                return
            for lock in locks:
                self.write_lock(lock)
            self._retire_collected()
            self.write_header(status)

    def attach_locks(self, locks: Iterable[LockRecord]) -> None:
        """Give these locks their records now: from now on they count in the file."""
        if not self.owned_here():
            return
        with self._lock:
            if self._closed:
                return
            for lock in locks:
                self._slot_of(lock)
            if self._header_dirty:
                self.write_header(self._last_status, beat=False)

    def write_one(self, lock: LockRecord, timeout: float = 0.05) -> None:
        """From a lock's slow path: never wait long for the tick's writer."""
        if not self.owned_here() or not self._lock.acquire(True, timeout):
            return
        try:
            if self._closed:
                return
            self.write_lock(lock)
            if self._header_dirty:
                self.write_header(self._last_status, beat=False)
        finally:
            self._lock.release()


_EMPTY_RECORD: dict[str, Any] = dict(
    state=SLOT_FREE, block=0, instance=0, name=b"", held=0, orphaned=0, depth=0, n_waiters=0, holder_pid=0,
    holder_ident=0, holder_native_id=0, holder_name=b"", holder_operation=b"", held_since_unix=0.0,
    oldest_wait_since_unix=0.0, waiter_native_ids=[0] * MAX_WAITERS, waiter_since_unix=[0.0] * MAX_WAITERS, waiter_names=b"",
)
_MAX_WORDS = frozenset((C_WAIT_MAX, C_HOLD_MAX))
_EMPTY_BLOCK = bytes(BLOCK_SIZE)
_EMPTY_NAMES = bytes(OPERATION_NAMES_BYTES)
_U64_MAX = (1 << 64) - 1
assert OPERATION_BYTES == OPERATION_NAME_BYTES
_OTHER_NAME = OPERATION_OTHER.encode()
# The operation rows' words in a block, as read.
_ROW_WORDS = slice(COUNTERS_BYTES // 8, (COUNTERS_BYTES + OPERATION_WORDS_BYTES) // 8)
_NAME_BODY = struct.Struct(f"<II{OPERATION_NAME_BYTES}s")  # a name entry after its sequence word
_NAME_ENTRY = struct.Struct(f"<QII{OPERATION_NAME_BYTES}s")
assert _NAME_ENTRY.size == OPERATION_NAME_ENTRY
_NAMED = _NAME_ENTRY.pack(2, OPERATION_NAMED, 0, b"")[:12]  # a whole name entry's sequence word and kind


def _merge_rows(total: tuple[memoryview, memoryview], a: tuple[memoryview, memoryview],
               b: tuple[memoryview, memoryview]) -> None:
    """Into ``total`` (an empty block's rows and names), the rows of ``a``
    and ``b`` that counted, one row per name (other's row 0 for the rows
    past the last free one, and for a row without a whole name); names first."""
    words = [0] * (OPERATION_SLOTS * N_OPERATION_WORDS)
    rows: dict[bytes, int] = {}
    for source_words, source_names in (a, b):
        source = source_words.tolist()
        for row in range(OPERATION_SLOTS):
            if not (source[row * N_OPERATION_WORDS + O_HOLDS] or source[row * N_OPERATION_WORDS + O_WAITS]):
                continue
            into = row if row <= OPERATION_UNNAMED_ROW else 0
            if row > OPERATION_UNNAMED_ROW:
                seq, kind, _, text = _NAME_ENTRY.unpack_from(source_names, row * OPERATION_NAME_ENTRY)
                if seq == 2 and kind == OPERATION_NAMED:
                    found = rows.get(text)
                    if found is None and len(rows) + OPERATION_UNNAMED_ROW + 1 < OPERATION_SLOTS:
                        found = rows[text] = len(rows) + OPERATION_UNNAMED_ROW + 1
                        store_guarded(total[1], found * OPERATION_NAME_ENTRY, 2, _NAME_BODY.pack(OPERATION_NAMED, 0, text))
                    into = found or 0
            for word in range(N_OPERATION_WORDS):
                at, value = into * N_OPERATION_WORDS + word, source[row * N_OPERATION_WORDS + word]
                words[at] = max(words[at], value) if word == O_HOLD_MAX else words[at] + value
    total[0][:] = array("Q", [min(word, _U64_MAX) for word in words])


def _flatten(fields: list[tuple[str, str, Any]], values: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for name, _code, dtype in fields:
        value = values[name]
        if isinstance(dtype, tuple):
            out.extend(value)
        else:
            out.append(value)
    return out


def _unflatten(fields: list[tuple[str, str, Any]], values: tuple[Any, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    position = 0
    for name, _code, dtype in fields:
        if isinstance(dtype, tuple):
            out[name] = list(values[position : position + dtype[1]])
            position += dtype[1]
        else:
            out[name] = values[position]
            position += 1
    return out


# -- reading ---------------------------------------------------------------


class ProcessState:
    """One state file as read: its header (numpy record of PROCESS_DTYPE, the
    fork counters included) and lock records (LOCK_DTYPE: one per live lock
    instance and per retired name, with their counters)."""

    __slots__ = ("path", "header", "records", "operation_keys", "operation_counts", "file_uid", "torn", "file_id", "workload")

    def __init__(self, path: str, header: np.void, records: np.ndarray, file_uid: int, torn: bool = False,
                 file_id: tuple[int, int] | None = None,
                 operations: tuple[list[tuple[bytes, bytes]], np.ndarray] | None = None) -> None:
        self.path = path
        self.header = header
        # Read once: the daemon asks for it at every step of a scan.
        self.workload = text_from_file(header["workload"])
        self.records = records
        # Contention by operation: (lock, operation) as raw names, and each
        # one's words (OPERATION_COUNTERS, uint64), a row each; a name may
        # come more than once (instances of a lock).
        self.operation_keys, self.operation_counts = operations if operations is not None else _no_operations()
        self.file_uid = file_uid
        # (st_dev, st_ino) of the file as read: it still names the process's
        # mapping after the file is unlinked (the mapping keeps the inode).
        self.file_id = file_id
        # Read as it is although its writer's sequence counters were odd:
        # only for a process that is gone (the counters are still exact).
        self.torn = torn

    def __repr__(self) -> str:
        return f"ProcessState(path={self.path!r}, pid={self.pid}, file_uid={self.file_uid})"

    @property
    def pid(self) -> int:
        return int(self.header["pid"])

    @property
    def start_ticks(self) -> int:
        return int(self.header["start_ticks"])

    @property
    def heartbeat_unix(self) -> float:
        return float(self.header["heartbeat_unix"])

    @property
    def versions(self) -> dict[str, str]:
        """What the process runs: each of VERSION_FIELDS, "" when it did not say."""
        return {name: text_from_file(self.header[name]) for name in VERSION_FIELDS}

    @property
    def stacks_path(self) -> str:
        return self.path[: -len(STATE_SUFFIX)] + STACKS_SUFFIX

    @property
    def watchdog_running(self) -> bool:
        """Its watchdog ran at the last write: the heartbeat is live and every
        record is rewritten each tick. Without one (a process that forked with
        no thread of its own, a child that has not needed one yet) nothing
        beats, and the records are as of the last write (``heartbeat_unix``)."""
        return bool(self.header["watchdog_running"])

    @property
    def wait_timeout(self) -> float | None:
        """The process's own ``wait_timeout`` (None: off)."""
        return float(self.header["wait_timeout"]) or None

    @property
    def hold_timeout(self) -> float | None:
        """The process's own ``hold_timeout`` (None: off)."""
        return float(self.header["hold_timeout"]) or None

    def holds_seen_at(self, now_unix: float) -> float:
        """When the holds in the records were last known to be current: now
        for a watched process; the last write for one without a watchdog, whose
        holds may have ended since (a wait is recorded by the waiter, and one
        without a watchdog is a single-threaded child's, on an orphaned lock)."""
        return float(holds_seen_at(self.header, now_unix))

    def operation_records(self) -> list[OperationRecord]:
        """Contention by operation, the most held first (each lock name's
        instances, collected ones included, as one)."""
        totals: dict[tuple[str, str], OperationRecord] = {}
        for (lock, operation), counts in zip(self.operation_keys, self.operation_counts.tolist()):
            record = OperationRecord(text_from_file(lock), text_from_file(operation), *counts)
            key = (record.lock, record.operation)
            totals[key] = record if key not in totals else totals[key].plus(record)
        out = list(totals.values())
        out.sort(key=lambda r: (-r.hold_sum_ns, r.lock, r.operation))
        return out

    def locks(self, now_unix: float | None = None, histograms: bool = False) -> list[dict[str, Any]]:
        """The lock records as plain data (for status and logs); with
        ``histograms``, each also has ``wait`` and ``hold``: its per-bucket
        counts (``buckets``, one per bound and +Inf), ``sum_seconds`` and
        ``max_seconds`` (a wait is counted only when it was contended)."""
        now_unix = time.time() if now_unix is None else now_unix
        holds_seen_at = self.holds_seen_at(now_unix)
        out = []
        for record in self.records:
            holder = None
            if record["held"]:
                since = float(record["held_since_unix"])
                holder = {
                    "pid": int(record["holder_pid"]) or None,
                    "thread_ident": int(record["holder_ident"]) or None,
                    "native_id": int(record["holder_native_id"]) or None,
                    "thread_name": text_from_file(record["holder_name"]) or None,
                    "operation": text_from_file(record["holder_operation"]) or None,
                    "held_since_unix": since or None,
                    "hold_age_seconds": max(0.0, holds_seen_at - since) if since else None,
                    "depth": int(record["depth"]),
                }
            n_shown = min(int(record["n_waiters"]), MAX_WAITERS)
            names = bytes(record["waiter_names"])
            waiters = [
                {
                    "native_id": int(record["waiter_native_ids"][i]) or None,
                    "thread_name": text_from_file(names[i * THREAD_NAME_BYTES : (i + 1) * THREAD_NAME_BYTES]) or None,
                    "wait_seconds": max(0.0, now_unix - float(record["waiter_since_unix"][i])),
                }
                for i in range(n_shown)
            ]
            oldest = float(record["oldest_wait_since_unix"])
            out.append({
                "lock": text_from_file(record["name"]),
                "acquisitions": int(record["acquisitions"]),
                "contentions": int(record["contentions"]),
                "orphaned": bool(record["orphaned"]),
                "holder": holder,
                "waiters": int(record["n_waiters"]),
                # The oldest MAX_WAITERS waiters are recorded; the count is of all.
                "waiting_threads": waiters,
                "waiters_unrecorded": int(record["n_waiters"]) - n_shown,
                "oldest_wait_seconds": max(0.0, now_unix - oldest) if oldest else 0.0,
            })
            if histograms:
                for kind in ("wait", "hold"):
                    out[-1][kind] = {
                        "buckets": [int(count) for count in record[f"{kind}_buckets"]],
                        "sum_seconds": int(record[f"{kind}_sum_ns"]) / 1e9,
                        "max_seconds": int(record[f"{kind}_max_ns"]) / 1e9,
                    }
        return out


_CONTROL = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0)], "?")


def text_from_file(raw: Any) -> str:
    """A name from a file: never a control character (escape sequences on an
    operator's terminal, broken log lines)."""
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace").translate(_CONTROL)


def read_state_file(path: str, daemon_uid: int | None = None, retries: int = 3, accept_torn: bool = False,
                    dir_fd: int | None = None) -> ProcessState:
    """Read one state file, or raise :class:`StateFileError` saying why it is skipped.

    Opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` on the
    open descriptor, so a file swapped for a symlink or a FIFO between the
    directory listing and the read is refused, not followed or waited on.
    ``accept_torn``: for a file whose writer is dead. One whose sequence
    counters stay odd (its writer died in the middle of a write) is returned
    as it is, marked ``torn``, instead of raising ``busy``; and every lock
    record in use is read, also one made after the header's last write.
    """
    daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
    try:
        fd = open_for_reading(path, dir_fd)  # dir_fd: the checked directory's descriptor
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StateFileError("symlink", "is a symlink") from None
        raise StateFileError("unreadable", f"cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateFileError("not_regular", "is not a regular file")
        if daemon_uid != 0 and info.st_uid != daemon_uid:
            raise StateFileError("foreign_owner", f"owned by uid {info.st_uid}, not by this user")
        if info.st_size != FILE_SIZE:
            raise StateFileError("truncated", f"truncated or corrupt: {info.st_size} bytes, expected {FILE_SIZE}")
        last = None
        for attempt in range(retries):
            last = _read_tables(fd, every_slot=accept_torn)
            if last[3]:
                break
            time.sleep(0.001 * (attempt + 1))
        assert last is not None
        head, fork_counters, table, consistent = last
        if not consistent and not accept_torn:
            raise StateFileError("busy", "being written too often to read a consistent copy")
        header, records, rows = _decode(fd, head, fork_counters, table)
        if int(header["uid"]) != info.st_uid:
            raise StateFileError("foreign_owner", f"names uid {int(header['uid'])} but the file belongs to uid {info.st_uid}")
        operations = _read_operations(fd, records, rows)
        return ProcessState(path=path, header=header, records=records, file_uid=info.st_uid,
                            torn=not consistent, file_id=(info.st_dev, info.st_ino), operations=operations)
    finally:
        os.close(fd)


def read_recorder(state: ProcessState, limit: int | None = None) -> list[dict[str, Any]]:
    """The newest ``limit`` entries of ``state``'s flight recorder, oldest
    first, read now from the very file ``state`` was read from; raises
    :class:`StateFileError` when it cannot be (gone, replaced)."""
    try:
        fd = open_for_reading(state.path, None)
    except OSError as exc:
        raise StateFileError("unreadable", f"cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if state.file_id is not None and (info.st_dev, info.st_ino) != state.file_id:
            raise StateFileError("replaced", "is another file now")
        if not stat.S_ISREG(info.st_mode) or info.st_size != FILE_SIZE:
            raise StateFileError("truncated", f"truncated or corrupt: {info.st_size} bytes, expected {FILE_SIZE}")
        try:
            return recorder.read_region(lambda: os.pread(fd, recorder.REGION_BYTES, RECORDER_OFFSET), limit)
        except ValueError as exc:
            raise StateFileError("corrupt", f"corrupt flight recorder: {exc}") from None
    finally:
        os.close(fd)


def _read_tables(fd: int, every_slot: bool = False) -> tuple[bytes, bytes, bytes, bool]:
    """(header bytes, fork counter bytes, record bytes, consistent): the
    header and the records each read twice; consistent when both copies
    agree and every sequence counter is even. The records the header counts,
    or with ``every_slot`` all of them (a dead writer's last record may be
    past the header's count). The header, the fork counters and the records
    lie one after the other from offset 0: each copy is one read."""
    first = os.pread(fd, RECORDS_OFFSET + _FIRST_READ_RECORDS * RECORD_SIZE, 0)
    if len(first) < RECORDS_OFFSET:
        raise StateFileError("truncated", "truncated header")
    head = first[:HEADER_SIZE]
    if head[:8] != MAGIC:
        raise StateFileError("corrupt", "corrupt: bad magic")
    version = _U32.unpack_from(head, 8)[0]
    if version != VERSION:
        raise StateFileError("version", f"unsupported layout version {version} (this h5watch reads {VERSION})")
    if struct.unpack_from("<III", head, 12) != (HEADER_SIZE, RECORD_SIZE, CAPACITY):
        raise StateFileError("corrupt", "corrupt: sizes do not match the layout version")
    n_slots = _U32.unpack_from(head, _N_SLOTS_OFFSET)[0]
    if n_slots > CAPACITY:
        raise StateFileError("corrupt", f"corrupt: {n_slots} lock records, capacity {CAPACITY}")
    if every_slot:
        n_slots = CAPACITY
    size = RECORDS_OFFSET + n_slots * RECORD_SIZE
    whole = first[:size] if len(first) >= size else os.pread(fd, size, 0)
    if len(whole) != size:
        raise StateFileError("truncated", "truncated records")
    again = os.pread(fd, size, 0)
    table = whole[RECORDS_OFFSET:]
    # The copies agree on the header and the records (the fork counters, which only grow, are not compared).
    steady = head == again[:HEADER_SIZE] and table == again[RECORDS_OFFSET:]
    seqs_even = _SEQ.unpack_from(head, _HEADER_SEQ_OFFSET)[0] % 2 == 0 and all(
        _SEQ.unpack_from(table, i * RECORD_SIZE)[0] % 2 == 0 for i in range(n_slots))
    return head, whole[FORKS_OFFSET:RECORDS_OFFSET], table, seqs_even and steady


def _decode(fd: int, head: bytes, fork_counters: bytes, table: bytes) -> tuple[np.void, np.ndarray, np.ndarray]:
    """The header with the fork counters, one LOCK_DTYPE row per counted
    record, and the counted records' operation rows' words (OPERATION_SLOTS
    rows of N_OPERATION_WORDS a record, one record after the other)."""
    import numpy as np

    dtypes = _dtypes()
    forks = bytearray(fork_counters)
    _counter_words(np.frombuffer(forks, dtype="<u8"))
    header = np.frombuffer(bytearray(head + bytes(forks)), dtype=dtypes["PROCESS_DTYPE"], count=1)[0]
    for name, field, offset in _HEADER_TIMES:
        if not 0 <= field.unpack_from(head, offset)[0] < _TIME_LIMIT:  # NaN fails too
            header[name] = 0.0
    n = len(table) // RECORD_SIZE
    # (seq, state, block) of each record: a few records are cheaper to look
    # at one by one than as numpy columns.
    prefixes = [_RECORD_PREFIX.unpack_from(table, i * RECORD_SIZE) for i in range(n)]
    # A record whose first write never finished (sequence word 1: its writer
    # died in it) counts nothing yet: its counters move in after it.
    counted = [i for i, (seq, state, block) in enumerate(prefixes)
               if (state == SLOT_LIVE or state == SLOT_RETIRED) and block < CAPACITY and seq >= 2]
    if _U32.unpack_from(head, _MERGE_ACTIVE_OFFSET)[0]:
        # Interrupted between the steps of a merge (see the module docstring).
        source, into, block = (int(header[k]) for k in ("merge_from", "merge_into", "merge_block"))
        if into < n and source < n and prefixes[into][2] == block:
            counted = [i for i in counted if i != source]
    lock_dtype = dtypes["LOCK_DTYPE"]
    if not counted:
        return header, np.zeros(0, dtype=lock_dtype), np.zeros((0, OPERATION_WORDS_BYTES // 8), dtype="<u8")
    blocks = [prefixes[i][2] for i in counted]
    span = max(blocks) + 1
    raw = os.pread(fd, span * BLOCK_SIZE, BLOCKS_OFFSET)
    if len(raw) != span * BLOCK_SIZE:
        raise StateFileError("truncated", "truncated counters")
    # Each counted record's bytes followed by its block's counters, as LOCK_DTYPE lays them out.
    combined = bytearray(b"".join(
        table[i * RECORD_SIZE:(i + 1) * RECORD_SIZE] + raw[b * BLOCK_SIZE:b * BLOCK_SIZE + COUNTERS_BYTES]
        for i, b in zip(counted, blocks)))
    rows = np.frombuffer(raw, dtype="<u8").reshape(span, BLOCK_SIZE // 8)[blocks, _ROW_WORDS]  # a copy

    words = np.frombuffer(combined, dtype="<u8").reshape(len(counted), (RECORD_SIZE + COUNTERS_BYTES) // 8)
    _counter_words(words[:, RECORD_SIZE // 8:])
    columns = dtypes["RECORD_TIME_COLUMNS"]
    times = words[:, columns]  # a copy
    # One comparison of the bits: 0 <= t < _TIME_LIMIT exactly when the
    # double's bit pattern is below the limit's (a negative number has its
    # sign bit set, a NaN or infinity the top exponent).
    bad = times >= _TIME_LIMIT_BITS
    if bad.any():
        times[bad] = 0  # the bits of 0.0
        words[:, columns] = times
    out = np.frombuffer(combined, dtype=lock_dtype)
    return header, out, rows


def _no_operations() -> tuple[list[tuple[bytes, bytes]], np.ndarray]:
    import numpy as np

    return [], np.zeros((0, N_OPERATION_WORDS), dtype=np.uint64)


def _read_operations(fd: int, records: np.ndarray, words: np.ndarray) -> tuple[list[tuple[bytes, bytes]], np.ndarray]:
    """Contention by operation: (lock, operation) and the words of each row
    that counted in each of ``records``, from ``words`` (their rows' words,
    read with their counters) and the names of the rows that counted, read
    now: such a row's name was written before its first count, so it was
    whole before the words were read (see the module docstring)."""
    import numpy as np

    if not len(records):
        return _no_operations()
    rows = words.reshape(len(records) * OPERATION_SLOTS, N_OPERATION_WORDS)
    used = np.flatnonzero(rows[:, O_HOLDS] | rows[:, O_WAITS]).tolist()
    if not used:
        return _no_operations()
    counts = rows[used]
    _counter_words(counts)
    locks = records["name"].tolist()
    keys: list[tuple[bytes, bytes]] = []
    named: list[tuple[int, int, int]] = []  # (key, record, row) of the rows that have a name
    for index in used:
        at, row = divmod(index, OPERATION_SLOTS)
        if row > OPERATION_UNNAMED_ROW:
            named.append((len(keys), at, row))
        keys.append((locks[at], locks[at] if row else _OTHER_NAME))
    if named:
        blocks = records["block"].tolist()
        last = {at: row for _, at, row in named}  # each record's last (rows come in order)
        names = {at: os.pread(fd, (row + 1) * OPERATION_NAME_ENTRY, NAMES_OFFSET + blocks[at] * OPERATION_NAMES_BYTES)
                 for at, row in last.items()}
        if any(len(names[at]) != (row + 1) * OPERATION_NAME_ENTRY for at, row in last.items()):
            raise StateFileError("truncated", "truncated operation names")
        for i, at, row in named:
            entries, start = names[at], row * OPERATION_NAME_ENTRY
            # Taken when its sequence word is 2 and its kind OPERATION_NAMED: whole.
            whole = entries[start : start + 12] == _NAMED
            keys[i] = (locks[at], entries[start + 16 : start + OPERATION_NAME_ENTRY].rstrip(b"\0") if whole else _OTHER_NAME)
    return keys, counts


# Times and intervals as read: NaN, infinities, negatives and values past the
# year 9000 (a forged or damaged file) read as 0, "unknown".
_TIME_LIMIT = 2.5e11
_TIME_LIMIT_BITS = struct.unpack("<Q", struct.pack("<d", _TIME_LIMIT))[0]


def _counter_words(words: Any) -> None:
    """Counters as read, in place: a value no real count reaches (a forged
    or damaged file) is read as 0, so sums cannot wrap."""
    words[words >= (1 << 62)] = 0


def concat_records(arrays: list[np.ndarray]) -> np.ndarray:
    """Several processes' records as one array (as raw rows: numpy would
    otherwise compare the structured dtypes field by field for each)."""
    return _concat(arrays, "LOCK_DTYPE")


def holds_seen_at(headers: Any, now_unix: float) -> Any:
    """``ProcessState.holds_seen_at`` for one header or an array of them."""
    import numpy as np

    return np.where(headers["watchdog_running"] != 0, now_unix, np.minimum(now_unix, headers["heartbeat_unix"]))


def concat_headers(headers: list[np.void]) -> np.ndarray:
    """Several processes' headers (PROCESS_DTYPE, as read) as one array."""
    import numpy as np

    return np.frombuffer(b"".join(header.tobytes() for header in headers), dtype=_dtypes()["PROCESS_DTYPE"])


def _concat(arrays: list[np.ndarray], dtype_name: str) -> np.ndarray:
    import numpy as np

    dtype: np.dtype = _dtypes()[dtype_name]
    raw = np.concatenate([a.view(np.uint8).reshape(len(a), dtype.itemsize) for a in arrays])
    return raw.view(dtype).reshape(len(raw))
