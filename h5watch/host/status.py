"""``h5watch status``: what an operator looks at first.

Reads the state files (never writes, removes or signals anything) and shows
each live instrumented process, its heartbeat age and state, and per lock
the holder (thread name, operation, hold age), the waiters and the oldest
wait. Stuck processes and locks are marked ``STUCK``, judged as the daemon
judges them (:mod:`h5watch.host.verdict`), with the same ``--stuck-after``
and ``--kill-after`` (when neither is given: those of the daemon running on
the state dir, else the defaults): each process says why it is stuck, which lock is to
blame, and whether a daemon with that ``--kill-after`` would kill it. A
process that is stopped or traced is ``STOPPED``, and says why.
``--json`` prints the same as one JSON document for scripts, with each
process's newest flight-recorder entries (``recorder``).

Exit status: 0 when no live process is stuck, :data:`EXIT_STUCK` (1) when
one is (a stopped one too, when its file makes it stuck), 2 for bad input
(a state dir that does not exist or is not a directory included), with a
one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from h5watch.errors import UsageError
from h5watch.host import claim
from h5watch.host.verdict import Thresholds, judge_live, lock_is_stuck
from h5watch.options import resolve, unknown_variable_text, unknown_variables
from h5watch.schema import RECORDER_STATUS_ENTRIES
from h5watch.statedir import STATE_SUFFIX, list_names, open_user_dir, readable_user_dirs
from h5watch.statefile import StateDirError, StateFileError, process_identity, read_recorder, read_state_file

__all__ = ["EXIT_STUCK", "add_arguments", "main", "collect_status"]

EXIT_STUCK = 1
# Operations listed per lock (--json); every one is in the state file and on /metrics.
TOP_OPERATIONS = 10
EXIT_STATUS_HELP = (
    "exit status: 0 when no live process is stuck; 1 when one is (as --stuck-after judges); 2 for bad input, such as a "
    "state dir that does not exist or is not a directory (one line on stderr)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_STATUS_HELP
    parser.add_argument("--state-dir", help=(
        "the shared state directory (default: as H5WATCH_STATE_DIR, else /run/h5watch if it exists, else "
        "$XDG_RUNTIME_DIR/h5watch); root reads every user's subdirectory, others their own"
    ))
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    parser.add_argument("--stuck-after", default=None, metavar="SECONDS", help=(
        "a heartbeat, wait or hold older than this is stuck, as for the daemon (default: --kill-after, else 30)"
    ))
    parser.add_argument("--kill-after", default=None, metavar="SECONDS", help=(
        "also say which processes a daemon with this --kill-after would kill, and why (default: none; status "
        "itself never signals anything)"
    ))


def main(args: argparse.Namespace) -> int:
    thresholds = Thresholds.parse(args.stuck_after, args.kill_after)
    options = resolve({"state_dir": args.state_dir} if args.state_dir else {})
    for variable, closest in unknown_variables():
        sys.stderr.write(f"h5watch status: warning: {unknown_variable_text(variable, closest)}\n")
    daemon_pid = None
    if args.stuck_after is None and args.kill_after is None:
        found = daemon_thresholds(options.state_dir)
        if found is not None:
            thresholds, daemon_pid = found
    report = collect_status(options.state_dir, thresholds)
    report["thresholds_of_daemon_pid"] = daemon_pid
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render(report))
    return EXIT_STUCK if any(process["stuck"] for process in report["processes"]) else 0


def collect_status(state_dir: str, thresholds: Thresholds | None = None, histograms: bool = False) -> dict[str, Any]:
    """Every live process of ``state_dir`` as plain data, judged at
    ``thresholds`` (default: the daemon's defaults); with ``histograms``,
    each lock's wait and hold histograms too (``h5watch top``'s quantiles)."""
    now = time.time()
    thresholds = thresholds or Thresholds()
    report: dict[str, Any] = {"state_dir": state_dir, "time_unix": now, "thresholds": thresholds.to_json(),
                              "processes": [], "skipped": []}
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
        verdict = judge_live(state, now, thresholds)
        locks = state.locks(now, histograms)  # without a watchdog: holds as of the last write
        operations = state.operation_records()
        for lock in locks:
            lock["stuck"] = verdict.stuck is not None and lock_is_stuck(state, lock, thresholds)
            # Contention by operation, the most held first.
            lock["operations"] = [record.to_plain() for record in operations if record.lock == lock["lock"]][:TOP_OPERATIONS]
        report["processes"].append({
            "pid": state.pid,
            "workload": state.workload,
            "state": verdict.state,
            "stuck": verdict.stuck is not None,
            "stopped": verdict.stopped,
            "reason": verdict.reason,
            "culprit_lock": verdict.culprit_lock,
            "stuck_age_seconds": None if verdict.stuck is None else round(verdict.stuck.age_seconds, 3),
            "kill_reason": verdict.kill_reason,
            "heartbeat_age_seconds": round(heartbeat_age, 3),
            "started_unix": float(state.header["started_unix"]) or None,
            "watchdog_running": state.watchdog_running,
            "path": state.path,
            "locks": locks,
            "recorder": _recorder_tail(state),
        })
    return report


def _recorder_tail(state: Any) -> list[dict[str, Any]] | None:
    """The newest entries of the process's flight recorder (None: unreadable)."""
    try:
        return read_recorder(state, RECORDER_STATUS_ENTRIES)
    except StateFileError:
        return None


