"""The flight recorder's binary format: a ring of notable lock events.

One region of each process's state file (``h5watch.statefile`` reserves
it; everything about its bytes is here)::

    header   HEADER_BYTES: magic, entries, entry size
    entries  ENTRIES x ENTRY_BYTES, each:
             seq         u64  2 x (the entry's number + 1); odd while written
             kind        u32  index into schema.RECORDER_KINDS
             (reserved)  u32
             monotonic   i64  CLOCK_MONOTONIC ns when recorded
             time        f64  Unix time when recorded
             duration    i64  ns (the wait, the hold, the collection; 0: none)
             extra       i64  by kind (schema.RECORDER_EXTRA: waiters, a pid, ...)
             native_id   i64  the thread's native id (0: unknown)
             thread      THREAD_BYTES, its name (UTF-8, cut)
             lock        LOCK_BYTES, the lock's name
             operation   OPERATION_BYTES, what the thread was doing

All integers are little-endian.

Writing takes no lock at all (a thread that did not survive a fork could
hold one): the writer claims the entry's number from a counter that only
grows (``next()`` of an ``itertools.count``, atomic under the GIL), writes
the slot's sequence word odd, the body, then the even word that also says
which entry it is. Two writers could meet on one slot only a whole lap
apart; a claim of the slot under the GIL (a dict's ``setdefault``) lets the
earlier one finish, and the later one drops its entry.

Reading, from another process or while the process is frozen: the region
is copied twice, and an entry is taken only when its two copies are equal
and its sequence word is even and not zero. A writer frozen or killed in
the middle of an entry leaves that word odd: the entry is skipped, never
read torn. Entries come back oldest first, by their number.
"""

from __future__ import annotations

import itertools
import struct
from collections.abc import Callable, Iterable
from typing import Any

from h5watch.schema import RECORDER_ENTRIES, RECORDER_EXTRA, RECORDER_KINDS

__all__ = ["ENTRIES", "ENTRY_BYTES", "HEADER_BYTES", "REGION_BYTES", "MAGIC", "Ring", "init_region", "read_region",
           "decode_region", "render", "store_guarded", "store_seq"]

MAGIC = b"H5WREC1\0"
ENTRIES = RECORDER_ENTRIES
ENTRY_BYTES = 256
HEADER_BYTES = 64
THREAD_BYTES = 32
LOCK_BYTES = 48
OPERATION_BYTES = 120
REGION_BYTES = HEADER_BYTES + ENTRIES * ENTRY_BYTES

_HEADER = struct.Struct("<8sII")
_SEQ = struct.Struct("<Q")
# Everything after the sequence word.
_BODY = struct.Struct(f"<IIqdqqq{THREAD_BYTES}s{LOCK_BYTES}s{OPERATION_BYTES}s")
assert _SEQ.size + _BODY.size == ENTRY_BYTES
_KIND_INDEX = {kind: index for index, kind in enumerate(RECORDER_KINDS)}


def store_seq(buffer: Any, offset: int, value: int) -> None:
    """Write a sequence word in one aligned 8-byte copy: a writer killed here
    leaves the old word or the new one. (``struct.pack_into`` clears the
    word, then writes it byte by byte: a kill in between left a 0, read as
    "never written", or a value that was neither.)"""
    buffer[offset : offset + 8] = _SEQ.pack(value)


def store_guarded(buffer: Any, offset: int, seq: int, body: bytes) -> None:
    """A seqlock write: the sequence word at ``offset`` made odd (``seq - 1``),
    ``body`` copied in just after it, then the word made ``seq`` (even). A
    reader that finds the same even word before and after its copy has a
    whole entry; a writer killed on the way leaves the word odd and each byte
    of the body old or new (a copy, never ``pack_into``, which clears first)."""
    store_seq(buffer, offset, seq - 1)
    buffer[offset + 8 : offset + 8 + len(body)] = body
    store_seq(buffer, offset, seq)


def _fixed(text: str | None, size: int) -> bytes:
    return (text or "").encode("utf-8", "replace")[:size]


_CONTROL = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0)], "?")


def _text(raw: bytes) -> str:
    # Cut at the first NUL; a name cut inside a character reads with U+FFFD.
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").translate(_CONTROL)


def init_region(buffer: Any, offset: int = 0) -> None:
    """Mark an empty region (a new state file's) as a ring of this format."""
    _HEADER.pack_into(buffer, offset, MAGIC, ENTRIES, ENTRY_BYTES)


