"""``h5watch top``: every instrumented process's locks, refreshed in place.

Each refresh reads the state dir as ``h5watch status`` does
(:func:`h5watch.host.status.collect_status`, with the histograms) and shows,
per process and lock: the holder (thread, hold age), the waiters (the
recorded ones by name, then ``+N more``), acquisitions per second, the
contended share of them, wait and hold quantiles, and the lock's top
operations by hold time (:func:`operations_text`). Rates, shares and
quantiles are of the counters' difference between two refreshes; the first
refresh's are since each process started. Quantiles are read from the
histogram buckets as Prometheus's ``histogram_quantile`` does, never above
the largest value recorded (a wait is counted only when it was contended).

On a terminal the view is drawn with rich and redraws in place; keys sort
it and ``q`` quits (the terminal is restored however it ends, Ctrl-C
included, with exit code 0). When stdout is not a terminal, or with
``--plain``, it prints a plain table of at most 99 columns at each refresh;
``--once`` prints one and exits. Neither needs rich.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import textwrap
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any, TextIO

from h5watch.errors import UsageError
from h5watch.host.status import _age, _why, collect_status, daemon_thresholds
from h5watch.host.verdict import Thresholds, parse_seconds
from h5watch.options import resolve, unknown_variable_text, unknown_variables
from h5watch.schema import N_BUCKETS

__all__ = ["SORTS", "Frame", "LockView", "ProcessView", "Sampler", "add_arguments", "main", "operations_text",
           "render_plain", "sort_processes"]

# Key -> sort name, in the order the help and the screen list them.
SORTS = {"w": "waiting", "h": "hold", "a": "rate", "p": "pid"}
_SORT_HELP = {"waiting": "waiters, then the oldest wait", "hold": "the current hold's age, then hold time",
              "rate": "acquisitions per second", "pid": "process id"}
KEYS_HELP = ("keys: " + ", ".join(f"{key} sorts by {_SORT_HELP[name]}" for key, name in SORTS.items())
             + "; q quits (Ctrl-C too)")
PLAIN_WIDTH = 99
RICH_INSTALL = "pip install 'h5watch[top]'"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        f"{KEYS_HELP}. Rates, contention and quantiles are of the interval between two refreshes (the first: since "
        "each process started). Without a terminal (or with --plain) a plain table is printed at each refresh. "
        "Exit status: 0; 2 for bad input, such as a state dir that does not exist (one line on stderr)."
    )
    parser.add_argument("--state-dir", help=(
        "the shared state directory (default: as H5WATCH_STATE_DIR, else /run/h5watch if it exists, else "
        "$XDG_RUNTIME_DIR/h5watch); root reads every user's subdirectory, others their own"
    ))
    parser.add_argument("--interval", default="1", metavar="SECONDS", help="seconds between refreshes (default: 1)")
    parser.add_argument("--once", action="store_true", help="print one plain table (rates since each process started) and exit")
    parser.add_argument("--plain", action="store_true", help="a plain table at each refresh, even on a terminal")
    parser.add_argument("--sort", choices=list(SORTS.values()), default="waiting",
                        help="the first sort (default: waiting); keys change it: " + ", ".join(
                            f"{key} {name}" for key, name in SORTS.items()))
    parser.add_argument("--stuck-after", default=None, metavar="SECONDS", help=(
        "a heartbeat, wait or hold older than this is STUCK, as for status (default: the running daemon's, else 30)"
    ))


# -- the data of one refresh ---------------------------------------------------


@dataclass(frozen=True)
class Counts:
    """One lock's counters: totals as read, or the difference of two reads."""

    acquisitions: int = 0
    contentions: int = 0
    wait_buckets: tuple[int, ...] = (0,) * N_BUCKETS
    wait_sum: float = 0.0
    hold_buckets: tuple[int, ...] = (0,) * N_BUCKETS
    hold_sum: float = 0.0

    @classmethod
    def of(cls, lock: dict[str, Any]) -> Counts:
        wait, hold = lock.get("wait") or {}, lock.get("hold") or {}
        return cls(int(lock["acquisitions"]), int(lock["contentions"]),
                   tuple(wait.get("buckets") or (0,) * N_BUCKETS), float(wait.get("sum_seconds") or 0.0),
                   tuple(hold.get("buckets") or (0,) * N_BUCKETS), float(hold.get("sum_seconds") or 0.0))

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.acquisitions + other.acquisitions, self.contentions + other.contentions,
                      tuple(a + b for a, b in zip(self.wait_buckets, other.wait_buckets)), self.wait_sum + other.wait_sum,
                      tuple(a + b for a, b in zip(self.hold_buckets, other.hold_buckets)), self.hold_sum + other.hold_sum)

    def since(self, earlier: Counts) -> Counts | None:
        """What was counted after ``earlier``; None when a counter went down
        (not the same counters: read from the start instead)."""
        out = Counts(self.acquisitions - earlier.acquisitions, self.contentions - earlier.contentions,
                     tuple(a - b for a, b in zip(self.wait_buckets, earlier.wait_buckets)), self.wait_sum - earlier.wait_sum,
                     tuple(a - b for a, b in zip(self.hold_buckets, earlier.hold_buckets)), self.hold_sum - earlier.hold_sum)
        words = (out.acquisitions, out.contentions, *out.wait_buckets, *out.hold_buckets)
        return None if min(words) < 0 or out.wait_sum < -1e-9 or out.hold_sum < -1e-9 else out


