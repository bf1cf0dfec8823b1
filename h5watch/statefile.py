"""The per-process state file: a fixed, versioned binary layout on an mmap.

Every instrumented process (every forked child too) owns one file,
``<pid>-<start ticks>.h5w`` in ``state_dir``, mode 0600::

    header   HEADER_SIZE bytes: magic, version, sizes, seq, pid, start ticks,
             uid, dump signal, workload, heartbeat, forks, fork waits
    records  CAPACITY x RECORD_SIZE bytes: one per watched lock (counters,
             histograms, holder identity, waiters, oldest wait, orphan flag)

All integers are little-endian. The same field list gives the writer's
``struct`` format and the reader's numpy dtype, so the two cannot drift.
Writing needs only ``struct`` and ``mmap``: numpy is imported by the first
read (the daemon, ``h5watch status``) or use of the dtypes, never by an
instrumented process that only writes its file.

Torn reads: the header and each record start with a sequence counter. The
writer makes it odd, writes the body, makes it even (a seqlock). A reader
copies the bytes, copies them again, and accepts them only when every
counter is even and unchanged; otherwise it retries, then gives up for this
scan. Writers of one file are serialised by one lock of the writer's own.

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
from typing import TYPE_CHECKING, Any, Iterable

from .statedir import (  # noqa: F401 (re-exported: the directory's API)
    STACKS_SUFFIX,
    STATE_SUFFIX,
    StateDirError,
    check_state_dir,
    ensure_state_dir,
    list_state_files,
    proc_start_ticks,
    proc_stat,
    process_identity,
)
from .stats import N_BUCKETS, ORPHAN_ACTIONS, TIMEOUT_KINDS

__all__ = [
    "DUMP_SIGNAL",
    "MAGIC",
    "VERSION",
    "CAPACITY",
    "HEADER_DTYPE",
    "RECORD_DTYPE",
    "StateDirError",
    "StateFileError",
    "StateWriter",
    "ProcessState",
    "ensure_state_dir",
    "check_state_dir",
    "proc_start_ticks",
    "read_state_file",
    "state_file_name",
    "list_state_files",
    "process_identity",
    "STATE_SUFFIX",
    "STACKS_SUFFIX",
]

# h5watch's stack-dump signal: a real-time signal nobody else is likely to
# use, the same number in every process (the daemon never takes it from a file).
DUMP_SIGNAL = int(signal.SIGRTMIN) + 6 if hasattr(signal, "SIGRTMIN") else int(signal.SIGUSR2)
MAGIC = b"H5WATCH\0"
VERSION = 1
CAPACITY = 16
MAX_WAITERS = 4
NAME_BYTES = 64
OPERATION_BYTES = 128
THREAD_NAME_BYTES = 48

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
    ("n_locks", "I", "<u4"),
    ("watchdog_running", "I", "<u4"),
    ("tick_interval", "f", "<f4"),
    ("forks", "Q", "<u8"),
    ("fork_wait_buckets", f"{N_BUCKETS}Q", ("<u8", N_BUCKETS)),
    ("fork_wait_sum_ns", "Q", "<u8"),
    ("fork_wait_max_ns", "Q", "<u8"),
    ("fork_since_unix", "d", "<f8"),
]

_RECORD_FIELDS = [
    ("seq", "Q", "<u8"),
    ("name", f"{NAME_BYTES}s", f"S{NAME_BYTES}"),
    ("acquisitions", "Q", "<u8"),
    ("contentions", "Q", "<u8"),
    ("reentries", "Q", "<u8"),
    ("wait_buckets", f"{N_BUCKETS}Q", ("<u8", N_BUCKETS)),
    ("wait_sum_ns", "Q", "<u8"),
    ("wait_max_ns", "Q", "<u8"),
    ("hold_buckets", f"{N_BUCKETS}Q", ("<u8", N_BUCKETS)),
    ("hold_sum_ns", "Q", "<u8"),
    ("hold_max_ns", "Q", "<u8"),
    ("timeouts", f"{len(TIMEOUT_KINDS)}Q", ("<u8", len(TIMEOUT_KINDS))),
    ("orphans", f"{len(ORPHAN_ACTIONS)}Q", ("<u8", len(ORPHAN_ACTIONS))),
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


def _struct(fields: list[tuple[str, str, Any]]) -> struct.Struct:
    return struct.Struct("<" + "".join(code for _, code, _ in fields))


if TYPE_CHECKING:
    import numpy as np


def _dtype(fields: list[tuple[str, str, Any]], size: int) -> np.dtype:
    import numpy as np

    base = np.dtype([(name, dtype) for name, _, dtype in fields])
    return np.dtype({"names": base.names, "formats": [base.fields[n][0] for n in base.names],
                     "offsets": [base.fields[n][1] for n in base.names], "itemsize": size})


_HEADER_STRUCT = _struct(_HEADER_FIELDS)
_RECORD_STRUCT = _struct(_RECORD_FIELDS)
HEADER_SIZE = 512
RECORD_SIZE = (_RECORD_STRUCT.size + 63) // 64 * 64
assert _HEADER_STRUCT.size <= HEADER_SIZE

# struct.pack_into zero-fills its whole target before writing, so the
# sequence counter must never be inside a packed region: each write packs
# only what follows it. The header's constant prefix is written once.
_SEQ_INDEX = [name for name, _, _ in _HEADER_FIELDS].index("seq")
_HEADER_PREFIX_FIELDS = _HEADER_FIELDS[:_SEQ_INDEX]
_HEADER_TAIL_FIELDS = _HEADER_FIELDS[_SEQ_INDEX + 1 :]
_RECORD_TAIL_FIELDS = _RECORD_FIELDS[1:]
assert _RECORD_FIELDS[0][0] == "seq"
_HEADER_PREFIX = _struct(_HEADER_PREFIX_FIELDS)
_HEADER_TAIL = _struct(_HEADER_TAIL_FIELDS)
_RECORD_TAIL = _struct(_RECORD_TAIL_FIELDS)
FILE_SIZE = HEADER_SIZE + CAPACITY * RECORD_SIZE
_SEQ = struct.Struct("<Q")
# "<" formats have no padding: the sequence counter follows the prefix.
_HEADER_SEQ_OFFSET = _HEADER_PREFIX.size
_DTYPES: dict[str, Any] = {}


def _dtypes() -> dict[str, Any]:
    """HEADER_DTYPE and RECORD_DTYPE, built (and numpy imported) on first use."""
    if not _DTYPES:
        header, record = _dtype(_HEADER_FIELDS, HEADER_SIZE), _dtype(_RECORD_FIELDS, RECORD_SIZE)
        assert header.itemsize == HEADER_SIZE and record.itemsize == RECORD_SIZE
        assert header.fields["seq"][1] == _HEADER_SEQ_OFFSET
        _DTYPES.update(HEADER_DTYPE=header, RECORD_DTYPE=record)
    return _DTYPES


def __getattr__(name: str) -> Any:
    if name in ("HEADER_DTYPE", "RECORD_DTYPE"):
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


# -- writing ---------------------------------------------------------------


class StateWriter:
    """This process's state file. Create it in the process that owns it (a
    forked child creates its own: the parent's mapping is shared)."""

    def __init__(self, directory: str, workload: str, dump_signal: int, tick_interval: float) -> None:
        self.pid = os.getpid()
        self.start_ticks = proc_start_ticks(self.pid) or 0
        self.directory = directory
        base = os.path.join(directory, state_file_name(self.pid, self.start_ticks))
        self.path = base
        self.stacks_path = base[: -len(STATE_SUFFIX)] + STACKS_SUFFIX
        self._lock = threading.Lock()
        # Set under _lock once the mapping is closed: a write from another
        # thread (the watchdog ticking during interpreter exit) then does nothing.
        self._closed = False
        self._slots: dict[str, int] = {}
        self._header_seq = 0
        self._record_seqs = [0] * CAPACITY
        self._new_slot = False
        self._heartbeat = time.time()
        self._last_header_args: tuple[Any, bool] = (None, False)
        # Made under a name no reader lists, and renamed once its header is
        # written: a scan never finds the file half-made (files are created
        # whenever a process first has something to write, not only at start).
        making = os.path.join(directory, f".{os.path.basename(base)}.new")
        fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, FILE_SIZE)
            self._map = mmap.mmap(fd, FILE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self._fixed_header = dict(
            magic=MAGIC, version=VERSION, header_size=HEADER_SIZE, record_size=RECORD_SIZE, capacity=CAPACITY,
            pid=self.pid, start_ticks=self.start_ticks, uid=os.geteuid(), dump_signal=dump_signal,
            workload=_fixed(workload, NAME_BYTES), started_unix=time.time(), tick_interval=tick_interval,
        )
        self.write_header(fork_stats=None, watchdog_running=False)
        try:
            os.rename(making, base)
        except OSError:
            self._map.close()
            try:
                os.unlink(making)
            except OSError:
                pass
            raise

    def owned_here(self) -> bool:
        return os.getpid() == self.pid

    def close(self, exited: bool = True) -> None:
        if self.owned_here():
            with self._lock:
                if exited and not self._closed:
                    self.write_header(*self._last_header_args, exited=True, beat=False)
                self._closed = True
                self._close_map()
        else:
            # A forked child's copy: its lock may be held by a thread that did
            # not survive the fork, and no other thread of the child uses it.
            self._closed = True
            self._close_map()

    def _close_map(self) -> None:
        try:
            self._map.close()
        except (ValueError, BufferError):
            pass

    # Callers hold self._lock (or, in a fresh child, are the only thread).

    def write_header(self, fork_stats: Any, watchdog_running: bool, exited: bool = False, beat: bool = True) -> None:
        """``beat``: this write is a heartbeat (the watchdog's tick); else the last one is kept."""
        self._last_header_args = (fork_stats, watchdog_running)
        if beat:
            self._heartbeat = time.time()
        fields = dict(self._fixed_header)
        fork_since = 0.0
        if fork_stats is not None:
            snap, since_ns = fork_stats
            fields.update(forks=snap["forks"], fork_wait_buckets=snap["wait"]["buckets"],
                          fork_wait_sum_ns=snap["wait"]["sum_ns"], fork_wait_max_ns=snap["wait"]["max_ns"])
            if since_ns is not None:
                fork_since = time.time() - (time.monotonic_ns() - since_ns) / 1e9
        else:
            fields.update(forks=0, fork_wait_buckets=[0] * N_BUCKETS, fork_wait_sum_ns=0, fork_wait_max_ns=0)
        fields.update(heartbeat_unix=self._heartbeat, exited=int(exited), n_locks=len(self._slots),
                      watchdog_running=int(watchdog_running), fork_since_unix=fork_since)
        if self._header_seq == 0:
            _HEADER_PREFIX.pack_into(self._map, 0, *_flatten(_HEADER_PREFIX_FIELDS, fields))
        self._header_seq += 1
        _SEQ.pack_into(self._map, _HEADER_SEQ_OFFSET, self._header_seq * 2 - 1)
        _HEADER_TAIL.pack_into(self._map, _HEADER_SEQ_OFFSET + 8, *_flatten(_HEADER_TAIL_FIELDS, fields))
        _SEQ.pack_into(self._map, _HEADER_SEQ_OFFSET, self._header_seq * 2)

    def slot(self, name: str) -> int | None:
        index = self._slots.get(name)
        if index is None:
            if len(self._slots) >= CAPACITY:
                return None
            index = self._slots[name] = len(self._slots)
            self._new_slot = True
        return index

    def write_lock(self, lock: Any, orphan: dict[str, Any] | None = None) -> None:
        index = self.slot(lock.name)
        if index is None:
            return
        now_ns = time.monotonic_ns()
        now_unix = time.time()
        snap = lock.stats.snapshot()
        orphan = orphan or lock._orphan
        holder = lock.holder(now_ns)
        if orphan is not None:
            holder = dict(orphan.get("holder") or {})
        waiters = lock.waiters(now_ns)
        fields: dict[str, Any] = dict(
            name=_fixed(lock.name, NAME_BYTES),
            acquisitions=snap["acquisitions"], contentions=snap["contentions"], reentries=snap["reentries"],
            wait_buckets=snap["wait"]["buckets"], wait_sum_ns=snap["wait"]["sum_ns"], wait_max_ns=snap["wait"]["max_ns"],
            hold_buckets=snap["hold"]["buckets"], hold_sum_ns=snap["hold"]["sum_ns"], hold_max_ns=snap["hold"]["max_ns"],
            timeouts=[snap["timeouts"][k] for k in TIMEOUT_KINDS], orphans=[snap["orphans"][k] for k in ORPHAN_ACTIONS],
            held=int(holder is not None), orphaned=int(orphan is not None), n_waiters=len(waiters),
        )
        if holder is not None:
            since_ns = holder.get("since_ns")
            fields.update(
                depth=holder.get("depth") or 0,
                holder_pid=holder.get("pid") or 0,
                holder_ident=max(0, holder.get("thread_ident") or 0),
                holder_native_id=holder.get("native_id") or 0,
                holder_name=_fixed(holder.get("thread_name"), THREAD_NAME_BYTES),
                holder_operation=_fixed(holder.get("operation"), OPERATION_BYTES),
                held_since_unix=(now_unix - (now_ns - since_ns) / 1e9) if since_ns else 0.0,
            )
        else:
            fields.update(depth=0, holder_pid=0, holder_ident=0, holder_native_id=0, holder_name=b"",
                          holder_operation=b"", held_since_unix=0.0)
        shown = waiters[:MAX_WAITERS]
        fields.update(
            oldest_wait_since_unix=(now_unix - waiters[0]["wait_seconds"]) if waiters else 0.0,
            waiter_native_ids=[w["native_id"] or 0 for w in shown] + [0] * (MAX_WAITERS - len(shown)),
            waiter_since_unix=[now_unix - w["wait_seconds"] for w in shown] + [0.0] * (MAX_WAITERS - len(shown)),
            waiter_names=b"".join(_fixed(w["thread_name"], THREAD_NAME_BYTES).ljust(THREAD_NAME_BYTES, b"\0") for w in shown),
        )
        offset = HEADER_SIZE + index * RECORD_SIZE
        self._record_seqs[index] += 1
        seq = self._record_seqs[index] * 2
        _SEQ.pack_into(self._map, offset, seq - 1)
        _RECORD_TAIL.pack_into(self._map, offset + 8, *_flatten(_RECORD_TAIL_FIELDS, fields))
        _SEQ.pack_into(self._map, offset, seq)

    def write_all(self, locks: Iterable[Any], fork_stats: Any, watchdog_running: bool) -> None:
        with self._lock:
            if self._closed:
                return
            for lock in locks:
                self.write_lock(lock)
            self.write_header(fork_stats, watchdog_running)
            self._new_slot = False

    def write_one(self, lock: Any, timeout: float = 0.05, orphan: dict[str, Any] | None = None) -> None:
        """From a lock's slow path: never wait long for the tick's writer."""
        if not self.owned_here() or not self._lock.acquire(True, timeout):
            return
        try:
            if self._closed:
                return
            self.write_lock(lock, orphan)
            if self._new_slot:
                self._new_slot = False
                self.write_header(*self._last_header_args, beat=False)
        finally:
            self._lock.release()


def _flatten(fields: list[tuple[str, str, Any]], values: dict[str, Any]) -> list[Any]:
    out: list[Any] = []
    for name, code, dtype in fields:
        value = values[name]
        if isinstance(dtype, tuple):
            out.extend(value)
        else:
            out.append(value)
    return out


# -- reading ---------------------------------------------------------------


class ProcessState:
    """One state file as read: its header (numpy record) and lock records."""

    __slots__ = ("path", "header", "records", "file_uid")

    def __init__(self, path: str, header: np.void, records: np.ndarray, file_uid: int) -> None:
        self.path = path
        self.header = header
        self.records = records
        self.file_uid = file_uid

    def __repr__(self) -> str:
        return f"ProcessState(path={self.path!r}, pid={self.pid}, file_uid={self.file_uid})"

    @property
    def pid(self) -> int:
        return int(self.header["pid"])

    @property
    def start_ticks(self) -> int:
        return int(self.header["start_ticks"])

    @property
    def workload(self) -> str:
        return _text(self.header["workload"])

    @property
    def heartbeat_unix(self) -> float:
        return float(self.header["heartbeat_unix"])

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

    def holds_seen_at(self, now_unix: float) -> float:
        """When the holds in the records were last known to be current: now
        for a watched process; the last write for one without a watchdog, whose
        holds may have ended since (a wait is recorded by the waiter, and one
        without a watchdog is a single-threaded child's, on an orphaned lock)."""
        return now_unix if self.watchdog_running else min(now_unix, self.heartbeat_unix)

    def locks(self, now_unix: float | None = None) -> list[dict[str, Any]]:
        """The lock records as plain data (for status and logs)."""
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
                    "thread_name": _text(record["holder_name"]) or None,
                    "operation": _text(record["holder_operation"]) or None,
                    "held_since_unix": since or None,
                    "hold_age_seconds": max(0.0, holds_seen_at - since) if since else None,
                    "depth": int(record["depth"]),
                }
            n_shown = min(int(record["n_waiters"]), MAX_WAITERS)
            names = bytes(record["waiter_names"])
            waiters = [
                {
                    "native_id": int(record["waiter_native_ids"][i]) or None,
                    "thread_name": _text(names[i * THREAD_NAME_BYTES : (i + 1) * THREAD_NAME_BYTES]) or None,
                    "wait_seconds": max(0.0, now_unix - float(record["waiter_since_unix"][i])),
                }
                for i in range(n_shown)
            ]
            oldest = float(record["oldest_wait_since_unix"])
            out.append({
                "lock": _text(record["name"]),
                "acquisitions": int(record["acquisitions"]),
                "contentions": int(record["contentions"]),
                "orphaned": bool(record["orphaned"]),
                "holder": holder,
                "waiters": int(record["n_waiters"]),
                "waiting_threads": waiters,
                "oldest_wait_seconds": max(0.0, now_unix - oldest) if oldest else 0.0,
            })
        return out


