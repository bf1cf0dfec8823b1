"""What a process that can no longer speak for itself is doing, read from outside.

Three sources, best first; the view says which one it used
(``stacks_source``) and, for each better one, why it was not (``unavailable``):

- ``pystack``: every thread's Python frames, which thread holds the GIL and,
  with ``native``, every thread's native frames (the process is stopped by
  ptrace while it is read, then resumed). Read by a child process
  (:mod:`h5watch.host.pystack_reader`) killed after ``timeout`` seconds, so
  that a frozen or hostile target cannot hang the reader. Needs ptrace
  rights: root has them; another user may be refused by the kernel's
  ``kernel.yama.ptrace_scope``;
- ``faulthandler``: the process's own dump of every thread's Python stack,
  written from a C signal handler to its stacks file on the dump signal
  (works while every thread is blocked in C; not while it is stopped);
- ``state_file``: no stacks, only what the state file says (the holders,
  their operations, the waiters).

Nothing here signals a process: the caller passes the faulthandler route
(:func:`h5watch.host.reaper.faulthandler_stacks` through a pidfd it has
verified), or None for no signal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from h5watch.schema import RECORDER_VIEW_ENTRIES
from h5watch.statedir import proc_stat
from h5watch.statefile import ProcessState, StateFileError, read_recorder

__all__ = [
    "STACKS_SOURCES",
    "PYSTACK_TIMEOUT_SECONDS",
    "OutsideStacks",
    "read_stacks",
    "pystack_threads",
    "process_facts",
    "state_file_view",
    "outside_view",
    "render_threads",
    "recorder_view",
]

STACKS_SOURCES = ("pystack", "faulthandler", "state_file")
PYSTACK_TIMEOUT_SECONDS = 5.0
# What the pystack reader may print: more is cut (and then unreadable JSON).
PYSTACK_OUTPUT_LIMIT = 8 * 1024 * 1024
CMDLINE_LIMIT = 4096


@dataclass
class OutsideStacks:
    """A process's stacks as read from outside, and how."""

    source: str
    # From pystack: one dict per thread (native_id, holds_gil, python_frames, native_frames).
    threads: list[dict[str, Any]] | None = None
    # From faulthandler: its text.
    text: str | None = None
    # Each better source that was not used, and why.
    unavailable: dict[str, str] = field(default_factory=dict)

    @property
    def gil_holder(self) -> int | None:
        """The native thread id of the thread holding the GIL, when pystack read it."""
        return next((thread["native_id"] for thread in self.threads or () if thread["holds_gil"]), None)

    def to_json(self) -> dict[str, Any]:
        return {"stacks_source": self.source, "gil_holder_native_id": self.gil_holder, "threads": self.threads,
                "faulthandler": self.text, "unavailable": self.unavailable}

    def render(self) -> str:
        """Every thread's stack as text (for a log line or a terminal)."""
        if self.threads is not None:
            return render_threads(self.threads)
        if self.text is not None:
            return self.text
        return "(no stacks: " + "; ".join(f"{source}: {why}" for source, why in self.unavailable.items()) + ")"


def render_threads(threads: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    for thread in threads:
        status = ", ".join(s for s in (thread.get("gil_status"), thread.get("gc_status")) if s)
        name = f" '{thread['thread_name']}'" if thread.get("thread_name") else ""
        lines.append(f"Thread {thread['native_id']}{name}" + (f" [{status}]" if status else "") + " (most recent call last):")
        for frame in thread["python_frames"]:
            lines.append(f'  File "{frame["file"]}", line {frame["line"]}, in {frame["function"]}')
        if thread["native_frames"]:
            lines.append("  native (innermost last):")
            lines.extend(f"    {frame['symbol']} ({os.path.basename(frame['library'] or '?')})"
                         for frame in thread["native_frames"])
        lines.append("")
    return "\n".join(lines)


def read_stacks(pid: int, faulthandler: Callable[[], str] | None, *, use_pystack: bool, native: bool = True,
                timeout: float = PYSTACK_TIMEOUT_SECONDS, no_signal: str = "no signal sent (dry run)") -> OutsideStacks:
    """The best stacks to be had: pystack's (when ``use_pystack``; ``native``:
    it stops the process to read native frames too), else the faulthandler
    dump ``faulthandler()`` returns (its text, or why not in parentheses;
    None: no signal may be sent, ``no_signal`` says why), else none."""
    unavailable: dict[str, str] = {}
    if use_pystack:
        threads, why = pystack_threads(pid, native=native, timeout=timeout)
        if threads is not None:
            return OutsideStacks("pystack", threads=threads)
        unavailable["pystack"] = why
    else:
        unavailable["pystack"] = "not asked for (h5watch dump --native reads with pystack)"
    text = faulthandler() if faulthandler is not None else f"({no_signal})"
    if not (text.startswith("(") and text.endswith(")")):
        return OutsideStacks("faulthandler", text=text, unavailable=unavailable)
    unavailable["faulthandler"] = text[1:-1]
    return OutsideStacks("state_file", unavailable=unavailable)


def pystack_threads(pid: int, *, native: bool, timeout: float) -> tuple[list[dict[str, Any]] | None, str]:
    """Every thread of ``pid`` read by pystack in a child process killed after
    ``timeout`` seconds; (None, why) when that fails."""
    command = [sys.executable, "-m", "h5watch.host.pystack_reader", str(pid), *(["--native"] if native else [])]
    before = proc_stat(pid)
    try:
        child = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 start_new_session=True, env=_reader_env())
    except OSError as exc:
        return None, f"cannot start the reader: {exc.strerror or exc}"
    try:
        out, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(child)
        _resume_if_left_stopped(pid, before)
        return None, f"no answer within {timeout:g} s (the reader was killed)"
    finally:
        _kill_group(child)
    try:
        answer = json.loads(out[:PYSTACK_OUTPUT_LIMIT])
    except ValueError:
        _resume_if_left_stopped(pid, before)
        return None, f"the reader exited with {child.returncode} and no readable answer"
    if not isinstance(answer, dict):
        return None, "the reader's answer is not an object"
    if "threads" in answer:
        return answer["threads"], ""
    why = str(answer.get("error", "unknown error"))
    if answer.get("kind") == "permission" and os.geteuid() != 0:
        why += f"; ptrace of another process is limited by kernel.yama.ptrace_scope = {_ptrace_scope()} (root may read any)"
    return None, why