@dataclass
class LockView:
    """One lock of one process as shown (the records of one name merged)."""

    name: str
    holder: dict[str, Any] | None
    orphaned: bool
    waiters: int
    waiter_names: list[str]
    waiters_unrecorded: int
    oldest_wait: float
    stuck: bool
    total: Counts
    wait_max: float
    hold_max: float
    operations: list[dict[str, Any]] | None
    # Over the interval (the first refresh: since the process started).
    seconds: float | None = None
    counted: Counts = field(default_factory=Counts)

    @property
    def rate(self) -> float | None:
        """Acquisitions per second."""
        return None if not self.seconds else self.counted.acquisitions / self.seconds

    @property
    def contention(self) -> float | None:
        """The share (0 to 1) of acquisitions that had to wait; None without acquisitions."""
        if not self.counted.acquisitions:
            return None
        return min(1.0, self.counted.contentions / self.counted.acquisitions)

    def quantile(self, kind: str, q: float) -> float | None:
        from h5watch.export.metrics import histogram_quantile

        buckets, top = (self.counted.wait_buckets, self.wait_max) if kind == "wait" else (self.counted.hold_buckets, self.hold_max)
        return histogram_quantile(q, buckets, top)

    @property
    def hold_age(self) -> float:
        age = None if self.holder is None else self.holder.get("hold_age_seconds")
        return -1.0 if age is None else float(age)


@dataclass
class ProcessView:
    pid: int
    workload: str
    state: str  # ok, stuck, stopped
    why: str
    heartbeat_age: float
    locks: list[LockView]


@dataclass
class Frame:
    """One refresh: what status collected, with the interval's numbers."""

    state_dir: str
    time_unix: float
    processes: list[ProcessView]
    skipped: list[dict[str, Any]]
    interval: float | None  # seconds since the previous refresh; None on the first


