"""``h5watch demo``: how h5py programs hang with threads and ``fork()``, and
what h5watch changes, in plain words and about 15 seconds.

Four small programs (``h5watch.demo.scenarios``) run in fresh interpreters,
each without h5watch and then with it (the first only with it: it measures
what taking turns for h5py's lock costs). This process never imports h5py:
what the header says about h5watch is what those interpreters reported.
Every line printed fits in :data:`WIDTH` columns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from typing import Any

from h5watch.demo.scenarios import (
    FORK_TIMEOUT,
    HOLD_TIMEOUT,
    HUNG_AFTER_SECONDS,
    SCENARIOS,
    SLOW_READ_SECONDS,
    STUCK_HOLD_SECONDS,
    Run,
    run_scenario,
)
from h5watch.errors import UsageError
from h5watch.options import resolve

__all__ = ["WIDTH", "add_arguments", "main", "lock_cost_table", "trimmed_event"]

WIDTH = 100
_INDENT = " " * 6


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="how long the threads of the first program read (default 2)")
    parser.add_argument("--threads", type=int, default=10, help="reader threads in the first program (default 10)")
    parser.add_argument("--skip-forks", action="store_true",
                        help="run only the first program (threads reading), not the three that hang")


def main(args: argparse.Namespace) -> int:
    if not 0 < args.seconds <= 60:
        raise UsageError(f"--seconds: expected a number of seconds from 0 to 60, got {args.seconds}")
    if not 1 <= args.threads <= 64:
        raise UsageError(f"--threads: expected 1 to 64 threads, got {args.threads}")
    resolve({"state_files": False})  # the programs read the same H5WATCH_* variables: a bad one fails here
    names = ["threads"] if args.skip_forks else list(SCENARIOS)
    begin = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="h5watch-demo-") as directory:
        _say(_INTRO)
        about = _about(directory)
        print()
        _say(_header(about))
        runs: dict[str, Run] = {}
        for number, name in enumerate(names, 1):
            print(f"\n[{number}/{len(names)}] {SCENARIOS[name]}", flush=True)
            runs[name] = _SHOW[name](directory, args)
        _check_same_h5watch(about, runs)
        held = runs.get("stuck_holder")
        if held is not None:
            event = next((e for e in held.events if e.get("event") == "lock.hold_timeout"), None)
            if event is not None:
                print()
                _say("What h5watch logged when the lock was held too long (one JSON line on stderr; "
                     "shown here trimmed and spread over lines):")
                print(json.dumps(trimmed_event(event), indent=2))
        print()
        print(_NEXT_STEPS.strip("\n"))
    print(f"\n(The demo took {time.monotonic() - begin:.1f} s.)")
    return 0


_INTRO = """
h5watch demo: how h5py programs hang with threads and fork(), and what h5watch changes

h5py lets one thread at a time into the HDF5 library: every h5py call takes one lock that the \
whole process shares (h5py names it "phil"), so threads that read HDF5 files take turns. \
That is cheap while every call is quick (the first program below measures it). It hangs a \
program, with nothing saying why, in the four ways the other programs show:

- a fork() made by C code (a C extension) while another thread holds the lock: the child has \
no such thread, so its first h5py call waits forever (h5py before 3.14 does this with os.fork() too);
- os.fork() in h5py 3.14 and later first waits for the lock, as long as a thread holds it: \
seconds behind a slow read, forever behind a stuck one;
- a thread that keeps the lock (slow I/O inside h5py, a stuck file-like object) stalls every \
other thread's h5py calls;
- a deadlock: a thread holds the lock inside an h5py call that reads through a Python file \
object served by another thread, and that thread's garbage collection frees an h5py object, \
which needs the lock.

h5watch watches the lock: it times every wait, knows which thread holds it and where, bounds \
how long a fork waits, and turns each of these hangs into an error event that names the thread \
holding the lock, or, for a deadlock, every thread of it.
"""

_NEXT_STEPS = """
Try it on your own program:
  h5watch run --hold-timeout 30 -- python your_program.py
      runs it with h5watch, no code change; a stuck lock is now an event naming its holder
  h5watch daemon --dry-run
      watches every such process on this host; Prometheus metrics on 127.0.0.1:9464
  h5watch status
      which thread holds the lock in each process right now, and who waits for it
  or in the program itself, before it imports h5py:
      import h5watch; h5watch.install(hold_timeout=30)