# How long a cut-off read watches its target for a stop it left behind.
_LEFT_STOPPED_WATCH_SECONDS = 0.3


def _resume_if_left_stopped(pid: int, before: tuple[str, int] | None) -> None:
    """A reader killed in the middle of a ptrace attach (pystack's native
    read attaches to every thread, some of it through PTRACE_ATTACH, which
    sends SIGSTOP) can leave that SIGSTOP pending in the target: once the
    kernel has detached the dead tracer, the target stops (state T) for
    good. Resume it, when it was not stopped before the read and is the same
    process (its start time), within a short watch."""
    if before is None or before[0] in ("T", "t"):
        return
    deadline = time.monotonic() + _LEFT_STOPPED_WATCH_SECONDS
    while True:
        now = proc_stat(pid)
        if now is None or now[1] != before[1]:
            return
        if now[0] == "T":
            try:
                os.kill(pid, signal.SIGCONT)
            except (ProcessLookupError, PermissionError):
                pass
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.01)


def _reader_env() -> dict[str, str]:
    # The reader must import this very h5watch, nothing an H5WATCH_* setting
    # would add (it installs nothing: it never imports the runtime).
    return {key: value for key, value in os.environ.items() if not key.startswith("H5WATCH_")}


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        child.wait()


def _ptrace_scope() -> str:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return f.read().strip()
    except OSError:
        return "unknown (no yama)"


def process_facts(pid: int) -> dict[str, Any]:
    """Who ``pid`` is, as ``/proc`` says now: start time, uid, executable and
    command line; each field None when it cannot be read (``unreadable``
    names them)."""
    facts: dict[str, Any] = {"pid": pid}
    unreadable: list[str] = []
    stat_ = proc_stat(pid)
    facts["state"] = None if stat_ is None else stat_[0]
    facts["start_ticks"] = None if stat_ is None else stat_[1]
    facts["started_unix"] = None if stat_ is None else _boot_time() + stat_[1] / os.sysconf("SC_CLK_TCK")
    try:
        facts["uid"] = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        facts["uid"] = None
    try:
        facts["exe"] = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        facts["exe"] = None
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(CMDLINE_LIMIT)
        facts["cmdline"] = [arg.decode("utf-8", "replace") for arg in raw.rstrip(b"\0").split(b"\0")] if raw else None
    except OSError:
        facts["cmdline"] = None
    unreadable = [name for name in ("start_ticks", "uid", "exe", "cmdline") if facts[name] is None]
    facts["unreadable"] = unreadable
    return facts


def _boot_time() -> float:
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return 0.0


def state_file_view(state: ProcessState, now_unix: float) -> dict[str, Any]:
    """What ``state``'s file said when it was read, and whether it is still there."""
    try:
        info = os.stat(state.path, follow_symlinks=False)
        present = state.file_id is None or (info.st_dev, info.st_ino) == state.file_id
    except OSError:
        present = False
    return {
        "path": state.path,
        "present": present,
        "note": None if present else "the state file is gone (removed, or replaced): what follows is its last read",
        "workload": state.workload,
        "versions": state.versions,
        "watchdog_running": state.watchdog_running,
        "heartbeat_unix": state.heartbeat_unix,
        "heartbeat_age_seconds": round(max(0.0, now_unix - state.heartbeat_unix), 3),
        "locks": state.locks(now_unix),
    }


def outside_view(state: ProcessState, stacks: OutsideStacks, now_unix: float) -> dict[str, Any]:
    """A process as seen from outside: who it is (``/proc``), its state file,
    its flight recorder and its stacks, as plain data."""
    names = _thread_names(state, now_unix)
    for thread in stacks.threads or ():
        thread["thread_name"] = names.get(thread["native_id"])
    return {
        "process": {**process_facts(state.pid), "workload": state.workload},
        "state_file": state_file_view(state, now_unix),
        "recorder": recorder_view(state),
        **stacks.to_json(),
    }


def recorder_view(state: ProcessState, limit: int = RECORDER_VIEW_ENTRIES) -> dict[str, Any]:
    """The newest ``limit`` entries of the process's flight recorder, oldest
    first, read now from its state file (``entries``); or None and why not
    (``reason``: the file is gone, replaced or damaged)."""
    try:
        return {"entries": read_recorder(state, limit), "reason": None}
    except StateFileError as exc:
        return {"entries": None, "reason": f"the state file's flight recorder cannot be read: {exc}"}


def _thread_names(state: ProcessState, now_unix: float) -> dict[int, str]:
    """Thread names by native id, as the state file's holders and waiters give them."""
    names: dict[int, str] = {}
    for lock in state.locks(now_unix):
        for thread in [lock.get("holder") or {}, *(lock.get("waiting_threads") or [])]:
            if thread.get("native_id") and thread.get("thread_name"):
                names[thread["native_id"]] = thread["thread_name"]
    return names
