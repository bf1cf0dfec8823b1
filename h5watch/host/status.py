"""``h5watch status``: what an operator looks at first.

Reads the state files (never writes, removes or signals anything) and shows
each live instrumented process, its heartbeat age and state, and per lock
the holder (thread name, operation, hold age), the waiters and the oldest
wait. Stuck processes and locks are marked ``STUCK``. ``--json`` prints the
same as one JSON document for scripts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from h5watch.errors import UsageError
from h5watch.options import resolve
from h5watch.statedir import STATE_SUFFIX, list_names, readable_user_dirs
from h5watch.statefile import StateDirError, StateFileError, process_identity, read_state_file

__all__ = ["add_arguments", "main", "collect_status"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", help=(
        "the shared state directory (default: as H5WATCH_STATE_DIR, else /run/h5watch if it exists, else "
        "$XDG_RUNTIME_DIR/h5watch); root reads every user's subdirectory, others their own"
    ))
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--stuck-after", type=float, default=30.0, metavar="SECONDS",
                        help="a heartbeat, wait or hold older than this is stuck (default 30)")


def main(args: argparse.Namespace) -> int:
    if not args.stuck_after > 0:
        raise UsageError(f"--stuck-after: expected a number of seconds > 0, got {args.stuck_after}")
    options = resolve({"state_dir": args.state_dir} if args.state_dir else {})
    report = collect_status(options.state_dir, args.stuck_after)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report))
    return 0


def collect_status(state_dir: str, stuck_after: float = 30.0) -> dict[str, Any]:
    now = time.time()
    report: dict[str, Any] = {"state_dir": state_dir, "time_unix": now, "processes": [], "skipped": []}
    try:
        directories, refused = readable_user_dirs(state_dir)
    except StateDirError as exc:
        raise UsageError(str(exc)) from None
    report["skipped"] = [{"path": path, "reason": "foreign_owner", "error": message} for path, message in refused]
    report["truncated"] = False
    states = []
    try:
        for directory in directories:
            for name in sorted(_live_state_files(list_names(directory), directory.uid)):
                path = f"{directory.path}/{name}"
                try:
                    state = read_state_file(path, daemon_uid=directory.uid, dir_fd=directory.fd)
                except StateFileError as exc:
                    report["skipped"].append({"path": path, "reason": exc.reason, "error": str(exc)})
                    continue
                if state.file_uid != directory.uid:
                    report["skipped"].append({"path": path, "reason": "foreign_owner",
                                              "error": f"owned by uid {state.file_uid} in the directory of uid {directory.uid}"})
                    continue
                states.append(state)
    finally:
        for directory in directories:
            os.close(directory.fd)
    for state in states:
        identity = process_identity(state.pid)
        alive = (
            identity is not None
            and identity[0] == state.start_ticks
            and identity[1] == int(state.header["uid"])
            and not int(state.header["exited"])
        )
        if not alive:
            continue
        heartbeat_age = max(0.0, now - state.heartbeat_unix)
        locks = state.locks(now)  # without a watchdog: holds as of the last write
        for lock in locks:
            holder = lock["holder"]
            lock["stuck"] = bool(
                lock["oldest_wait_seconds"] > stuck_after
                or (holder is not None and (holder["hold_age_seconds"] or 0) > stuck_after)
                or (lock["orphaned"] and lock["waiters"])
            )
        tick = float(state.header["tick_interval"]) or 0.5
        # Only a running watchdog beats: a process without one is judged by its records.
        beat_stale = state.watchdog_running and heartbeat_age > max(stuck_after, 3 * tick)
        stuck = beat_stale or any(lock["stuck"] for lock in locks)
        report["processes"].append({
            "pid": state.pid,
            "workload": state.workload,
            "state": "stuck" if stuck else "ok",
            "heartbeat_age_seconds": round(heartbeat_age, 3),
            "watchdog_running": state.watchdog_running,
            "path": state.path,
            "locks": locks,
        })
    return report


def _live_state_files(names: list[str], uid: int) -> list[str]:
    """State files whose process (pid and start time in the name) is alive
    now as ``uid``: found by name alone, however many dead files there are."""
    out = []
    for name in names:
        pid, sep, ticks = name[: -len(STATE_SUFFIX)].partition("-")
        if not (name.endswith(STATE_SUFFIX) and sep and pid.isdigit() and ticks.isdigit() and int(pid) > 0):
            continue
        identity = process_identity(int(pid))
        if identity is not None and identity[0] == int(ticks) and identity[1] == uid:
            out.append(name)
    return out


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.1f}s"
    return f"{seconds / 60:.1f}m"


def render(report: dict[str, Any]) -> str:
    processes = report["processes"]
    lines = [f"state dir: {report['state_dir']}"]
    if not processes:
        lines.append("no live instrumented processes")
    else:
        stuck = sum(p["state"] == "stuck" for p in processes)
        lines.append(f"{len(processes)} live processes, {stuck} stuck")
        lines.append("")
        lines.append(f"  {'PID':>8}  {'WORKLOAD':<20} {'HEARTBEAT':>9}  STATE")
        for process in processes:
            state = "STUCK" if process["state"] == "stuck" else "ok"
            mark = "!" if state == "STUCK" else " "
            watchdog = "" if process["watchdog_running"] else "  (no watchdog: no heartbeat; records as of the last write)"
            lines.append(f"{mark} {process['pid']:>8}  {process['workload'][:20]:<20} {_age(process['heartbeat_age_seconds']):>9}  {state}{watchdog}")
            for lock in process["locks"]:
                lines.append("      " + _lock_line(lock))
    for skipped in report["skipped"]:
        lines.append(f"skipped {skipped['path']}: {skipped['error']}")
    return "\n".join(lines) + "\n"


def _lock_line(lock: dict[str, Any]) -> str:
    holder = lock["holder"]
    parts = [f"{lock['lock']}:"]
    if holder is None:
        parts.append("free")
    else:
        who = holder["thread_name"] or f"thread {holder['thread_ident']}"
        dead = " (dead: orphaned by a fork)" if lock["orphaned"] else ""
        operation = f" in {holder['operation']}" if holder["operation"] else ""
        parts.append(f"held by {who}{dead}{operation} for {_age(holder['hold_age_seconds'])}")
    if lock["waiters"]:
        names = ", ".join(w["thread_name"] or str(w["native_id"]) for w in lock["waiting_threads"])
        parts.append(f"{lock['waiters']} waiting ({names}), oldest {_age(lock['oldest_wait_seconds'])}")
    parts.append(f"[{lock['acquisitions']} acquisitions, {lock['contentions']} contended]")
    if lock["stuck"]:
        parts.append("STUCK")
    return " ".join(parts)
