"""Incident files: one JSON file per worker the daemon kills (or, with
``--dry-run``, would kill), in ``<state dir>/<daemon uid>/incidents/``.

The directory is the daemon's own: made 0700, opened without following a
symlink and checked (owner, mode) like the state directories; each file is
made under a hidden temporary name with ``O_EXCL`` and renamed into place, so
a reader never sees half a file. Names sort by time
(``20260101T120000.123456Z-<pid>-<start ticks>.json``); beyond ``keep``
files the oldest are removed, after each write.
"""

from __future__ import annotations

import json
import os
import stat
import threading
import time
from typing import Any

from h5watch import logs
from h5watch.statedir import OpenDir, StateDirError, create_file, open_private_subdir, temp_name

__all__ = ["INCIDENTS_DIR", "DEFAULT_KEEP", "IncidentStore", "incident_name"]

INCIDENTS_DIR = "incidents"
DEFAULT_KEEP = 100
_SUFFIX = ".json"

_log = logs.get_logger(logger="h5watch.daemon")


def incident_name(pid: int, start_ticks: int, now_unix: float) -> str:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now_unix)) + f".{int(now_unix % 1 * 1e6):06d}Z"
    return f"{stamp}-{pid}-{start_ticks}{_SUFFIX}"


class IncidentStore:
    """The daemon's incident directory under ``own_dir``, at most ``keep`` files."""

    def __init__(self, own_dir: OpenDir, keep: int = DEFAULT_KEEP) -> None:
        self.own_dir = own_dir
        self.keep = keep
        self.path = os.path.join(own_dir.path, INCIDENTS_DIR)
        # Kill threads write concurrently; pruning must see whole writes.
        self._lock = threading.Lock()

    def write(self, incident: dict[str, Any], pid: int, start_ticks: int) -> str | None:
        """Write one incident; its path, or None (logged as
        ``daemon.incident_unsaved``) when it cannot be written: a kill never
        fails for want of its file."""
        if self.keep <= 0:
            return None
        name = incident_name(pid, start_ticks, time.time())
        data = (json.dumps(incident, indent=1, default=str) + "\n").encode()
        with self._lock:
            try:
                directory = open_private_subdir(self.own_dir, INCIDENTS_DIR)
            except StateDirError as exc:
                _log.error("daemon.incident_unsaved", path=self.path, error=str(exc))
                return None
            try:
                self._write(directory, name, data)
                self._prune(directory)
            except OSError as exc:
                _log.error("daemon.incident_unsaved", path=os.path.join(self.path, name), error=exc.strerror or str(exc))
                return None
            finally:
                os.close(directory.fd)
        return os.path.join(self.path, name)

    @staticmethod
    def _write(directory: OpenDir, name: str, data: bytes) -> None:
        temporary = temp_name(name)
        fd = create_file(directory, temporary, os.O_WRONLY)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(temporary, dir_fd=directory.fd)
            raise
        os.close(fd)
        os.rename(temporary, name, src_dir_fd=directory.fd, dst_dir_fd=directory.fd)

    def _prune(self, directory: OpenDir) -> None:
        """Remove the oldest incident files beyond ``keep`` (only this user's
        regular files, never through a link)."""
        names = sorted(n for n in os.listdir(directory.fd) if n.endswith(_SUFFIX) and not n.startswith("."))
        for name in names[: max(0, len(names) - self.keep)]:
            try:
                info = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
                if stat.S_ISREG(info.st_mode) and info.st_uid == os.geteuid():
                    os.unlink(name, dir_fd=directory.fd)
            except OSError:
                continue
