"""Signals to stuck workers: only to a process that is provably instrumented now.

Before every signal (the stack dump, SIGTERM, SIGCONT, SIGKILL) the target
must pass :func:`why_not_signal`:

- it is not pid 1, this daemon or the daemon's parent, whatever a state file
  says (``daemon.refused_signal``);
- it is the process its state file names: same pid, start time and uid, and
  a process, not a thread of one. The pidfd is opened first and checked
  after, so a pid reused by another process in between cannot be hit;
- it is still the instrumented program: it maps its own state file now. An
  ``exec()`` unmaps every file, so a Python that exec'd ``sleep`` keeps its
  pid, start time and uid but fails here (``daemon.refused_signal``).
  SIGCONT and SIGKILL, which follow the SIGTERM of a process proven so,
  also go to it (through the same pidfd) while it still catches the dump
  signal: a Python that exits unmaps its file in its exit handlers and may
  hang in a later one, and an ``exec()`` resets every handler.

The stack-dump signal is h5watch's own :data:`~h5watch.statefile.DUMP_SIGNAL`
(never a number read from a file), sent only when the process catches it
(``SigCgt`` in ``/proc/<pid>/status``: faulthandler's registration shows
there): to a process without a handler a real-time signal is lethal.
``--dry-run`` sends nothing at all.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from h5watch import logs
from h5watch.host import outside
from h5watch.schema import RECORDER_LOG_ENTRIES
from h5watch.statedir import proc_stat, process_identity
from h5watch.statefile import DUMP_SIGNAL, ProcessState

if TYPE_CHECKING:
    from h5watch.host.incidents import IncidentStore
    from h5watch.host.verdict import Culprit, Reason

__all__ = [
    "kill_worker",
    "faulthandler_stacks",
    "open_verified",
    "still_same",
    "why_not_signal",
    "refusal",
    "maps_state_file",
    "catches_signal",
    "stopped_how",
    "send",
    "faulthandler_dump",
    "py_spy_dump",
    "STACKS_READ_LIMIT",
]

STACKS_READ_LIMIT = 256 * 1024
# why_not_signal's answer for a process that no longer exists: normal, not logged.
GONE = "the process is gone"

_log = logs.get_logger(logger="h5watch.daemon")


def kill_worker(state: ProcessState, reason: Reason, culprit: Culprit | None, *, kill_after: float | None, grace: float,
                dry_run: bool, count_kill: Callable[[], None], incidents: IncidentStore | None = None,
                stacks_timeout: float = outside.PYSTACK_TIMEOUT_SECONDS) -> None:
    """Read a stuck worker's stacks from outside, write its incident file, log
    the evidence, then SIGTERM and, after ``grace``, SIGKILL.

    ``reason`` and ``culprit``: the verdict's finding at ``kill_after``
    (:mod:`h5watch.host.verdict`); no culprit for a stale heartbeat with no
    lock held or waited for. The stacks (:func:`h5watch.host.outside.read_stacks`):
    pystack's with native frames, else the faulthandler dump, else none;
    each read is bounded (``stacks_timeout``, 1 s for the dump), and none can
    prevent the kill.

    With ``dry_run``: the same checks and evidence, minus anything that needs
    a signal or a stop (pystack reads Python frames only, without stopping
    the process; no faulthandler dump), then ``worker.would_kill``; nothing
    is sent. ``count_kill`` is called once the kill is made (the SIGTERM
    sent), or with ``dry_run`` once it is logged (the caller counts a
    would-be kill)."""
    pidfd = open_verified(state)
    if pidfd is None:
        return
    try:
        now = time.time()
        stacks = outside.read_stacks(state.pid, None if dry_run else lambda: faulthandler_stacks(state, pidfd),
                                     use_pystack=True, native=not dry_run, timeout=stacks_timeout)
        view = outside.outside_view(state, stacks, now)  # names the threads pystack read, from the state file
        evidence = {
            "workload": state.workload,
            "worker_pid": state.pid,
            "reason": reason,
            "kill_after": kill_after,
            "heartbeat_age_seconds": round(now - state.heartbeat_unix, 3),
            **_blamed(culprit),
            "locks": state.locks(now),
            "stacks": stacks.render()[:STACKS_READ_LIMIT],
            "stacks_source": stacks.source,
            "stacks_unavailable": stacks.unavailable,
            "gil_holder_native_id": stacks.gil_holder,
            "recorder": _newest(view["recorder"]),
            "py_spy": None if stacks.source == "pystack" else py_spy_dump(state.pid),
        }
        incident_file = None
        if incidents is not None:
            incident = {
                "event": "worker.would_kill" if dry_run else "worker.killed", "dry_run": dry_run, "time_unix": now,
                "reason": reason, "kill_after": kill_after, "grace": grace, **_blamed(culprit),
                **view,
            }
            incident_file = incidents.write(incident, state.pid, state.start_ticks)
        evidence["incident_file"] = incident_file
        if dry_run:
            _log.warning("worker.would_kill", dry_run=True, **evidence)
            count_kill()
            return
        if not send(pidfd, state, signal.SIGTERM):
            return
        _log.critical("worker.killed", grace=grace, **evidence)
        count_kill()
        send(pidfd, state, signal.SIGCONT, after_sigterm=True)  # a stopped process must run to die of SIGTERM
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not still_same(state):
                return
            time.sleep(0.05)
        if send(pidfd, state, signal.SIGKILL, after_sigterm=True):
            _log.error("worker.sigkilled", workload=state.workload, worker_pid=state.pid, grace=grace)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _blamed(culprit: Culprit | None) -> dict[str, Any]:
    """The culprit lock's fields of the evidence (each None when no lock is blamed)."""
    if culprit is None:
        return dict.fromkeys(("lock", "holder", "waiters", "oldest_wait_seconds", "orphaned"))
    return {"lock": culprit.lock, "holder": culprit.holder, "waiters": culprit.waiting_threads,
            "oldest_wait_seconds": culprit.oldest_wait_seconds, "orphaned": culprit.orphaned}


