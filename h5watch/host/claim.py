"""One daemon per state dir: the lock file it holds for its life, and the
settings it announces there for ``h5watch status`` (its thresholds)."""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

from h5watch.statedir import OpenDir, UnsafeFileError, open_existing, process_identity

__all__ = ["LOCK_FILE", "ClaimError", "claim", "announce", "running_daemon"]

LOCK_FILE = "h5watch-daemon.lock"
MAX_SETTINGS_BYTES = 4096


class ClaimError(Exception):
    """The lock file cannot be had: unsafe, unopenable, or another daemon's."""


def claim(directory: OpenDir) -> int:
    """Hold the daemon's lock file for this process's life (its descriptor
    is returned and must stay open); :class:`ClaimError` if another daemon
    holds it. The kernel drops the lock when the process ends, however."""
    path = os.path.join(directory.path, LOCK_FILE)
    try:
        fd = open_existing(directory, LOCK_FILE, os.O_RDWR | os.O_CREAT, owner=os.geteuid())
    except OSError as exc:
        raise ClaimError(f"lock file {exc}" if isinstance(exc, UnsafeFileError) else f"lock file {path}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ClaimError(f"another h5watch daemon already runs on this state dir (it holds {path}); stop it first") from None
    return fd


def announce(claim_fd: int, settings: dict[str, Any]) -> None:
    """Write the running daemon's ``settings`` (its thresholds) into the lock
    file it holds, with its pid and start time, for ``h5watch status``."""
    identity = process_identity(os.getpid())
    payload = json.dumps({**settings, "pid": os.getpid(), "start_ticks": None if identity is None else identity[0]}).encode()
    os.ftruncate(claim_fd, 0)
    os.pwrite(claim_fd, payload[:MAX_SETTINGS_BYTES], 0)


def running_daemon(directory: OpenDir) -> dict[str, Any] | None:
    """The settings a daemon of this directory announced, while that very
    daemon (same pid and start time) still runs; None when none does, or its
    lock file is not the directory owner's regular file, or unreadable."""
    try:
        fd = open_existing(directory, LOCK_FILE, os.O_RDONLY, owner=directory.uid)
    except OSError:
        return None
    try:
        data = json.loads(os.pread(fd, MAX_SETTINGS_BYTES, 0) or b"null")
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not isinstance(data.get("start_ticks"), int):
        return None
    identity = process_identity(data["pid"])
    if identity is None or identity[0] != data["start_ticks"] or identity[1] != directory.uid:
        return None
    return data