def _text(raw: Any) -> str:
    return bytes(raw).split(b"\0", 1)[0].decode("utf-8", "replace")


def read_state_file(path: str, daemon_uid: int | None = None, retries: int = 3) -> ProcessState:
    """Read one state file, or raise :class:`StateFileError` saying why it is skipped.

    Opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked with ``fstat`` on the
    open descriptor, so a file swapped for a symlink or a FIFO between the
    directory listing and the read is refused, not followed or waited on.
    """
    daemon_uid = os.geteuid() if daemon_uid is None else daemon_uid
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
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
        for _ in range(retries):
            first = _read_consistent(fd)
            if first is None:
                time.sleep(0.001)
                continue
            header, records = first
            if int(header["uid"]) != info.st_uid:
                raise StateFileError("foreign_owner", f"names uid {int(header['uid'])} but the file belongs to uid {info.st_uid}")
            return ProcessState(path=path, header=header, records=records, file_uid=info.st_uid)
        raise StateFileError("busy", "being written too often to read a consistent copy")
    finally:
        os.close(fd)


def _read_consistent(fd: int) -> tuple[np.void, np.ndarray] | None:
    import numpy as np

    dtypes = _dtypes()
    head = os.pread(fd, HEADER_SIZE, 0)
    if len(head) != HEADER_SIZE:
        raise StateFileError("truncated", "truncated header")
    header = np.frombuffer(head, dtype=dtypes["HEADER_DTYPE"], count=1)[0]
    if bytes(header["magic"]) != MAGIC.rstrip(b"\0"):  # numpy drops trailing NULs
        raise StateFileError("corrupt", "corrupt: bad magic")
    if int(header["version"]) != VERSION:
        raise StateFileError("version", f"unsupported layout version {int(header['version'])} (this h5watch reads {VERSION})")
    if (int(header["header_size"]), int(header["record_size"]), int(header["capacity"])) != (HEADER_SIZE, RECORD_SIZE, CAPACITY):
        raise StateFileError("corrupt", "corrupt: sizes do not match the layout version")
    n_locks = int(header["n_locks"])
    if n_locks > CAPACITY:
        raise StateFileError("corrupt", f"corrupt: {n_locks} lock records, capacity {CAPACITY}")
    body_size = n_locks * RECORD_SIZE
    body = os.pread(fd, body_size, HEADER_SIZE) if body_size else b""
    if len(body) != body_size:
        raise StateFileError("truncated", "truncated records")
    records = np.frombuffer(body, dtype=dtypes["RECORD_DTYPE"], count=n_locks)
    seqs = records["seq"]
    if int(header["seq"]) % 2 or (seqs % 2).any():
        return None
    again = os.pread(fd, HEADER_SIZE + body_size, 0)
    if again != head + body:
        return None
    return header, records
