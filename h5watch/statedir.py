"""The state directory and the identity of the processes writing into it.

Every operation on the directory or a file in it is made here, so that the
rules about whom to trust (owner, mode, links, file type) live in one place.

The model: ``state_dir`` is a *base* directory shared by every user of the
host (``/run/h5watch`` from systemd's ``RuntimeDirectory=``, a Kubernetes
``emptyDir``: root-owned, mode 1777), or one a user owns. Each user's
processes write in their own subdirectory ``<state_dir>/<uid>``, which they
create and own, mode 0700. The daemon reads every per-user subdirectory it
may read (all of them as root, its own otherwise).

Nobody, root included, trusts what another user could have made or swapped:

- the base must be owned by root or by this user, and not writable by group
  or others unless sticky (``chmod 1777``);
- a per-user directory must be owned by its uid and not writable by group or
  others;
- each directory is opened once (``O_DIRECTORY | O_NOFOLLOW``) and checked
  with ``fstat`` on the descriptor; every file operation is then made
  relative to that descriptor, so a directory swapped for a symlink after
  start-up is never written through;
- a new file is made with ``O_CREAT | O_EXCL | O_NOFOLLOW`` (a name planted
  there, a symlink, a hard link or a FIFO, is removed, never opened), then
  checked: regular, one link, ours. Files are read with ``O_NOFOLLOW |
  O_NONBLOCK``, so a FIFO is refused, never waited on.
"""

from __future__ import annotations

import errno
import os
import stat
import threading

__all__ = [
    "prune_unread",
    "SHARED_BASE",
    "StateDirError",
    "UnsafeFileError",
    "OpenDir",
    "user_dir_path",
    "ensure_state_dir",
    "ensure_writable_state_dir",
    "open_user_dir",
    "open_private_subdir",
    "check_state_dir",
    "readable_user_dirs",
    "dir_of",
    "temp_name",
    "create_file",
    "create_file_at",
    "open_existing",
    "open_at",
    "rename_at",
    "remove",
    "remove_at",
    "open_for_reading",
    "list_names",
    "list_state_files",
    "proc_stat",
    "proc_start_ticks",
    "process_identity",
    "STATE_SUFFIX",
    "STACKS_SUFFIX",
]

STATE_SUFFIX = ".h5w"
STACKS_SUFFIX = ".stacks"
# The host-wide base everybody shares when it exists (made by systemd,
# tmpfiles or the deployment), and root's default.
SHARED_BASE = "/run/h5watch"


class StateDirError(Exception):
    """The state directory is unusable; the message says what to fix."""


class UnsafeFileError(OSError):
    """A file h5watch was about to use is not what it must be (a FIFO, a
    link, someone else's); the message names what is wrong."""

    def __str__(self) -> str:
        return str(self.strerror)


class OpenDir:
    """A directory opened once and checked; file operations go through ``fd``.
    ``uid``: its owner, the only user whose files are trusted in it."""

    __slots__ = ("path", "fd", "uid", "dev", "ino")

    def __init__(self, path: str, fd: int, uid: int, dev: int, ino: int) -> None:
        self.path, self.fd, self.uid, self.dev, self.ino = path, fd, uid, dev, ino


# Per-user directories this process writes in, by path. Inherited across
# fork (the descriptor stays valid and names the same directory); checked
# against (dev, ino) before each use, in case a library closed or reused it.
_opened: dict[str, OpenDir] = {}
_opened_lock = threading.Lock()

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _error(path: str, what: str) -> StateDirError:
    return StateDirError(f"state_dir {path!r}: {what}")


# -- the directories -----------------------------------------------------------


def user_dir_path(base: str, uid: int | None = None) -> str:
    return os.path.join(base, str(os.geteuid() if uid is None else uid))


def ensure_state_dir(base: str) -> str:
    """This user's directory ``<base>/<uid>``, created (0700) and checked,
    opened once for this process; returns its path."""
    return open_user_dir(base).path


def ensure_writable_state_dir(base: str) -> str:
    """:func:`ensure_state_dir`, then a file made and removed in it: a
    read-only mount, or a directory only readable here, passes the checks of
    the directories but could hold no state file."""
    path = ensure_state_dir(base)
    probe = os.path.join(path, temp_name("h5watch-probe"))
    try:
        os.close(create_file_at(probe))
    except OSError as exc:
        raise _error(base, f"cannot make a file in {path!r}: {exc.strerror or exc}") from None
    remove_at(probe)
    return path


