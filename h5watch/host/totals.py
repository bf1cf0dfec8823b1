"""The daemon's persisted totals (what exited processes counted, across
restarts) and its claim on the state dir (one daemon per directory).

Both live in the daemon's own per-user directory, opened once and checked
(:mod:`h5watch.statedir`). The totals are replaced atomically: written to a
new file under an unpredictable hidden name (``O_EXCL | O_NOFOLLOW``, mode
0600), fsynced, renamed over the old name. They are read with ``O_NOFOLLOW |
O_NONBLOCK`` and checked (regular, one link, the daemon's own): a symlink or
a FIFO planted at the name is refused, never followed or waited on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from h5watch.export.metrics import ForkTotals, LockTotals, OperationTotals
from h5watch.statedir import (
    OpenDir,
    UnsafeFileError,
    create_file,
    open_existing,
    remove,
    temp_name,
)

__all__ = ["TOTALS_FILE", "Totals", "TotalsError", "read", "write"]

TOTALS_FILE = "h5watch-daemon.json"
MAX_TOTALS_BYTES = 64 * 1024 * 1024


class TotalsError(Exception):
    """The totals or the lock file cannot be used; the message is one line."""


@dataclass
class Totals:
    """What the processes that are gone counted, and the kills (and would-be
    kills): per (workload, lock), per workload, per (workload, reason); ``folded``: the
    ``uid/name`` of each state file already in them, kept until the file is gone."""

    locks: dict[tuple[str, str], LockTotals] = field(default_factory=dict)
    forks: dict[str, ForkTotals] = field(default_factory=dict)
    kills: dict[tuple[str, str], int] = field(default_factory=dict)
    # Kills a --dry-run daemon would have made, per (workload, reason).
    would_kills: dict[tuple[str, str], int] = field(default_factory=dict)
    folded: set[str] = field(default_factory=set)
    # When each workload last had a process the daemon saw (unix time): what
    # --workload-retention measures.
    last_seen: dict[str, float] = field(default_factory=dict)
    # Contention by operation, per (workload, lock, operation).
    operations: dict[tuple[str, str, str], OperationTotals] = field(default_factory=dict)

    def workloads(self) -> set[str]:
        return ({w for w, _ in self.locks} | set(self.forks) | {w for w, _ in self.kills} | {w for w, _ in self.would_kills}
                | set(self.last_seen))

    def drop(self, workload: str) -> None:
        """Forget everything ``workload`` counted."""
        for table in (self.locks, self.kills, self.would_kills):
            for key in [key for key in table if key[0] == workload]:
                del table[key]
        self.operations = {key: value for key, value in self.operations.items() if key[0] != workload}
        self.forks.pop(workload, None)
        self.last_seen.pop(workload, None)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": 1,
            "locks": [[w, lk, t.to_json()] for (w, lk), t in self.locks.items()],
            "forks": [[w, t.to_json()] for w, t in self.forks.items()],
            "kills": [[w, r, n] for (w, r), n in self.kills.items()],
            "would_kills": [[w, r, n] for (w, r), n in self.would_kills.items()],
            "folded": sorted(self.folded),
            "last_seen": [[w, t] for w, t in self.last_seen.items()],
            "operations": [[w, lk, op, t.to_json()] for (w, lk, op), t in self.operations.items()],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Totals:
        """ValueError, KeyError or TypeError when ``data`` is not a save of this version's."""
        return cls(
            locks={(w, lk): LockTotals.from_json(v) for w, lk, v in data["locks"]},
            forks={w: ForkTotals.from_json(v) for w, v in data["forks"]},
            kills={(w, r): int(n) for w, r, n in data["kills"]},
            # Absent from the saves of daemons that did not count them yet.
            would_kills={(w, r): int(n) for w, r, n in data.get("would_kills", [])},
            folded=set(data["folded"]),
            # Absent from the saves of daemons without --workload-retention.
            last_seen={w: float(t) for w, t in data.get("last_seen", [])},
            # Absent from the saves of daemons that did not count operations.
            operations={(w, lk, op): OperationTotals.from_json(v) for w, lk, op, v in data.get("operations", [])},
        )


def read(directory: OpenDir) -> Totals | None:
    """The saved totals, or None when there are none yet (:class:`TotalsError`,
    ValueError, KeyError or TypeError when they cannot be used)."""
    try:
        fd = open_existing(directory, TOTALS_FILE, os.O_RDONLY, owner=os.geteuid())
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise TotalsError(str(exc) if isinstance(exc, UnsafeFileError) else f"{TOTALS_FILE}: {exc.strerror}") from None
    try:
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > MAX_TOTALS_BYTES:
                raise TotalsError(f"{TOTALS_FILE}: larger than {MAX_TOTALS_BYTES} bytes")
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = json.loads(b"".join(chunks))
    if not isinstance(data, dict):
        raise TotalsError(f"{TOTALS_FILE}: not a JSON object")
    return Totals.from_json(data)


def write(directory: OpenDir, totals: Totals) -> None:
    """Replace the totals atomically (new file, fsync, rename, fsync the directory)."""
    tmp = temp_name(TOTALS_FILE)
    fd = create_file(directory, tmp, os.O_WRONLY)
    try:
        try:
            payload = json.dumps(totals.to_json()).encode()
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, TOTALS_FILE, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)
    except BaseException:
        remove(directory, tmp)
        raise
    os.fsync(directory.fd)