README.md says more; docs/runbook.md explains each event and alert.
"""


def _fill(text: str, initial_indent: str = "", subsequent_indent: str = "") -> str:
    # Paths and option names stay whole: no breaks at their hyphens.
    return textwrap.fill(text, WIDTH, initial_indent=initial_indent, subsequent_indent=subsequent_indent,
                         break_on_hyphens=False)


def _say(text: str) -> None:
    """Print paragraphs (and "- " items) wrapped to WIDTH columns."""
    for paragraph in text.strip("\n").split("\n"):
        if not paragraph:
            print()
        elif paragraph.startswith("- "):
            print(_fill(paragraph, subsequent_indent="  "))
        else:
            print(_fill(paragraph))
    sys.stdout.flush()


def _about(directory: str) -> dict[str, Any]:
    result = run_scenario("about", True, directory).result
    about: dict[str, Any] = result.get("about", {})
    if "implementation" not in about:
        raise UsageError(f"the demo could not start its first program ({sys.executable} -m "
                         f"h5watch.demo.scenarios): {result.get('error')}")
    return about


def _implementation(about: dict[str, Any]) -> str:
    if about.get("implementation") == "compiled":
        return "compiled lock core"
    return f"pure-Python lock core: {about.get('implementation_reason')}"


def _header(about: dict[str, Any]) -> str:
    return (
        f"Each program runs in a fresh Python {about['python']} (those that hang: first without h5watch, "
        f"then with it), where h5py {about['h5py']} (HDF5 {about['hdf5']}) runs under h5watch "
        f"{about['h5watch']} ({_implementation(about)}), from {about['h5watch_path']}."
    )


def _check_same_h5watch(about: dict[str, Any], runs: dict[str, Run]) -> None:
    for run in runs.values():
        ran: dict[str, Any] = run.result.get("about") or {}
        if ran and ran.get("h5watch_path") != about["h5watch_path"] or ran.get("implementation") != about["implementation"]:
            print()
            _say(f"Note: a program ran h5watch ({_implementation(ran)}) from {ran.get('h5watch_path')}, "
                 "not the one named above.")
            return


# -- each program: run it, then say what happened and what it means -----------


def _start(label: str) -> None:
    print(f"{_INDENT}{label} ".ljust(len(_INDENT) + 17, "."), end=" ", flush=True)


def _finish(run: Run, text: str) -> None:
    """The rest of a run's progress line, wrapped under its own start, and how long it took."""
    lines = textwrap.wrap(f"{text} ({run.seconds:.1f} s)", WIDTH - len(_INDENT) - 18, break_on_hyphens=False)
    print(lines[0] if lines else "", flush=True)
    for line in lines[1:]:
        print(" " * (len(_INDENT) + 18) + line)


def _means(text: str) -> None:
    print(_fill("What it means: " + text, initial_indent=_INDENT, subsequent_indent=_INDENT))
    sys.stdout.flush()


def _run(name: str, instrument: bool, directory: str, extra: list[str] | None = None) -> Run:
    _start("with h5watch" if instrument else "without h5watch")
    return run_scenario(name, instrument, directory, extra)


def _failed(run: Run) -> bool:
    if "error" in run.result:
        _finish(run, run.result["error"])
        return True
    return False


def _show_threads(directory: str, args: argparse.Namespace) -> Run:
    run = _run("threads", True, directory, ["--threads", str(args.threads), "--seconds", str(args.seconds)])
    if _failed(run):
        return run
    result = run.result
    stats = result.get("lock")
    if stats is None:
        _finish(run, f"{result['reads']:,} file reads; h5watch saw no lock")
        return run
    acquisitions = stats["acquisitions"]
    waited = 100.0 * stats["contentions"] / acquisitions if acquisitions else 0.0
    _finish(run, f"{result['threads'] + 1} threads made {result['reads']:,} file reads in {result['seconds']:g} s, "
            f"going through the lock {acquisitions:,} times; {waited:.1f}% of those had to wait for another thread")
    print(textwrap.indent(lock_cost_table(stats), _INDENT))
    _means("only one thread is inside HDF5 at a time; the others queue. p50 and p99: half and 99% "
           "of the waits (or holds) took less than that (estimated from h5watch's histogram as "
           "Prometheus does), max: the longest. That is what sharing the lock costs here; the rest "
           "of this demo is about when the wait never ends.")
    return run


