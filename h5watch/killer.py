"""Signals to stuck workers: only to the process a state file names, through a pidfd.

A pid is signalled only through a pidfd opened first and then checked
against the state file's start time and uid, so a pid reused by another
process in between cannot be hit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from typing import Any, Callable

from . import logs
from .statedir import proc_stat, process_identity
from .statefile import ProcessState

__all__ = ["kill_worker", "dump_stacks", "open_verified", "still_same", "send", "faulthandler_dump", "STACKS_READ_LIMIT"]

STACKS_READ_LIMIT = 256 * 1024

_log = logs.get_logger(logger="h5watch.daemon")


def kill_worker(state: ProcessState, reason: str, culprit: dict[str, Any], *, kill_after: float | None, grace: float,
                dry_run: bool, count_kill: Callable[[], None]) -> None:
    """Dump a stuck worker's stacks, log the evidence, then SIGTERM and, after ``grace``, SIGKILL."""
    pidfd = open_verified(state)
    if pidfd is None:
        return
    try:
        now = time.time()
        stacks = dump_stacks(state, pidfd)
        evidence = {
            "workload": state.workload,
            "pid": state.pid,
            "reason": reason,
            "kill_after": kill_after,
            "heartbeat_age_seconds": round(now - state.heartbeat_unix, 3),
            "lock": culprit.get("lock"),
            "holder": culprit.get("holder"),
            "waiters": culprit.get("waiting_threads"),
            "oldest_wait_seconds": culprit.get("oldest_wait_seconds"),
            "orphaned": culprit.get("orphaned"),
            "locks": state.locks(now),
            **stacks,
        }
        if dry_run:
            _log.warning("worker.would_kill", dry_run=True, **evidence)
            return
        _log.critical("worker.killed", grace=grace, **evidence)
        count_kill()
        send(pidfd, state.pid, signal.SIGTERM)
        send(pidfd, state.pid, signal.SIGCONT)  # a stopped process must run to die of SIGTERM
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not still_same(state):
                return
            time.sleep(0.05)
        if still_same(state):
            send(pidfd, state.pid, signal.SIGKILL)
            _log.error("worker.sigkilled", workload=state.workload, pid=state.pid, grace=grace)
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def dump_stacks(state: ProcessState, pidfd: int) -> dict[str, Any]:
    """Every thread's Python stack, from the process's own faulthandler
    (works when all its threads are blocked in C; not when it is stopped),
    and from py-spy where installed."""
    result: dict[str, Any] = {"stacks": None, "py_spy": None}
    stat_ = proc_stat(state.pid)
    dump_signal = int(state.header["dump_signal"])
    if stat_ is not None and stat_[0] in ("T", "t"):
        result["stacks"] = "(process is stopped: no faulthandler dump)"
    elif dump_signal > 0:
        result["stacks"] = faulthandler_dump(state, pidfd, dump_signal)
    py_spy = shutil.which("py-spy")
    if py_spy:
        try:
            out = subprocess.run([py_spy, "dump", "--nonblocking", "--pid", str(state.pid)], capture_output=True,
                                 text=True, timeout=5)
            result["py_spy"] = (out.stdout or out.stderr)[:STACKS_READ_LIMIT]
        except (OSError, subprocess.TimeoutExpired) as exc:
            result["py_spy"] = f"(py-spy failed: {exc})"
    return result


def open_verified(state: ProcessState) -> int | None:
    """A pidfd for the state file's process, or None if that process is gone.

    The pidfd is opened first and the identity checked after: if it matches,
    the pidfd refers to that very process, and signals through it cannot
    reach a process that reused the pid later. -1: no pidfd support (then
    every signal re-checks the identity first).
    """
    pidfd = -1
    if hasattr(os, "pidfd_open"):
        try:
            pidfd = os.pidfd_open(state.pid)
        except ProcessLookupError:
            return None
        except OSError:
            pidfd = -1
    if not still_same(state):
        if pidfd >= 0:
            os.close(pidfd)
        return None
    return pidfd


def still_same(state: ProcessState) -> bool:
    identity = process_identity(state.pid)
    return identity is not None and identity[0] == state.start_ticks and identity[1] == int(state.header["uid"])


def send(pidfd: int, pid: int, signum: int) -> None:
    try:
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signum)
        else:
            os.kill(pid, signum)
    except ProcessLookupError:
        pass


def faulthandler_dump(state: ProcessState, pidfd: int, dump_signal: int) -> str:
    path = state.stacks_path
    try:
        before = os.stat(path).st_size
    except OSError:
        return "(no stacks file)"
    send(pidfd, state.pid, dump_signal)
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
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            return os.pread(fd, min(size - before, STACKS_READ_LIMIT), before).decode("utf-8", "replace")
        finally:
            os.close(fd)
    except OSError as exc:
        return f"(stacks unreadable: {exc.strerror})"