def faulthandler_stacks(state: ProcessState, pidfd: int) -> str:
    """Every thread's Python stack, from the process's own faulthandler (works
    when all its threads are blocked in C; not when it is stopped); why not,
    in parentheses, when there is none."""
    stat_ = proc_stat(state.pid)
    if stat_ is not None and stat_[0] in ("T", "t"):
        return "(the process is stopped: it cannot run its dump handler)"
    if not catches_signal(state.pid, DUMP_SIGNAL):
        return "(no handler for the dump signal: not sent)"
    return faulthandler_dump(state, pidfd)


def py_spy_dump(pid: int) -> str | None:
    """py-spy's view of every thread, where py-spy is installed. ``--nonblocking``:
    it reads the process's memory without stopping or signalling it."""
    py_spy = shutil.which("py-spy")
    if not py_spy:
        return None
    try:
        out = subprocess.run([py_spy, "dump", "--nonblocking", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=5)
        return (out.stdout or out.stderr)[:STACKS_READ_LIMIT]
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"(py-spy failed: {exc})"


def open_verified(state: ProcessState) -> int | None:
    """A pidfd for the state file's process, or None if it may not be signalled.

    The pidfd is opened first and the process checked after: if it passes,
    the pidfd refers to that very process, and signals through it cannot
    reach a process that reused the pid later. -1: no pidfd support (then
    every signal re-checks the identity first, as it does anyway). A refusal
    other than "gone" is logged (``daemon.refused_signal``).
    """
    refused = refusal(state.pid)
    if refused is not None:
        _refused(state, None, refused)
        return None
    pidfd = -1
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(state.pid)
        except ProcessLookupError:
            return None
        except OSError:
            pidfd = -1
    why = why_not_signal(state)
    if why is not None:
        if pidfd >= 0:
            os.close(pidfd)
        if why is not GONE:
            _refused(state, None, why)
        return None
    return pidfd


def refusal(pid: int) -> str | None:
    """Why ``pid`` is never signalled, whatever a state file says, or None."""
    if pid <= 0:
        return f"pid {pid} is not a single process"  # 0 and -N name process groups
    if pid == 1:
        return "pid 1 is init"
    if pid == os.getpid():
        return "pid is the daemon itself"
    if pid == os.getppid():
        return "pid is the daemon's parent"
    return None


def why_not_signal(state: ProcessState, after_sigterm: bool = False) -> str | None:
    """None when ``state``'s process may be signalled now; else why not
    (:data:`GONE` when it no longer exists). ``after_sigterm``: it got our
    SIGTERM, and may have unmapped its file on its way out."""
    refused = refusal(state.pid)
    if refused is not None:
        return refused
    if not still_same(state):
        return GONE
    if _status_field(state.pid, "Tgid") != str(state.pid):
        return "pid names a thread, not a process"
    if not maps_state_file(state) and not (after_sigterm and catches_signal(state.pid, DUMP_SIGNAL)):
        return "it does not map its state file (it exec'd another program, or stopped writing the file)"
    return None


def still_same(state: ProcessState) -> bool:
    """The state file's process still exists: same pid, start time and uid."""
    identity = process_identity(state.pid)
    return identity is not None and identity[0] == state.start_ticks and identity[1] == int(state.header["uid"])


def maps_state_file(state: ProcessState) -> bool:
    """Does the process map its own state file now? Compared by device and
    inode with the file mappings in ``/proc/<pid>/maps``. A file unlinked
    since it was read is looked for by the device and inode it had then:
    the mapping keeps that inode alive, so no other file can have taken it."""
    try:
        info = os.stat(state.path, follow_symlinks=False)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != int(state.header["uid"]):
            return False
        file_dev, file_ino = info.st_dev, info.st_ino
    except FileNotFoundError:
        if state.file_id is None:
            return False
        file_dev, file_ino = state.file_id
    except OSError:
        return False
    wanted_dev = (os.major(file_dev), os.minor(file_dev))
    same_inode: list[str] = []
    try:
        with open(f"/proc/{state.pid}/maps", "rb") as maps:
            for line in maps:
                # address perms offset major:minor inode [path]
                fields = line.split(None, 5)
                if len(fields) < 5 or fields[4] != b"%d" % file_ino:
                    continue
                major, _, minor = fields[3].partition(b":")
                if (int(major, 16), int(minor, 16)) == wanted_dev:
                    return True
                same_inode.append(fields[0].decode())
    except (OSError, ValueError):
        return False
    # btrfs subvolumes and overlayfs show another device in maps than stat()
    # does; map_files resolves to the file itself (readable with CAP_SYS_ADMIN).
    for span in same_inode:
        try:
            mapped = os.stat(f"/proc/{state.pid}/map_files/{span}")
        except OSError:
            continue
        if (mapped.st_dev, mapped.st_ino) == (file_dev, file_ino):
            return True
    return False


def _newest(recorder: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The newest entries of an outside view's recorder, for a log line (the
    incident file has more)."""
    entries = recorder["entries"]
    return None if entries is None else entries[-RECORDER_LOG_ENTRIES:]


def execd_away(state: ProcessState) -> bool:
    """Has the state file's process, still alive, certainly stopped mapping
    its file (it exec'd a program without h5watch)? False when that cannot
    be told (its maps unreadable)."""
    if not os.access(f"/proc/{state.pid}/maps", os.R_OK):
        return False
    try:
        with open(f"/proc/{state.pid}/maps", "rb") as maps:
            maps.read(1)
    except OSError:
        return False
    return not maps_state_file(state)


def stopped_how(pid: int, state_letter: str | None = None, look_for_tracer: bool = True) -> str | None:
    """Why ``pid`` is not running on its own now: stopped (state ``T``: SIGSTOP,
    job control), stopped by its tracer (``t``: a debugger), or, with
    ``look_for_tracer``, traced (``TracerPid`` in ``/proc/<pid>/status``);
    None when none of these. ``state_letter``: its ``/proc/<pid>/stat``
    state when the caller has just read it."""
    if state_letter is None:
        stat_ = proc_stat(pid)
        state_letter = None if stat_ is None else stat_[0]
    if state_letter == "T":
        return "stopped (state T: SIGSTOP or job control)"
    if state_letter == "t":
        return "stopped by its tracer (state t: a debugger)"
    if look_for_tracer:
        tracer = _status_field(pid, "TracerPid")
        if tracer is not None and tracer.isdigit() and int(tracer) != 0:
            return f"traced by pid {int(tracer)}"
    return None


def catches_signal(pid: int, signum: int) -> bool:
    """Has ``pid`` a handler for ``signum`` (its bit in ``SigCgt``)?"""
    mask = _status_field(pid, "SigCgt")
    try:
        return mask is not None and bool(int(mask, 16) >> (signum - 1) & 1)
    except ValueError:
        return False


def _status_field(pid: int, name: str) -> str | None:
    prefix = name.encode() + b":"
    try:
        with open(f"/proc/{pid}/status", "rb") as status:
            for line in status:
                if line.startswith(prefix):
                    return line[len(prefix):].strip().decode()
    except OSError:
        return None
    return None


def send(pidfd: int, state: ProcessState, signum: int, after_sigterm: bool = False) -> bool:
    """Send ``signum`` if the process passes :func:`why_not_signal` now; True when sent."""
    why = why_not_signal(state, after_sigterm)
    if why is not None:
        if why is not GONE:
            _refused(state, signum, why)
        return False
    try:
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(state.pid, signum)
    except ProcessLookupError:
        return False
    return True


def _refused(state: ProcessState, signum: int | None, why: str) -> None:
    _log.warning("daemon.refused_signal", worker_pid=state.pid, workload=state.workload, path=state.path,
                 signal=None if signum is None else _signal_name(signum), reason=why)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


def faulthandler_dump(state: ProcessState, pidfd: int) -> str:
    path = state.stacks_path
    try:
        before = os.stat(path).st_size
    except OSError:
        return "(no stacks file: it is gone)"
    if not send(pidfd, state, DUMP_SIGNAL):
        return "(not signalled: see daemon.refused_signal)"
    deadline = time.monotonic() + 1.0
    size, stable_since = before, time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            now_size = os.stat(path).st_size
        except OSError:
            break
        if now_size != size:
            size, stable_since = now_size, time.monotonic()
        elif size > before and time.monotonic() - stable_since > 0.1:
            break
    if size <= before:
        return "(no dump written within 1 s)"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            # Never another user's file planted under this name (a hard link
            # to a file root alone may read would end up in the daemon's log).
            if not stat.S_ISREG(info.st_mode) or info.st_uid != state.file_uid or info.st_nlink != 1:
                return "(stacks file refused: not a regular file of the worker's own with one link)"
            return os.pread(fd, min(size - before, STACKS_READ_LIMIT), before).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError as exc:
        return f"(stacks unreadable: {exc.strerror})"