def daemon_thresholds(state_dir: str) -> tuple[Thresholds, int] | None:
    """The thresholds of the daemon running on ``state_dir`` for this user,
    and its pid; None when none runs (or its settings are unreadable)."""
    try:
        directory = open_user_dir(state_dir, create=False)
    except (StateDirError, OSError):
        return None
    settings = claim.running_daemon(directory)
    thresholds = None if settings is None else Thresholds.from_json(settings)
    return None if thresholds is None or settings is None else (thresholds, settings["pid"])


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
    lines = [f"state dir: {report['state_dir']}", _thresholds_line(report["thresholds"], report.get("thresholds_of_daemon_pid"))]
    if not processes:
        lines.append("no live instrumented processes")
    else:
        stuck = sum(p["stuck"] for p in processes)
        stopped = sum(p["stopped"] is not None for p in processes)
        lines.append(f"{len(processes)} live processes, {stuck} stuck" + (f", {stopped} stopped" if stopped else ""))
        lines.append("")
        lines.append(f"  {'PID':>8}  {'WORKLOAD':<20} {'HEARTBEAT':>9}  STATE")
        for process in processes:
            state = {"stuck": "STUCK", "stopped": "STOPPED"}.get(process["state"], "ok")
            mark = "!" if process["stuck"] else " "
            watchdog = "" if process["watchdog_running"] else "  (no watchdog: no heartbeat; records as of the last write)"
            lines.append(f"{mark} {process['pid']:>8}  {process['workload'][:20]:<20} {_age(process['heartbeat_age_seconds']):>9}  "
                         f"{state}{_why(process)}{watchdog}")
            for lock in process["locks"]:
                lines.append("      " + _lock_line(lock))
    for skipped in report["skipped"]:
        lines.append(f"skipped {skipped['path']}: {skipped['error']}")
    return "\n".join(lines) + "\n"


def _thresholds_line(thresholds: dict[str, Any], daemon_pid: int | None) -> str:
    """``thresholds: --stuck-after 30s, --kill-after none``: what the verdicts
    below used, and whose they are when they are the running daemon's."""
    kill_after = thresholds["kill_after"]
    kill = "none" if kill_after is None else f"{kill_after:g}s"
    whose = "" if daemon_pid is None else f" (the daemon's, pid {daemon_pid})"
    return (f"thresholds: --stuck-after {thresholds['stuck_after']:g}s, --kill-after {kill}{whose}; "
            "a process's own hold_timeout or wait_timeout when lower")


def _why(process: dict[str, Any]) -> str:
    """`` hold of app.x for 6.2s; a daemon would kill it (hold)``, or nothing for a process that is ok."""
    parts = []
    if process["stopped"] is not None:
        parts.append(process["stopped"])
    if process["reason"] is not None:
        culprit = f" of {process['culprit_lock']}" if process["culprit_lock"] else ""
        parts.append(f"{process['reason']}{culprit} for {_age(process['stuck_age_seconds'])}")
    if process["kill_reason"] is not None and process["stopped"] is not None:
        parts.append(f"a daemon would spare it ({process['kill_reason']}; it kills a stopped process only with --kill-stopped)")
    elif process["kill_reason"] is not None:
        parts.append(f"a daemon would kill it ({process['kill_reason']})")
    return f"  {'; '.join(parts)}" if parts else ""


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
        if lock["waiters_unrecorded"]:
            names += f", +{lock['waiters_unrecorded']} more"
        parts.append(f"{lock['waiters']} waiting ({names}), oldest {_age(lock['oldest_wait_seconds'])}")
    parts.append(f"[{lock['acquisitions']} acquisitions, {lock['contentions']} contended]")
    if lock["stuck"]:
        parts.append("STUCK")
    return " ".join(parts)
