"""``h5watch demo``: the seed workload under instrumentation, then F1, F2, F3.

Part 1 runs in this process: h5watch is installed before h5py is imported,
ten threads read their own files while the main thread reads too, and a
per-lock table shows what the wrapper and the probe saw. Part 2 runs each
fork-safety scenario in fresh interpreters, without and with h5watch
(``h5watch.demo.forks``), and ends with a summary table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

from h5watch.errors import UsageError

__all__ = ["add_arguments", "main", "seed_workload", "lock_table"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seconds", type=float, default=4.0, help="how long the seed workload runs (default 4)")
    parser.add_argument("--threads", type=int, default=10, help="reader threads in the seed workload (default 10)")
    parser.add_argument("--skip-forks", action="store_true", help="run only the seed workload, not F1/F2/F3")


def main(args: argparse.Namespace) -> int:
    if not 0 < args.seconds <= 60:
        raise UsageError(f"--seconds: expected a number of seconds from 0 to 60, got {args.seconds}")
    if not 1 <= args.threads <= 64:
        raise UsageError(f"--threads: expected 1 to 64 threads, got {args.threads}")
    if "h5py" in sys.modules:
        raise UsageError("h5py is already imported in this process; run 'h5watch demo' as its own command")
    import h5watch

    h5watch.install(log_format="console", state_files=False)
    with tempfile.TemporaryDirectory(prefix="h5watch-demo-") as directory:
        print(f"h5watch demo: seed workload, {args.threads} reader threads + the main thread, {args.seconds:g} s")
        reads = seed_workload(directory, args.threads, args.seconds)
        snap = h5watch.snapshot()
        print(f"dataset reads: {reads}   coverage: {snap['h5py']['coverage']}   lock implementation: {snap['implementation']}")
        print(lock_table(snap))
        print(probe_line(snap["h5py"]["probe"]))
        if not args.skip_forks:
            print()
            fork_scenarios(directory)
    return 0


def seed_workload(directory: str, threads: int, seconds: float) -> int:
    """Each thread reads its own HDF5 file in a loop; returns the number of reads."""
    import h5py
    import numpy as np

    paths = []
    for index in range(threads + 1):
        path = f"{directory}/seed-{index}.h5"
        with h5py.File(path, "w") as f:
            f["values"] = np.random.default_rng(index).random((200, 200))
            f.attrs["x"] = index
        paths.append(path)
    deadline = time.monotonic() + seconds
    counts = [0] * (threads + 1)

    def read_loop(slot: int) -> None:
        while time.monotonic() < deadline:
            with h5py.File(paths[slot], "r") as f:
                f["values"][:]
                f.attrs["x"]
            counts[slot] += 1

    workers = [threading.Thread(target=read_loop, args=(i,), name=f"reader-{i}") for i in range(threads)]
    for worker in workers:
        worker.start()
    read_loop(threads)
    for worker in workers:
        worker.join()
    return sum(counts)


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds == float("inf"):
        return ">60s"
    return f"{seconds * 1e3:.3f}"


def lock_table(snap: dict[str, Any]) -> str:
    from h5watch.process.stats import quantile_seconds

    header = ("lock", "acquisitions", "contention%", "wait p50 ms", "p99", "max", "hold p50 ms", "p99", "max")
    rows = [header]
    for name, lock in snap["locks"].items():
        stats = lock["stats"]
        acquisitions = stats["acquisitions"]
        contention = 100.0 * stats["contentions"] / acquisitions if acquisitions else 0.0
        wait, hold = stats["wait"], stats["hold"]
        rows.append((
            name,
            str(acquisitions),
            f"{contention:.1f}",
            _ms(quantile_seconds(wait["buckets"], 0.5)),
            _ms(quantile_seconds(wait["buckets"], 0.99)),
            _ms(wait["max_ns"] / 1e9 if wait["count"] else None),
            _ms(quantile_seconds(hold["buckets"], 0.5)),
            _ms(quantile_seconds(hold["buckets"], 0.99)),
            _ms(hold["max_ns"] / 1e9 if hold["count"] else None),
        ))
    return format_table(rows)


def probe_line(probe: dict[str, Any]) -> str:
    if not probe.get("enabled"):
        return f"probe: off ({probe.get('reason')})"
    return (
        f"probe: on (FastRLock layout verified); now owner={probe['owner_ident']} "
        f"depth={probe['count']} blocked waiters={probe['pending_requests']}"
    )


def format_table(rows: Sequence[tuple[str, ...]], numeric: bool = True) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for number, row in enumerate(rows):
        lines.append("  ".join(
            cell.rjust(widths[i]) if numeric and i > 0 else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ).rstrip())
        if number == 0:
            lines.append("  ".join("-" * width for width in widths))
    return "\n".join(lines)


def fork_scenarios(directory: str) -> None:
    from h5watch.demo.forks import SCENARIOS, run_scenario

    summary = [("scenario", "without h5watch", "with h5watch")]
    for name, title in SCENARIOS.items():
        print(f"{name}: {title} ...", flush=True)
        bare, _ = run_scenario(name, False, directory)
        watched, events = run_scenario(name, True, directory)
        without, with_ = _describe(name, bare, watched, events)
        summary.append((name, without, with_))
    print()
    print(format_table(summary, numeric=False))


def _first(events: list[dict[str, Any]], name: str) -> dict[str, Any] | None:
    return next((event for event in events if event.get("event") == name), None)


def _describe(name: str, bare: dict[str, Any], watched: dict[str, Any], events: list[dict[str, Any]]) -> tuple[str, str]:
    if "error" in bare or "error" in watched:
        return bare.get("error", "ok"), watched.get("error", "ok")
    if name == "F1":
        without = f"{bare['hung']}/{bare['children']} children hung"
        with_ = (
            f"{watched['hung']} hung, {watched['killed_by_h5watch']} killed (exit 70) with evidence, "
            f"{watched['ok']} ran"
        )
        orphan = _first(events, "lock.orphaned")
        if orphan is not None:
            holder = orphan.get("holder") or {}
            with_ += f"; dead holder: thread {holder.get('thread_name')!r} (seen by {orphan.get('seen_by')})"
        if watched["hung"]:
            with_ += (
                "; the hung ones stopped inside CPython's GIL hand-over, which a C-level fork can copy"
                " mid-flight, before any Python code ran (bare or not)"
            )
        return without, with_
    if name == "F2":
        without = f"fork waited {bare['fork_seconds']} s, nobody said why"
        stall = _first(events, "fork.lock_timeout")
        holder = (stall or {}).get("holder") or {}
        stack = holder.get("stack") or ""
        where = "slow_readinto" if "slow_readinto" in stack else "?"
        with_ = (
            f"fork returned after {watched['fork_seconds']} s (fork_timeout 1 s); "
            f"fork.lock_timeout names {holder.get('thread_name')!r} in {where}()"
        )
        if watched.get("killed_by_h5watch"):
            with_ += "; the child, which would have waited on that lock, exited 70 with evidence"
        return without, with_
    without = f"main thread waited {bare['main_thread_waited_seconds']} s, silently"
    incident = _first(events, "lock.hold_timeout")
    holder = (incident or {}).get("holder") or {}
    stack_lines = [line.strip() for line in (holder.get("stack") or "").splitlines() if line.strip().startswith("File")]
    where = stack_lines[-1] if stack_lines else "?"
    with_ = f"lock.hold_timeout: {holder.get('thread_name')!r} held phil > 0.5 s at {where}"
    return without, with_