def open_user_dir(base: str, create: bool = True, parents: bool = True) -> OpenDir:
    """This user's directory under ``base`` (the base is created too when
    missing, with ``create``; its missing parents too, with ``parents``):
    opened once, then cached for this process."""
    _require_base_path(base)
    path = user_dir_path(base)
    with _opened_lock:
        cached = _opened.get(path)
        if cached is not None and _still_open(cached):
            return cached
        base_fd = _open_base(base, create, parents)
        try:
            opened = _open_subdir(base_fd, path, os.geteuid(), create)
        finally:
            os.close(base_fd)
        _opened[path] = opened
        return opened


def open_private_subdir(parent: OpenDir, name: str) -> OpenDir:
    """``name`` in ``parent`` (a directory of this user's), made 0700 when
    missing, opened without following a symlink and checked as a per-user
    directory is: owned by this user, writable by nobody else. The caller
    closes its ``fd``."""
    return _open_subdir(parent.fd, os.path.join(parent.path, name), os.geteuid(), create=True)


def check_state_dir(base: str) -> str:
    """Refuse a base that is missing or not to be trusted; creates nothing."""
    _require_base_path(base)
    os.close(_open_base(base, create=False))
    return base


def readable_user_dirs(base: str) -> tuple[list[OpenDir], list[tuple[str, str]]]:
    """The per-user directories under ``base`` this process may read, freshly
    opened and checked (the caller closes them), and (path, one line) for
    each subdirectory refused. Root reads every ``<uid>`` subdirectory; any
    other user only its own."""
    _require_base_path(base)
    base_fd = _open_base(base, create=False)
    dirs: list[OpenDir] = []
    problems: list[tuple[str, str]] = []
    try:
        if os.geteuid() == 0:
            names = sorted((n for n in os.listdir(base_fd) if n.isdigit() and n.isascii()), key=int)
        else:
            names = [str(os.geteuid())]
        for name in names:
            path = os.path.join(base, name)
            try:
                dirs.append(_open_subdir(base_fd, path, int(name), create=False))
            except StateDirError as exc:
                if "does not exist" not in str(exc):
                    problems.append((path, str(exc)))
    finally:
        os.close(base_fd)
    return dirs, problems


def _require_base_path(base: str) -> None:
    if not base:
        raise StateDirError(
            f"state_dir: no safe default for uid {os.geteuid()} (no {SHARED_BASE}, no $XDG_RUNTIME_DIR);"
            " set H5WATCH_STATE_DIR to a directory you own, or create "
            f"{SHARED_BASE} (root-owned, mode 1777)"
        )
    if not os.path.isabs(base):
        raise StateDirError(f"state_dir {base!r}: expected an absolute path")


def _open_base(base: str, create: bool, parents: bool = True) -> int:
    base = os.path.normpath(base)
    parent, name = os.path.split(base)
    if not name:  # "/"
        raise _error(base, "is the root directory; choose a directory of its own")
    if create and parents:
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as exc:
            raise _error(base, f"cannot create its parent: {exc.strerror}") from None
    try:
        parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ENOENT and create:
            raise _error(base, f"its parent {parent!r} does not exist; fix the path, or create the parent first") from None
        if exc.errno == errno.ENOENT:
            raise _error(base, "does not exist") from None
        if exc.errno == errno.ENOTDIR:
            raise _error(base, f"its parent {parent!r} is not a directory; fix the path") from None
        raise _error(base, f"cannot open its parent: {exc.strerror}") from None
    try:
        made = False
        if create:
            # The shared base is made for everybody (sticky); any other base
            # a process makes is its own.
            shared = base == SHARED_BASE and os.geteuid() == 0
            try:
                os.mkdir(name, 0o755 if shared else 0o700, dir_fd=parent_fd)
                made = shared
            except FileExistsError:
                pass
            except OSError as exc:
                raise _error(base, f"cannot create it: {exc.strerror}") from None
        fd = _open_dir(parent_fd, name, base)
        if made:
            os.fchmod(fd, 0o1777)
    finally:
        os.close(parent_fd)
    try:
        info = os.fstat(fd)
        euid = os.geteuid()
        if info.st_uid not in (0, euid):
            raise _error(base, (
                f"owned by uid {info.st_uid}, not by root or this user (uid {euid}); another user made it: remove it, "
                "or choose another state_dir"
            ))
        if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
            raise _error(base, f"mode {stat.S_IMODE(info.st_mode):o}: writable by others without the sticky bit; chmod 1777 (shared) or 0755")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_subdir(base_fd: int, path: str, uid: int, create: bool) -> OpenDir:
    name = os.path.basename(path)
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=base_fd)
        except FileExistsError:
            pass
        except OSError as exc:
            raise _error(path, f"cannot create it: {exc.strerror}") from None
    fd = _open_dir(base_fd, name, path)
    try:
        info = os.fstat(fd)
        if info.st_uid != uid:
            raise _error(path, f"owned by uid {info.st_uid}, not by uid {uid}; another user made it: remove it (as root)")
        if info.st_mode & 0o022:
            raise _error(path, f"mode {stat.S_IMODE(info.st_mode):o}: writable by group or others; chmod 0700")
    except BaseException:
        os.close(fd)
        raise
    return OpenDir(path, fd, uid, info.st_dev, info.st_ino)