def _show_fork_from_c(directory: str, args: argparse.Namespace) -> Run:
    bare = _run("fork_from_c", False, directory)
    if not _failed(bare):
        _finish(bare, _children(bare.result))
    watched = _run("fork_from_c", True, directory)
    if _failed(watched):
        return watched
    result = watched.result
    parts = []
    if result["exited_70"]:
        parts.append(f"{result['exited_70']} found the lock held by a thread that did not exist in "
                     "them and exited at once (code 70), naming that thread")
    parts.append(f"{result['ok']} ran normally (the lock was free when they were forked)")
    if result["hung"]:
        parts.append(f"{result['hung']} hung inside Python itself before running any code (explained below)")
    if result["other"]:
        parts.append(f"{result['other']} exited otherwise")
    orphan = next((e for e in watched.events if e.get("event") == "lock.orphaned"), None)
    holder = (orphan or {}).get("holder") or {}
    named = f"; the first named {holder['thread_name']!r}" if holder.get("thread_name") else ""
    _finish(watched, f"of {result['children']} children, " + ", ".join(parts) + named)
    meaning = (f"without h5watch every child that hung would have hung forever (the demo killed "
               f"them after {HUNG_AFTER_SECONDS:g} s); with it, such a child ends at once and its "
               "log says which thread of the parent held the lock, and in which h5py call.")
    if result["hung"]:
        meaning += (" A fork made from C while other threads wait to run Python can copy Python's own "
                    "thread switch half-done; such a child hangs before any code runs, with or "
                    "without h5watch.")
    _means(meaning)
    return watched


def _children(result: dict[str, Any]) -> str:
    text = f"{result['hung']} of {result['children']} children hung"
    if result["ok"]:
        text += f", {result['ok']} ran normally"
    return text


def _show_fork_during_slow_read(directory: str, args: argparse.Namespace) -> Run:
    bare = _run("fork_during_slow_read", False, directory)
    if not _failed(bare):
        if bare.result["hung"]:
            child = f"the child hung (the demo killed it after {HUNG_AFTER_SECONDS:g} s)"
        else:
            child = "the child then ran"
        _finish(bare, f"os.fork() took {bare.result['fork_seconds']:g} s, and {child}; nothing said why")
    watched = _run("fork_during_slow_read", True, directory)
    if _failed(watched):
        return watched
    result = watched.result
    stall = next((e for e in watched.events if e.get("event") == "fork.lock_timeout"), None)
    holder = (stall or {}).get("holder") or {}
    text = f"os.fork() returned after {result['fork_seconds']:g} s (fork_timeout {FORK_TIMEOUT:g} s)"
    if holder.get("thread_name"):
        text += f", logging that thread {holder['thread_name']!r} held the lock"
        if holder.get("operation"):
            text += f" in {holder['operation']}()"
    if result["exited_70"]:
        text += "; the child, which would have waited for that lock, exited at once (code 70) naming it"
    elif result["ok"]:
        text += "; the child ran normally"
    _finish(watched, text)
    _means(f"the read here takes {SLOW_READ_SECONDS:g} s; behind a read that never returns, "
           "os.fork() without h5watch would wait forever (h5py before 3.14: returns at once, "
           "and the child hangs forever). With h5watch the fork waits at most fork_timeout, "
           "and the log names the thread in the way.")
    return watched


def _show_stuck_holder(directory: str, args: argparse.Namespace) -> Run:
    bare = _run("stuck_holder", False, directory)
    if not _failed(bare):
        _finish(bare, f"the main thread's h5py call waited {bare.result['main_thread_waited_seconds']:g} s; "
                      "nothing said why")
    watched = _run("stuck_holder", True, directory)
    if _failed(watched):
        return watched
    incident = next((e for e in watched.events if e.get("event") == "lock.hold_timeout"), None)
    holder = (incident or {}).get("holder") or {}
    where = _innermost_frame(holder.get("stack"))
    text = f"the main thread waited {watched.result['main_thread_waited_seconds']:g} s as before"
    if incident is not None:
        text += (f"; after {HOLD_TIMEOUT:g} s (hold_timeout) h5watch logged lock.hold_timeout "
                 f"naming {holder.get('thread_name')!r}")
        if where:
            text += f" at {where}"
        waiting = len(incident.get("waiters") or []) + int(incident.get("waiters_more") or 0)
        text += f", and the {waiting} thread{'s' if waiting != 1 else ''} waiting behind it"
    _finish(watched, text)
    _means(f"the holder here lets go after {STUCK_HOLD_SECONDS:g} s; one that never does stalls the "
           "program forever. h5watch does not end the wait (on_timeout=warn is the default), it says "
           "who holds the lock and where; on_timeout=raise or kill end it.")
    return watched


