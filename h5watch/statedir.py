"""The state directory and the identity of the processes writing into it.

Every operation on the directory or a file in it is made here, so that the
rules about whom to trust (owner, mode, links, file type) live in one place.
"""

from __future__ import annotations

import os
import stat

__all__ = [
    "StateDirError",
    "ensure_state_dir",
    "check_state_dir",
    "list_state_files",
    "proc_stat",
    "proc_start_ticks",
    "process_identity",
    "STATE_SUFFIX",
    "STACKS_SUFFIX",
]

STATE_SUFFIX = ".h5w"
STACKS_SUFFIX = ".stacks"


class StateDirError(Exception):
    """The state directory is unusable; the message says what to fix."""


# -- the directory ---------------------------------------------------------


def ensure_state_dir(path: str) -> str:
    """Create ``path`` (mode 0700) if missing; refuse a symlink, a non-directory
    or a directory owned by someone else."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)) or "/", exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise StateDirError(f"state_dir {path!r}: cannot create it: {exc.strerror}") from None
    return check_state_dir(path)


def check_state_dir(path: str) -> str:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise StateDirError(f"state_dir {path!r}: does not exist") from None
    except OSError as exc:
        raise StateDirError(f"state_dir {path!r}: {exc.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise StateDirError(f"state_dir {path!r}: is a symlink; point state_dir at a real directory")
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"state_dir {path!r}: is not a directory")
    if info.st_uid != os.geteuid() and os.geteuid() != 0:
        raise StateDirError(f"state_dir {path!r}: owned by uid {info.st_uid}, not by this user ({os.geteuid()})")
    return path


# -- process identity ------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from ``/proc/<pid>/stat``:
    with the pid, the start time names one process for the machine's uptime."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def proc_start_ticks(pid: int) -> int | None:
    stat_ = proc_stat(pid)
    return None if stat_ is None else stat_[1]


def list_state_files(directory: str, limit: int) -> tuple[list[str], bool]:
    """Paths of the state files in ``directory`` (at most ``limit``), and
    whether there were more."""
    paths: list[str] = []
    with os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(STATE_SUFFIX):
                if len(paths) >= limit:
                    return paths, True
                paths.append(entry.path)
    return paths, False


def process_identity(pid: int) -> tuple[int, int, str] | None:
    """(start ticks, effective uid, state letter) of ``pid``; None when there is
    no such process, or only its zombie."""
    stat_ = proc_stat(pid)
    if stat_ is None or stat_[0] in ("Z", "X"):
        return None
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    return stat_[1], uid, stat_[0]