def _merge(locks: list[dict[str, Any]]) -> list[LockView]:
    """A process's records, one view per lock name (a live instance and the
    name's retired record together: their sum only grows)."""
    by_name: dict[str, LockView] = {}
    for lock in locks:
        counts = Counts.of(lock)
        names = [w["thread_name"] or str(w["native_id"]) for w in lock["waiting_threads"]]
        wait_max = float((lock.get("wait") or {}).get("max_seconds") or 0.0)
        hold_max = float((lock.get("hold") or {}).get("max_seconds") or 0.0)
        operations = lock.get("operations")
        view = by_name.get(lock["lock"])
        if view is None:
            by_name[lock["lock"]] = LockView(
                name=lock["lock"], holder=lock["holder"], orphaned=bool(lock["orphaned"]), waiters=int(lock["waiters"]),
                waiter_names=names, waiters_unrecorded=int(lock["waiters_unrecorded"]),
                oldest_wait=float(lock["oldest_wait_seconds"] or 0.0), stuck=bool(lock.get("stuck")), total=counts,
                wait_max=wait_max, hold_max=hold_max, operations=None if operations is None else list(operations))
            continue
        view.holder = view.holder or lock["holder"]
        view.orphaned = view.orphaned or bool(lock["orphaned"])
        view.waiters += int(lock["waiters"])
        view.waiter_names += names
        view.waiters_unrecorded += int(lock["waiters_unrecorded"])
        view.oldest_wait = max(view.oldest_wait, float(lock["oldest_wait_seconds"] or 0.0))
        view.stuck = view.stuck or bool(lock.get("stuck"))
        view.total = view.total + counts
        view.wait_max, view.hold_max = max(view.wait_max, wait_max), max(view.hold_max, hold_max)
        if operations is not None:
            view.operations = [*(view.operations or []), *operations]
    return list(by_name.values())