def _show_gc_under_phil(directory: str, args: argparse.Namespace) -> Run:
    bare = _run("gc_under_phil", False, directory)
    if not _failed(bare):
        _finish(bare, "the reader never finished; nothing said why" if not bare.result["reader_finished"]
                else "the reader finished (the collection found nothing to free this time)")
    watched = _run("gc_under_phil", True, directory)
    if _failed(watched):
        return watched
    deadlock = next((e for e in watched.events if e.get("event") == "lock.deadlock"), None)
    if deadlock is None:
        _finish(watched, "the reader finished" if watched.result["reader_finished"] else "the reader never finished")
        return watched
    _finish(watched, f"h5watch logged lock.deadlock (kind {deadlock.get('kind')}) after "
                     f"{watched.result['waited_seconds']:g} s, with no timeout set: {deadlock.get('summary')}")
    _means("neither thread would ever go on (the demo leaves after "
           f"{HUNG_AFTER_SECONDS:g} s); h5watch names the cycle within two watchdog ticks of it forming, "
           "each thread with its stack. on_deadlock=kill ends such a process at once.")
    return watched


_SHOW = {
    "threads": _show_threads,
    "fork_from_c": _show_fork_from_c,
    "fork_during_slow_read": _show_fork_during_slow_read,
    "stuck_holder": _show_stuck_holder,
    "gc_under_phil": _show_gc_under_phil,
}


# -- the pieces of output ------------------------------------------------------


def lock_cost_table(stats: dict[str, Any]) -> str:
    """Waits and holds of one lock: p50, p99 (interpolated as Prometheus
    does, never above the max) and max, in milliseconds."""
    from h5watch.export.metrics import histogram_quantile

    rows: list[tuple[str, ...]] = [("", "p50 ms", "p99 ms", "max ms")]
    for label, key in (("waits", "wait"), ("holds", "hold")):
        histogram = stats[key]
        max_seconds = histogram["max_ns"] / 1e9
        cells = [label]
        for q in (0.5, 0.99):
            value = histogram_quantile(q, histogram["buckets"], max_seconds)
            cells.append("-" if value is None else f"{value * 1e3:.3f}")
        cells.append(f"{max_seconds * 1e3:.3f}" if histogram["count"] else "-")
        rows.append(tuple(cells))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(widths[0]) if i == 0 else cell.rjust(widths[i])
                               for i, cell in enumerate(row)) for row in rows)


def _frames(stack: str | None) -> list[str]:
    """The ``File ...`` lines of a stack, innermost last, paths cut to their
    last two parts."""
    frames = []
    for line in (stack or "").splitlines():
        line = line.strip()
        if not line.startswith("File "):
            continue
        path, _, rest = line[len('File "'):].partition('", ')
        short = os.sep.join(path.split(os.sep)[-2:])
        frames.append(f"{short}, {rest}")
    return frames


def _innermost_frame(stack: str | None) -> str | None:
    frames = _frames(stack)
    return frames[-1] if frames else None


_EVENT_KEYS = ("event", "level", "workload", "pid", "lock", "timeout", "action")
_THREAD_KEYS = ("thread_name", "operation", "hold_age_seconds", "wait_seconds", "stack")


def _trim_stack(stack: str | None, keep: int = 2) -> list[str]:
    frames = _frames(stack)
    shown = [frame[: WIDTH - 12] for frame in frames[-keep:]]
    if len(frames) > keep:
        shown.insert(0, f"[{len(frames) - keep} outer frames left out]")
    return shown


def _trim_thread(thread: dict[str, Any]) -> dict[str, Any]:
    trimmed = {}
    for key in _THREAD_KEYS:
        if key in thread:
            value = thread[key]
            if value is None:
                continue
            if key == "stack":
                value = _trim_stack(value)
            elif isinstance(value, float):
                value = round(value, 3)
            trimmed[key] = value
    return trimmed


def trimmed_event(event: dict[str, Any]) -> dict[str, Any]:
    """A log event cut to what explains it, for a reader: its identity, the
    holder and the first waiter (name, operation, time, the innermost two
    frames of each stack), the rest left out."""
    trimmed: dict[str, Any] = {key: event[key] for key in _EVENT_KEYS if key in event}
    if isinstance(event.get("holder"), dict):
        trimmed["holder"] = _trim_thread(event["holder"])
    waiters: Sequence[Any] = event.get("waiters") or []
    if waiters:
        trimmed["waiters"] = [_trim_thread(waiters[0])]
        more = len(waiters) - 1 + int(event.get("waiters_more") or 0)
        if more:
            trimmed["waiters_more"] = more
    return trimmed