def _open_dir(parent_fd: int, name: str, path: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            raise _error(path, "does not exist") from None
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            try:
                is_link = stat.S_ISLNK(os.stat(name, dir_fd=parent_fd, follow_symlinks=False).st_mode)
            except OSError:
                is_link = False
            if is_link:
                raise _error(path, "is a symlink; point state_dir at a real directory") from None
            raise _error(path, "is not a directory") from None
        raise _error(path, f"cannot open it: {exc.strerror}") from None


def _still_open(opened: OpenDir) -> bool:
    try:
        info = os.fstat(opened.fd)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (opened.dev, opened.ino) and stat.S_ISDIR(info.st_mode)


def dir_of(path: str) -> OpenDir:
    """The opened directory a file ``path`` of this process lives in: the one
    ``ensure_state_dir`` opened, or (first use) that directory opened and
    checked now as this user's own."""
    directory = os.path.dirname(path)
    with _opened_lock:
        cached = _opened.get(directory)
        if cached is not None and _still_open(cached):
            return cached
        parent = os.path.dirname(os.path.normpath(directory))
        parent_fd = os.open(parent or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            opened = _open_subdir(parent_fd, directory, os.geteuid(), create=False)
        except StateDirError as exc:
            raise UnsafeFileError(errno.EPERM, str(exc)) from None
        finally:
            os.close(parent_fd)
        _opened[directory] = opened
        return opened


# -- files -------------------------------------------------------------------


def temp_name(final: str) -> str:
    """A hidden, unpredictable name to make ``final`` under before renaming it."""
    return f".{final}.{os.urandom(8).hex()}.tmp"


def create_file(directory: OpenDir, name: str, flags: int = os.O_RDWR, mode: int = 0o600) -> int:
    """A new file ``name`` in ``directory``, made with ``O_EXCL``: whatever
    was planted at that name (a symlink, a hard link to someone's file, a
    FIFO) is unlinked, never opened or written."""
    for attempt in (1, 2):
        try:
            fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=directory.fd)
        except FileExistsError:
            if attempt == 2:
                raise
            os.unlink(name, dir_fd=directory.fd)
            continue
        try:
            _check_file(fd, os.path.join(directory.path, name), os.geteuid())
        except BaseException:
            os.close(fd)
            raise
        return fd
    raise AssertionError("not reached")


def create_file_at(path: str, flags: int = os.O_RDWR, mode: int = 0o600) -> int:
    """:func:`create_file` for a path in a directory of this process's."""
    return create_file(dir_of(path), os.path.basename(path), flags, mode)


def open_existing(directory: OpenDir, name: str, flags: int, owner: int, mode: int = 0o600) -> int:
    """Open (or, with ``O_CREAT``, make) a file that is kept, such as a lock
    file: never through a link, never blocking on a FIFO, and checked."""
    path = os.path.join(directory.path, name)
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, mode, dir_fd=directory.fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFileError(errno.ELOOP, f"{path}: is a symlink") from None
        raise
    try:
        _check_file(fd, path, owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_file(fd: int, path: str, owner: int) -> os.stat_result:
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise UnsafeFileError(errno.EINVAL, f"{path}: is not a regular file")
    if info.st_nlink != 1:
        raise UnsafeFileError(errno.EMLINK, f"{path}: has {info.st_nlink} hard links, expected 1")
    if info.st_uid != owner:
        raise UnsafeFileError(errno.EPERM, f"{path}: owned by uid {info.st_uid}, expected uid {owner}")
    return info


def open_at(path: str, flags: int) -> int:
    """Open an existing file of this process's directory (``O_NOFOLLOW``,
    ``O_NONBLOCK``); the caller checks it with ``fstat``."""
    return os.open(os.path.basename(path), flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_of(path).fd)


def rename_at(src: str, dst: str) -> None:
    """Rename within one directory of this process's (replaces ``dst``'s name,
    never what it points to)."""
    directory = dir_of(dst)
    os.rename(os.path.basename(src), os.path.basename(dst), src_dir_fd=directory.fd, dst_dir_fd=directory.fd)


def remove(directory: OpenDir, name: str) -> None:
    try:
        os.unlink(name, dir_fd=directory.fd)
    except FileNotFoundError:
        pass


def remove_at(path: str) -> None:
    remove(dir_of(path), os.path.basename(path))


def open_for_reading(path: str, dir_fd: int | None = None) -> int:
    """Open ``path`` to read: never through a symlink (``ELOOP``), never
    blocking on a FIFO. With ``dir_fd``, the name is looked up in that
    directory (``path`` is then only for messages). The caller checks the
    descriptor with ``fstat`` (type, owner)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    if dir_fd is None:
        return os.open(path, flags)
    return os.open(os.path.basename(path), flags, dir_fd=dir_fd)


def list_names(directory: OpenDir) -> list[str]:
    """Every name in ``directory``: cheap (no stat, no open), however many."""
    return os.listdir(directory.fd)


def prune_unread(path: str, keep: int) -> int:
    """With no daemon reading this user's directory (none holds its lock),
    remove the files of dead processes beyond the newest ``keep``: without a
    daemon nobody folds them, and they would pile up for good. Returns how
    many processes' files went. Cheap unless the directory is that full."""
    directory = dir_of(os.path.join(path, "x"))
    names = list_names(directory)
    if len(names) <= 2 * keep:
        return 0
    import fcntl  # every instrumented process gets here: imported only when needed

    # A descriptor of its own (a lock belongs to the open file, and the
    # cached descriptor lives on, in forked children too).
    claim = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=directory.fd)
    try:
        try:
            fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # a daemon reads it: it folds and removes them
        dead = []
        for name in names:
            pid, sep, ticks = name[: -len(STATE_SUFFIX)].partition("-")
            if not (name.endswith(STATE_SUFFIX) and sep and pid.isdigit() and ticks.isdigit()):
                continue
            identity = process_identity(int(pid)) if int(pid) > 0 else None
            if identity is None or identity[0] != int(ticks) or identity[1] != directory.uid:
                try:
                    dead.append((os.stat(name, dir_fd=directory.fd, follow_symlinks=False).st_mtime, name))
                except OSError:
                    continue
        dead.sort()
        removed = dead[: max(0, len(dead) - keep)]
        for _, name in removed:
            remove(directory, name)
            remove(directory, name[: -len(STATE_SUFFIX)] + STACKS_SUFFIX)
        return len(removed)
    finally:
        os.close(claim)  # and with it the lock


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


# -- process identity ------------------------------------------------------


def proc_stat(pid: int) -> tuple[str, int] | None:
    """(state letter, start time in clock ticks since boot) from ``/proc/<pid>/stat``:
    with the pid, the start time names one process for the machine's uptime."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)  # one read: the kernel renders the line whole (well under 1 KiB)
    except OSError:
        return None
    finally:
        os.close(fd)
    if b")" not in data:
        return None
    # The command name (field 2) may hold spaces and parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    return fields[0].decode(), int(fields[19])


def proc_start_ticks(pid: int) -> int | None:
    stat_ = proc_stat(pid)
    return None if stat_ is None else stat_[1]


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