class Sampler:
    """Turns each status report into a :class:`Frame`, remembering each
    lock's counters (by state file and lock name) for the next one."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[float, Counts]] = {}
        self._last_time: float | None = None

    def frame(self, report: dict[str, Any]) -> Frame:
        now = float(report["time_unix"])
        seen: dict[tuple[str, str], tuple[float, Counts]] = {}
        processes = []
        for process in report["processes"]:
            locks = _merge(process["locks"])
            started = process.get("started_unix")
            for lock in locks:
                key = (process["path"], lock.name)
                seen[key] = (now, lock.total)
                earlier = self._last.get(key)
                counted = None if earlier is None else lock.total.since(earlier[1])
                if earlier is not None and counted is not None:
                    lock.seconds, lock.counted = now - earlier[0], counted
                else:  # new, or not the same counters: since the process started
                    lock.seconds = None if not started else max(0.0, now - float(started))
                    lock.counted = lock.total
            processes.append(ProcessView(
                pid=int(process["pid"]), workload=process["workload"], state=process["state"],
                why=_why(process).strip(), heartbeat_age=float(process["heartbeat_age_seconds"]), locks=locks))
        interval = None if self._last_time is None else now - self._last_time
        self._last, self._last_time = seen, now
        return Frame(state_dir=report["state_dir"], time_unix=now, processes=processes, skipped=report["skipped"],
                     interval=interval)


def _lock_key(sort: str, lock: LockView) -> tuple[float, ...]:
    """Larger first."""
    if sort == "waiting":
        return (lock.waiters, lock.oldest_wait)
    if sort == "hold":
        return (lock.hold_age, lock.counted.hold_sum / lock.seconds if lock.seconds else 0.0)
    return (-1.0 if lock.rate is None else lock.rate,)


def sort_processes(processes: Sequence[ProcessView], sort: str) -> list[ProcessView]:
    """Processes by their first lock's key, each one's locks by theirs;
    ``pid``: by pid, locks by name."""
    if sort == "pid":
        return [replace(p, locks=sorted(p.locks, key=lambda lock: lock.name)) for p in sorted(processes, key=lambda p: p.pid)]
    out = []
    for process in processes:
        locks = sorted(process.locks, key=lambda lock: (tuple(-v for v in _lock_key(sort, lock)), lock.name))
        out.append(replace(process, locks=locks))
    return sorted(out, key=lambda p: (tuple(-v for v in _lock_key(sort, p.locks[0])) if p.locks else (), p.pid))


# -- text of the cells -----------------------------------------------------------


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1e-3:
        return f"{value * 1e6:.0f}us"
    if value < 1:
        return f"{value * 1e3:.1f}ms" if value < 0.01 else f"{value * 1e3:.0f}ms"
    return _age(value)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 100:
        return f"{value:.1f}"
    return f"{value:.0f}" if value < 1e6 else f"{value / 1e6:.1f}M"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _holder_text(lock: LockView) -> str | None:
    """``crowd-holder for 12.3s``; None when the lock is free."""
    holder = lock.holder
    if holder is None:
        return None
    who = holder["thread_name"] or f"thread {holder['thread_ident']}"
    dead = " (dead: orphaned by a fork)" if lock.orphaned else ""
    return f"{who}{dead} for {_age(holder['hold_age_seconds'])}"


def _waiters_text(lock: LockView) -> str | None:
    """``6 waiting: waiter-0, ..., +2 more; oldest 3.1s``: every recorded
    waiter by name, the rest counted; None when nobody waits."""
    if not lock.waiters:
        return None
    names = ", ".join(lock.waiter_names)
    if lock.waiters_unrecorded:
        names += f", +{lock.waiters_unrecorded} more"
    return f"{lock.waiters} waiting: {names}; oldest {_age(lock.oldest_wait)}"


def operations_text(lock: LockView, limit: int = 3) -> str | None:
    """The lock's top operations by hold time, when its data has an
    ``operations`` list (items: ``operation``, ``holds``,
    ``hold_seconds``, ``hold_max_seconds``, ``caused_wait_seconds``,
    ``waits``, ``wait_seconds``, as ``h5watch status --json`` has them); without one, the holder's current operation;
    None when there is neither. The one place that reads operations."""
    if lock.operations:
        totals: dict[str, dict[str, float]] = {}
        for item in lock.operations:
            into = totals.setdefault(str(item.get("operation") or "?"), {"holds": 0, "sum": 0.0, "max": 0.0})
            into["holds"] += int(item.get("holds") or 0)
            into["sum"] += float(item.get("hold_seconds") or 0.0)
            into["max"] = max(into["max"], float(item.get("hold_max_seconds") or 0.0))
        top = sorted(totals.items(), key=lambda kv: -kv[1]["sum"])
        shown = ", ".join(f"{name} {_seconds(t['sum'])} ({int(t['holds'])} holds, max {_seconds(t['max'])})"
                          for name, t in top[:limit])
        more = f", +{len(top) - limit} more" if len(top) > limit else ""
        return f"top by hold time: {shown}{more}"
    operation = None if lock.holder is None else lock.holder.get("operation")
    return f"now in {operation}" if operation else None


def _headline(frame: Frame, sort: str) -> str:
    stuck = sum(p.state == "stuck" for p in frame.processes)
    stopped = sum(p.state == "stopped" for p in frame.processes)
    counts = f"{len(frame.processes)} live processes, {stuck} stuck" + (f", {stopped} stopped" if stopped else "")
    over = "since each process started" if frame.interval is None else f"over {frame.interval:.1f}s"
    return f"h5watch top: {counts}; rates {over}; sort: {sort}"


_STATE = {"stuck": "STUCK", "stopped": "STOP"}
# The columns after LOCK: (title, width), each right-aligned.
_NUMBERS = (("ACQ/S", 7), ("CONT%", 7), ("WAIT p50", 9), ("p99", 7), ("HOLD p50", 9), ("p99", 7))
_FIXED = 2 + 7 + 1 + 1 + 5 + 1 + sum(w for _, w in _NUMBERS)  # mark, PID, spaces, STATE, the numbers


def _columns(width: int, processes: Sequence[ProcessView]) -> tuple[int, int]:
    """(WORKLOAD, LOCK) widths for lines of at most ``width`` columns: as
    wide as the longest name (at least 8 and 10) where that fits, else
    narrower (down to 6 and 10)."""
    room = width - _FIXED
    workload = max([8, *(len(p.workload) + 1 for p in processes)])
    lock = max([10, *(len(lock.name) + 1 for p in processes for lock in p.locks)])
    if workload + lock <= room:
        return workload, lock
    workload = max(6, min(workload, room // 3))
    return workload, max(10, room - workload)


def _lines(frame: Frame, sort: str, width: int) -> list[tuple[str, str]]:
    """The table as (line, kind) pairs, kind one of head, columns, stuck,
    stopped, row, detail; every line at most ``width`` columns."""
    workload_width, lock_width = _columns(width, frame.processes)
    lines = [(_headline(frame, sort), "head"), (f"state dir: {frame.state_dir}", "detail")]
    if not frame.processes:
        lines.append(("no live instrumented processes", "row"))
    else:
        lines.append(("", "row"))
        lines.append((f"  {'PID':>7} {'WORKLOAD'[:workload_width]:<{workload_width}} {'STATE':<5} {'LOCK':<{lock_width}}"
                      + "".join(f"{title:>{w}}" for title, w in _NUMBERS), "columns"))
        indent = " " * (2 + 7 + 1 + workload_width + 1 + 5 + 1)
        for process in sort_processes(frame.processes, sort):
            kind = process.state if process.state in ("stuck", "stopped") else "row"
            mark = "!" if process.state == "stuck" else " "
            workload = process.workload if len(process.workload) <= workload_width else process.workload[: workload_width - 1] + "~"
            prefix = (f"{mark} {process.pid:>7} {workload:<{workload_width}} "
                      f"{_STATE.get(process.state, 'ok'):<5} ")
            if process.why:
                lines.append((prefix + process.why, kind))
                prefix = indent
            if not process.locks:
                lines.append((prefix + "no watched locks yet", kind))
            for lock in process.locks:
                numbers = (_rate(lock.rate), _percent(lock.contention), _seconds(lock.quantile("wait", 0.5)),
                           _seconds(lock.quantile("wait", 0.99)), _seconds(lock.quantile("hold", 0.5)),
                           _seconds(lock.quantile("hold", 0.99)))
                name = lock.name if len(lock.name) <= lock_width else lock.name[: lock_width - 1] + "~"
                lines.append((prefix + f"{name:<{lock_width}}" + "".join(f"{v:>{w}}" for v, (_, w) in zip(numbers, _NUMBERS)),
                              kind))
                prefix = indent
                holder = _holder_text(lock)
                details = [f"held by {holder}" + (" STUCK" if lock.stuck else "") if holder else None,
                           _waiters_text(lock), operations_text(lock)]
                for text in details:
                    if text:
                        lines.extend((line, "stuck" if lock.stuck else "detail") for line in textwrap.wrap(
                            text, width, initial_indent=indent + "  ", subsequent_indent=indent + "    ",
                            break_on_hyphens=False))
    lines.extend((f"skipped {skipped['path']}: {skipped['error']}", "detail") for skipped in frame.skipped)
    return [(line[:width].rstrip(), kind) for line, kind in lines]


def render_plain(frame: Frame, sort: str, width: int = PLAIN_WIDTH) -> str:
    """The table without a terminal: every line at most ``width`` columns."""
    return "".join(line + "\n" for line, _ in _lines(frame, sort, width))


_STYLES = {"head": "bold", "columns": "bold reverse", "stuck": "bold red", "stopped": "yellow", "detail": "", "row": ""}


def render_rich(frame: Frame, sort: str, width: int, height: int) -> Any:
    """The terminal view, ``width`` x ``height``: the plain table's lines,
    styled, with the keys under the headline (rich is imported here only)."""
    from rich.console import Group
    from rich.text import Text

    lines = _lines(frame, sort, width)
    keys = ("keys: " + "  ".join(f"{key} {name}" for key, name in SORTS.items()) + "  q quit")[:width]
    lines.insert(1, (keys, "keys"))
    if len(lines) > height:
        hidden = len(lines) - height + 1
        lines = [*lines[: height - 1], (f"... {hidden} more lines (a taller terminal shows them)"[:width], "detail")]
    styles = {**_STYLES, "keys": "cyan"}
    return Group(*(Text(line, style=styles[kind], no_wrap=True, overflow="crop") for line, kind in lines))


# -- running ---------------------------------------------------------------------


class _Stop(KeyboardInterrupt):
    """SIGTERM or SIGHUP: end as Ctrl-C does."""


def _stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Keys:
    """Single key presses from a terminal on stdin, read without waiting
    for Enter and without echo (cbreak), as the refresh loop allows; the
    terminal's settings are restored on exit. Off a terminal: no keys."""

    def __init__(self, stream: TextIO) -> None:
        self._fd = stream.fileno() if stream.isatty() else None
        self._saved: list[Any] | None = None

    def __enter__(self) -> _Keys:
        if self._fd is not None:
            import termios
            import tty

            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd, termios.TCSANOW)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None and self._saved is not None:
            import termios

            termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)

    def read(self, timeout: float) -> str:
        """What was typed within ``timeout`` seconds ("" if nothing)."""
        if self._fd is None:
            time.sleep(max(0.0, timeout))
            return ""
        ready, _, _ = select.select([self._fd], [], [], max(0.0, timeout))
        return os.read(self._fd, 64).decode("utf-8", "replace") if ready else ""


