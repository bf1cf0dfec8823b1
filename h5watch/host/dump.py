"""``h5watch dump PID``: an instrumented process seen from outside, on demand, killing nothing.

The same view the daemon writes into an incident file before a kill: who
the process is (``/proc``), what its state file says (locks, holders,
waiters, heartbeat), its flight recorder (``recorder``: its newest
entries, oldest first), and every thread's stacks: by default the process's own
faulthandler dump (the dump signal, answered by a C signal handler into its
stacks file); with ``--native``, pystack's read of every thread's Python
and native frames and of which thread holds the GIL (the process is stopped
by ptrace while it is read, well under a second, then resumed), falling
back to the faulthandler dump when pystack cannot read it.

Only an instrumented process: one with a live state file naming its pid and
start time, in the directory of its uid; of another user only as root.
Anything else is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from h5watch.errors import UsageError
from h5watch.host import outside, reaper
from h5watch.host.verdict import parse_seconds
from h5watch.recorder import render as render_entries
from h5watch.statedir import process_identity, readable_user_dirs
from h5watch.statefile import STATE_SUFFIX, ProcessState, StateDirError, StateFileError, read_state_file

__all__ = ["add_arguments", "main", "parse_pid", "find_state", "collect", "render"]

# Linux's largest pid_max.
PID_MAX = 4194304


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pid", metavar="PID", help="the process id of an instrumented process")
    parser.add_argument("--native", action="store_true", help=(
        "read every thread's Python and native frames and the GIL holder with pystack (stops the process for the "
        "read; needs ptrace rights) instead of its faulthandler dump"
    ))
    parser.add_argument("--format", choices=("json", "text"), default="json", help="json (default) or text")
    parser.add_argument("--timeout", default=str(outside.PYSTACK_TIMEOUT_SECONDS), help=(
        f"with --native, give up pystack's read after this many seconds (default {outside.PYSTACK_TIMEOUT_SECONDS:g})"
    ))
    parser.add_argument("--state-dir", help="the shared state directory (default: as H5WATCH_STATE_DIR, as for h5watch status)")


def parse_pid(text: str) -> int:
    if not (text.isascii() and text.isdigit() and 0 < int(text) <= PID_MAX):
        raise UsageError(f"PID: expected a process id, a whole number from 1 to {PID_MAX}, got {text!r}")
    return int(text)


def main(args: argparse.Namespace) -> int:
    from h5watch.options import resolve

    pid = parse_pid(args.pid)
    timeout = parse_seconds("--timeout", args.timeout)
    options = resolve({"state_dir": args.state_dir} if args.state_dir else {})
    state = find_state(options.state_dir, pid)
    report = collect(state, native=args.native, timeout=timeout)
    if args.format == "json":
        json.dump(report, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report))
    return 0


def find_state(state_dir: str, pid: int) -> ProcessState:
    """The live state file of ``pid``, or :class:`UsageError` saying why there is none to inspect."""
    refused = reaper.refusal(pid)
    if refused is not None:
        raise UsageError(f"pid {pid}: not inspected ({refused})")
    identity = process_identity(pid)
    if identity is None:
        raise UsageError(f"pid {pid}: no such process")
    start_ticks, uid, _ = identity
    euid = os.geteuid()
    if euid != 0 and uid != euid:
        raise UsageError(f"pid {pid}: belongs to uid {uid}; only root may inspect another user's process")
    try:
        directories, _ = readable_user_dirs(state_dir)
    except StateDirError as exc:
        raise UsageError(str(exc)) from None
    name = f"{pid}-{start_ticks}{STATE_SUFFIX}"
    try:
        for directory in directories:
            if directory.uid != uid:
                continue
            path = os.path.join(directory.path, name)
            try:
                state = read_state_file(path, daemon_uid=directory.uid, dir_fd=directory.fd)
            except StateFileError as exc:
                if exc.reason == "unreadable" and not os.path.lexists(path):
                    break
                raise UsageError(f"pid {pid}: its state file {path} is unusable: {exc}") from None
            if (state.pid, state.start_ticks, int(state.header["uid"])) != (pid, start_ticks, uid):
                raise UsageError(f"pid {pid}: its state file {path} names another process")
            return state
    finally:
        for directory in directories:
            os.close(directory.fd)
    raise UsageError(f"pid {pid}: not an instrumented process (no state file {name} of uid {uid} under {state_dir}); "
                     "run it under 'h5watch run', or give the --state-dir it uses")


def collect(state: ProcessState, *, native: bool, timeout: float) -> dict[str, Any]:
    """The outside view of ``state``'s process, as plain data."""
    now = time.time()
    pidfd = reaper.open_verified(state)
    try:
        faulthandler = None if pidfd is None else (lambda: reaper.faulthandler_stacks(state, pidfd))
        stacks = outside.read_stacks(state.pid, faulthandler, use_pystack=native, native=True, timeout=timeout,
                                     no_signal="not signalled: it is not provably the state file's process now")
    finally:
        if pidfd is not None and pidfd >= 0:
            os.close(pidfd)
    return {"time_unix": now, **outside.outside_view(state, stacks, now)}


def render(report: dict[str, Any]) -> str:
    """The report as text for a terminal."""
    process, state_file = report["process"], report["state_file"]
    lines = [
        f"pid {process['pid']}  workload {process['workload']}  uid {process['uid']}  state {process['state']}",
        f"  exe      {process['exe']}",
        f"  cmdline  {' '.join(process['cmdline'] or [])}",
        f"  state file {state_file['path']}  heartbeat {state_file['heartbeat_age_seconds']:.1f} s ago"
        + ("" if state_file["watchdog_running"] else "  (no watchdog running)"),
    ]
    for lock in state_file["locks"]:
        holder = lock["holder"]
        held = "free" if holder is None else (
            f"held by {holder['thread_name']} (native id {holder['native_id']}) for {holder['hold_age_seconds'] or 0:.1f} s"
            + (f" in {holder['operation']}" if holder["operation"] else ""))
        lines.append(f"  lock {lock['lock']}: {held}; {lock['waiters']} waiting" + ("; ORPHANED" if lock["orphaned"] else ""))
        lines.extend(f"    waiting: {w['thread_name']} (native id {w['native_id']}) for {w['wait_seconds']:.1f} s"
                     for w in lock["waiting_threads"])
    recorder = report["recorder"]
    if recorder["entries"] is None:
        lines.append(f"  recorder: {recorder['reason']}")
    else:
        lines.append(f"  recorder: {len(recorder['entries'])} entries, oldest first")
        lines.extend(f"    {line}" for line in render_entries(recorder["entries"]))
    lines.append(f"stacks ({report['stacks_source']}" + (f", GIL held by native id {report['gil_holder_native_id']}"
                                                          if report["gil_holder_native_id"] else "") + "):")
    lines.extend(f"  ({source} unavailable: {why})" for source, why in report["unavailable"].items() if not why.startswith("not asked"))
    stacks = outside.OutsideStacks(report["stacks_source"], threads=report["threads"], text=report["faulthandler"],
                                   unavailable=report["unavailable"])
    if report["stacks_source"] != "state_file":
        lines.append(stacks.render().rstrip("\n"))
    return "\n".join(lines) + "\n"