class Ring:
    """The writer's side of a ring in ``buffer`` at ``offset`` (a private
    ``bytearray`` until the state file exists, then the file's mapping)."""

    __slots__ = ("_buffer", "_offset", "_claim", "_busy", "_claimed")

    def __init__(self, buffer: Any = None, offset: int = 0, empty: bool = False) -> None:
        fresh = buffer is None
        self._buffer = bytearray(REGION_BYTES) if fresh else buffer
        self._offset = offset
        init_region(self._buffer, offset)
        # A region with entries already (a file adopted after exec()) goes on
        # after its newest; one known to be empty (a new file's) is not read.
        self._claimed = 0 if fresh or empty else _next_number(self._buffer, offset)
        self._claim = itertools.count(self._claimed)
        self._busy: dict[int, int] = {}

    def write(self, kind: str, monotonic_ns: int, time_unix: float, native_id: int | None, thread_name: str | None,
              lock: str | None, operation: str | None, duration_ns: int, extra: int) -> None:
        number = next(self._claim)
        self._claimed = max(self._claimed, number + 1)  # only for entries(): a hint, never a claim
        self._write_body(number, _BODY.pack(
            _KIND_INDEX[kind], 0, monotonic_ns, time_unix, max(0, duration_ns), extra, native_id or 0,
            _fixed(thread_name, THREAD_BYTES), _fixed(lock, LOCK_BYTES), _fixed(operation, OPERATION_BYTES)))

    def _write_body(self, number: int, body: bytes) -> None:
        slot = number % ENTRIES
        if self._busy.setdefault(slot, number) != number:
            return  # a writer a whole lap behind is still on this slot: it finishes, this entry is dropped
        try:
            buffer = self._buffer
            at = self._offset + HEADER_BYTES + slot * ENTRY_BYTES
            store_guarded(buffer, at, 2 * number + 2, body)
        finally:
            del self._busy[slot]

    def _newest_whole(self, limit: int | None = None) -> list[tuple[int, bytes]]:
        """(seq, bytes) of each whole entry among the newest ``limit``
        numbers claimed here (a lap at most), oldest first: only their slots
        are read, not the whole region."""
        end = self._claimed
        count = min(end, ENTRIES if limit is None else max(0, min(limit, ENTRIES)))
        found = []
        for number in range(end - count, end):
            at = self._offset + HEADER_BYTES + (number % ENTRIES) * ENTRY_BYTES
            raw = bytes(self._buffer[at : at + ENTRY_BYTES])
            if _SEQ.unpack_from(raw)[0] == 2 * number + 2:
                found.append((2 * number + 2, raw))
        return found

    def moved_to(self, buffer: Any, offset: int, empty: bool = False) -> Ring:
        """A ring in ``buffer`` holding what it held (a file adopted after
        ``exec()``; nothing, and not read, when ``empty``) and then this
        ring's entries, in order."""
        ring = Ring(buffer, offset, empty)
        for _seq, raw in self._newest_whole():
            number = next(ring._claim)
            ring._claimed = number + 1
            ring._write_body(number, raw[_SEQ.size :])
        return ring

    def entries(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` entries written here, oldest first."""
        found = [_decode(seq, raw) for seq, raw in self._newest_whole(limit)]
        return [entry for entry in found if entry is not None]


def _next_number(buffer: Any, offset: int) -> int:
    """One past the newest entry's number in the region (its sequence words, read at once)."""
    words = memoryview(bytes(buffer[offset + HEADER_BYTES : offset + REGION_BYTES])).cast("Q")
    return (max(words[:: ENTRY_BYTES // 8]) + 1) // 2


def _valid_entries(first: bytes, second: bytes) -> list[tuple[int, bytes]]:
    """(seq, bytes) of every entry whose two copies agree and whose sequence
    word is even and set, oldest first."""
    found = []
    for slot in range(ENTRIES):
        at = HEADER_BYTES + slot * ENTRY_BYTES
        entry = first[at : at + ENTRY_BYTES]
        if len(entry) != ENTRY_BYTES or entry != second[at : at + ENTRY_BYTES]:
            continue
        seq = _SEQ.unpack_from(entry)[0]
        if seq and seq % 2 == 0:
            found.append((seq, entry))
    found.sort()
    return found


def decode_region(first: bytes, second: bytes, limit: int | None = None) -> list[dict[str, Any]]:
    """The entries of two copies of a region, oldest first (the newest
    ``limit`` of them); ValueError when the region is not a ring of this format."""
    if len(first) != REGION_BYTES or _HEADER.unpack_from(first) != (MAGIC, ENTRIES, ENTRY_BYTES):
        raise ValueError("not a flight recorder of this format")
    found = _valid_entries(first, second)
    if limit is not None:
        found = found[-limit:] if limit > 0 else []
    return [entry for entry in (_decode(seq, raw) for seq, raw in found) if entry is not None]


def _decode(seq: int, raw: bytes) -> dict[str, Any] | None:
    (kind_index, _reserved, monotonic_ns, time_unix, duration_ns, extra, native_id, thread, lock,
     operation) = _BODY.unpack_from(raw, _SEQ.size)
    if kind_index >= len(RECORDER_KINDS):
        return None  # a kind of a newer version, or damage
    kind = RECORDER_KINDS[kind_index]
    if not 0 <= time_unix < 2.5e11:  # NaN fails too
        time_unix = 0.0
    return {
        "seq": seq // 2 - 1,
        "kind": kind,
        "time_unix": time_unix,
        "monotonic_ns": monotonic_ns,
        "thread_native_id": native_id or None,
        "thread_name": _text(thread) or None,
        "lock": _text(lock) or None,
        "operation": _text(operation) or None,
        "duration_seconds": max(0, duration_ns) / 1e9,
        RECORDER_EXTRA[kind]: extra,
    }


def read_region(read: Callable[[], bytes], limit: int | None = None) -> list[dict[str, Any]]:
    """The entries of the region ``read()`` returns, read twice (see the module's docstring)."""
    return decode_region(read(), read(), limit)


def render(entries: Iterable[dict[str, Any]]) -> list[str]:
    """One line per entry, for a terminal."""
    import time

    lines = []
    for entry in entries:
        kind = entry["kind"]
        stamp = time.strftime("%H:%M:%S", time.localtime(entry["time_unix"])) + f".{int(entry['time_unix'] % 1 * 1000):03d}"
        who = entry["thread_name"] or (f"native id {entry['thread_native_id']}" if entry["thread_native_id"] else "?")
        parts = [stamp, f"{kind:<13}", f"thread {who}"]
        if entry["lock"]:
            parts.append(f"lock {entry['lock']}")
        if entry["duration_seconds"]:
            parts.append(f"{entry['duration_seconds'] * 1000:.1f} ms")
        if entry["operation"]:
            parts.append(f"({entry['operation']})")
        extra = RECORDER_EXTRA[kind]
        if entry.get(extra):
            parts.append(f"{extra} {entry[extra]}")
        lines.append("  ".join(parts))
    return lines