def _live(collect: Any, interval: float, sort: str, first: dict[str, Any]) -> int:
    from rich.console import Console
    from rich.live import Live

    sampler = Sampler()
    frame = sampler.frame(first)
    console = Console()

    def draw() -> None:
        size = console.size  # the terminal's, as it is now
        live.update(render_rich(frame, sort, size.width, size.height), refresh=True)

    with _Keys(sys.stdin) as keys, Live(console=console, screen=True, auto_refresh=False, transient=True,
                                          redirect_stdout=False, redirect_stderr=False) as live:
        next_at = time.monotonic() + interval
        draw()
        while True:
            # What an escape sequence (an arrow key) spells is no key.
            typed = keys.read(next_at - time.monotonic()).split("\x1b", 1)[0]
            for key in typed.lower():
                if key == "q":
                    return 0
                sort = SORTS.get(key, sort)
            if time.monotonic() >= next_at:
                next_at = max(next_at + interval, time.monotonic())
                frame = sampler.frame(collect())
            draw()


def _plain(collect: Any, interval: float, sort: str, first: dict[str, Any], once: bool) -> int:
    sampler = Sampler()
    report = first
    next_at = time.monotonic() + interval
    try:
        while True:
            sys.stdout.write(render_plain(sampler.frame(report), sort))
            sys.stdout.flush()
            if once:
                return 0
            time.sleep(max(0.0, next_at - time.monotonic()))
            next_at = max(next_at + interval, time.monotonic())
            report = collect()
            sys.stdout.write("\n")
    except BrokenPipeError:  # | head: the reader has all it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 0


def main(args: argparse.Namespace) -> int:
    interval = parse_seconds("--interval", args.interval)
    thresholds = Thresholds.parse(args.stuck_after, None)
    options = resolve({"state_dir": args.state_dir} if args.state_dir else {})
    for variable, closest in unknown_variables():
        sys.stderr.write(f"h5watch top: warning: {unknown_variable_text(variable, closest)}\n")
    if args.stuck_after is None:
        found = daemon_thresholds(options.state_dir)
        if found is not None:
            thresholds = found[0]

    def collect() -> dict[str, Any]:
        return collect_status(options.state_dir, thresholds, histograms=True)

    first = collect()  # a state dir that does not exist: one line, exit 2
    plain = args.once or args.plain or not sys.stdout.isatty()
    if not plain:
        try:
            import rich  # noqa: F401
        except ImportError:
            raise UsageError(f"the live view needs rich: {RICH_INSTALL} (or use --plain or --once)") from None
    try:
        with _stop_on_signals():
            if plain:
                return _plain(collect, interval, args.sort, first, args.once)
            return _live(collect, interval, args.sort, first)
    except KeyboardInterrupt:
        return 0
