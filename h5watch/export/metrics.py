"""Prometheus export: one aggregate model and one collector, for both sides.

Both exporters (this process's, from ``h5watch.snapshot()``; the daemon's,
from every state file) fill an :class:`Aggregate` keyed by ``workload`` and
``lock``, and :class:`AggregateCollector` turns the latest one into metric
families. ``collect()`` only reads an aggregate that is never modified after
it is published, so concurrent scrapes need no lock.
:func:`histogram_quantile` reads a quantile from those buckets as Prometheus
does, for h5watch's own displays (``h5watch demo``).

Names follow Prometheus's conventions: base units, ``_total`` counters,
classic histograms with h5watch's own log-scale buckets; the ``service``
option is exported as the ``workload`` label.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from h5watch import __version__
from h5watch.records import running_versions as build_versions
from h5watch.schema import BUCKET_BOUNDS_SECONDS, DEADLOCK_KINDS, N_BUCKETS, ORPHAN_ACTIONS, TIMEOUT_KINDS

__all__ = ["Aggregate", "AggregateCollector", "ForkTotals", "LockGauges", "LockTotals", "OperationTotals", "build_versions",
           "histogram_quantile",
           "installed_versions", "metrics_registry"]

def histogram_quantile(
    q: float, buckets: Sequence[int], max_seconds: float, bounds: Sequence[float] = BUCKET_BOUNDS_SECONDS
) -> float | None:
    """The ``q`` quantile (0 < q <= 1) of a histogram of h5watch's buckets, in
    seconds, as Prometheus's ``histogram_quantile`` computes it, then never
    above ``max_seconds``, the largest value observed. None when it is empty.

    ``buckets`` are per-bucket counts (not cumulative), one per bound in
    ``bounds`` and a last one for +Inf. As Prometheus does: find the bucket
    holding rank ``q * count``, interpolate linearly between its lower bound
    (the previous bucket's bound, 0 for the first) and its upper bound; a rank
    in the +Inf bucket gives the largest finite bound.
    """
    if not 0 < q <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {q}")
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(buckets):
        if count and below + count >= rank:
            if index >= len(bounds):
                value = bounds[-1]
            else:
                lower = bounds[index - 1] if index else 0.0
                value = lower + (bounds[index] - lower) * ((rank - below) / count)  # Prometheus's order
            return min(value, max_seconds)
        below += count
    return min(bounds[-1], max_seconds)  # not reached: the last bucket with a count holds rank <= total


_LE = [floatToGoString(bound) for bound in BUCKET_BOUNDS_SECONDS] + ["+Inf"]  # type: ignore[no-untyped-call]  # untyped in prometheus_client


@dataclass
class LockTotals:
    """Counters and histograms of one (workload, lock), summed over processes."""

    acquisitions: int = 0
    contentions: int = 0
    reentries: int = 0
    wait_buckets: np.ndarray = field(default_factory=lambda: np.zeros(N_BUCKETS, dtype=np.uint64))
    wait_sum_ns: int = 0
    hold_buckets: np.ndarray = field(default_factory=lambda: np.zeros(N_BUCKETS, dtype=np.uint64))
    hold_sum_ns: int = 0
    timeouts: np.ndarray = field(default_factory=lambda: np.zeros(len(TIMEOUT_KINDS), dtype=np.uint64))
    orphans: np.ndarray = field(default_factory=lambda: np.zeros(len(ORPHAN_ACTIONS), dtype=np.uint64))

    def add(self, other: LockTotals) -> None:
        self.acquisitions += other.acquisitions
        self.contentions += other.contentions
        self.reentries += other.reentries
        self.wait_buckets = self.wait_buckets + other.wait_buckets
        self.wait_sum_ns += other.wait_sum_ns
        self.hold_buckets = self.hold_buckets + other.hold_buckets
        self.hold_sum_ns += other.hold_sum_ns
        self.timeouts = self.timeouts + other.timeouts
        self.orphans = self.orphans + other.orphans

    def to_json(self) -> dict[str, Any]:
        return {
            "acquisitions": self.acquisitions, "contentions": self.contentions, "reentries": self.reentries,
            "wait_buckets": [int(v) for v in self.wait_buckets], "wait_sum_ns": self.wait_sum_ns,
            "hold_buckets": [int(v) for v in self.hold_buckets], "hold_sum_ns": self.hold_sum_ns,
            "timeouts": [int(v) for v in self.timeouts], "orphans": [int(v) for v in self.orphans],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LockTotals:
        totals = cls(
            acquisitions=int(data["acquisitions"]), contentions=int(data["contentions"]), reentries=int(data["reentries"]),
            wait_buckets=np.array(data["wait_buckets"], dtype=np.uint64), wait_sum_ns=int(data["wait_sum_ns"]),
            hold_buckets=np.array(data["hold_buckets"], dtype=np.uint64), hold_sum_ns=int(data["hold_sum_ns"]),
            timeouts=np.array(data["timeouts"], dtype=np.uint64), orphans=np.array(data["orphans"], dtype=np.uint64),
        )
        if totals.wait_buckets.shape != (N_BUCKETS,) or totals.hold_buckets.shape != (N_BUCKETS,):
            raise ValueError("bucket count differs from this version's")
        if totals.timeouts.shape != (len(TIMEOUT_KINDS),) or totals.orphans.shape != (len(ORPHAN_ACTIONS),):
            raise ValueError("timeout or orphan table differs from this version's")
        return totals


@dataclass
class ForkTotals:
    """A workload's counters that belong to its processes rather than to a
    lock: forks and their waits, deadlocks by kind (``DEADLOCK_KINDS``
    order), lock-order inversions."""

    forks: int = 0
    wait_buckets: np.ndarray = field(default_factory=lambda: np.zeros(N_BUCKETS, dtype=np.uint64))
    wait_sum_ns: int = 0
    deadlocks: np.ndarray = field(default_factory=lambda: np.zeros(len(DEADLOCK_KINDS), dtype=np.uint64))
    order_inversions: int = 0

    def add(self, other: ForkTotals) -> None:
        self.forks += other.forks
        self.wait_buckets = self.wait_buckets + other.wait_buckets
        self.wait_sum_ns += other.wait_sum_ns
        self.deadlocks = self.deadlocks + other.deadlocks
        self.order_inversions += other.order_inversions

    def to_json(self) -> dict[str, Any]:
        return {"forks": self.forks, "wait_buckets": [int(v) for v in self.wait_buckets], "wait_sum_ns": self.wait_sum_ns,
                "deadlocks": [int(v) for v in self.deadlocks], "order_inversions": self.order_inversions}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ForkTotals:
        # Totals saved before deadlocks were counted have none.
        totals = cls(int(data["forks"]), np.array(data["wait_buckets"], dtype=np.uint64), int(data["wait_sum_ns"]),
                     np.array(data.get("deadlocks", [0] * len(DEADLOCK_KINDS)), dtype=np.uint64),
                     int(data.get("order_inversions", 0)))
        if totals.wait_buckets.shape != (N_BUCKETS,):
            raise ValueError("bucket count differs from this version's")
        if totals.deadlocks.shape != (len(DEADLOCK_KINDS),):
            raise ValueError("deadlock kinds differ from this version's")
        return totals


@dataclass
class OperationTotals:
    """Contention by operation for one (workload, lock, operation), summed
    over processes: holds and their time, the waits of other threads during
    them, and the operation's own blocked waits (times in ns)."""

    holds: int = 0
    hold_sum_ns: int = 0
    caused_wait_sum_ns: int = 0
    waits: int = 0
    wait_sum_ns: int = 0

    def add(self, other: OperationTotals) -> None:
        self.holds += other.holds
        self.hold_sum_ns += other.hold_sum_ns
        self.caused_wait_sum_ns += other.caused_wait_sum_ns
        self.waits += other.waits
        self.wait_sum_ns += other.wait_sum_ns

    def to_json(self) -> list[int]:
        return [self.holds, self.hold_sum_ns, self.caused_wait_sum_ns, self.waits, self.wait_sum_ns]

    @classmethod
    def from_json(cls, data: list[int]) -> OperationTotals:
        holds, hold_sum_ns, caused_wait_sum_ns, waits, wait_sum_ns = (int(v) for v in data)
        return cls(holds, hold_sum_ns, caused_wait_sum_ns, waits, wait_sum_ns)


@dataclass
class LockGauges:
    held: int = 0
    hold_age_seconds: float = 0.0
    waiters: int = 0
    oldest_wait_seconds: float = 0.0

    def add(self, held: bool, hold_age: float, waiters: int, oldest_wait: float) -> None:
        self.held += int(held)
        self.hold_age_seconds = max(self.hold_age_seconds, hold_age)
        self.waiters += waiters
        self.oldest_wait_seconds = max(self.oldest_wait_seconds, oldest_wait)


@dataclass
class Aggregate:
    """Everything one scrape shows. Built by one thread, then only read."""

    locks: dict[tuple[str, str], LockTotals] = field(default_factory=dict)
    gauges: dict[tuple[str, str], LockGauges] = field(default_factory=dict)
    forks: dict[str, ForkTotals] = field(default_factory=dict)
    processes: dict[tuple[str, str], int] | None = None
    heartbeat_age: dict[str, float] | None = None
    kills: dict[tuple[str, str], int] | None = None
    # What --dry-run would have killed: never counted as kills.
    would_kills: dict[tuple[str, str], int] | None = None
    scan_seconds: float | None = None
    scan_success: bool | None = None
    state_file_errors: dict[str, int] | None = None
    totals_save_failures: int | None = None
    locks_unrecorded: dict[str, int] | None = None
    # (workload, h5py, HDF5, h5watch, Python versions) among live processes.
    workload_info: set[tuple[str, str, str, str, str]] | None = None
    # Threads in a deadlock now, per workload (live processes).
    threads_in_deadlock: dict[str, int] = field(default_factory=dict)
    # Contention by operation, per (workload, lock, operation).
    operations: dict[tuple[str, str, str], OperationTotals] = field(default_factory=dict)


def _histogram(name: str, documentation: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, labels=labels)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], buckets: np.ndarray, sum_ns: int) -> None:
    cumulative = np.cumsum(buckets.astype(np.uint64))
    family.add_metric(labels, [(le, float(count)) for le, count in zip(_LE, cumulative)], sum_value=sum_ns / 1e9)


class AggregateCollector:
    """A prometheus_client collector over whatever ``source()`` returns now."""

    def __init__(self, source: Callable[[], Aggregate | None], versions: Callable[[], dict[str, str]] = build_versions) -> None:
        self.source = source
        self.versions = versions

    def describe(self) -> Iterable[Any]:
        """Every family this collector can yield: what the registry's ``name[]``
        filter looks names up in."""
        every_family = Aggregate(processes={}, heartbeat_age={}, kills={}, would_kills={("", ""): 0}, scan_seconds=0.0,
                                 scan_success=True, state_file_errors={}, totals_save_failures=0, locks_unrecorded={},
                                 workload_info=set())
        return list(self._families(every_family, dict.fromkeys(("h5watch_version", "python_version", "h5py_version", "hdf5_version"), "")))

    def collect(self) -> Iterable[Any]:
        return self._families(self.source(), self.versions())

    def _families(self, aggregate: Aggregate | None, versions: dict[str, str]) -> Iterable[Any]:
        info = GaugeMetricFamily("h5watch_build_info", "This exporter's h5watch and Python, and the h5py and HDF5 it has "
                                 "(a daemon: the h5py installed with it, no HDF5).",
                                 labels=["version", "python_version", "h5py_version", "hdf5_version"])
        info.add_metric([versions["h5watch_version"], versions["python_version"], versions["h5py_version"], versions["hdf5_version"]], 1)
        yield info
        if aggregate is None:
            return
        if aggregate.workload_info is not None:
            workload_info = GaugeMetricFamily("h5watch_workload_info", "What the live processes of a workload run, one series "
                                              "per combination (\"\": not said, such as h5py not imported yet).",
                                              labels=["workload", "h5py_version", "hdf5_version", "h5watch_version", "python_version"])
            for running in sorted(aggregate.workload_info):
                workload_info.add_metric(list(running), 1)
            yield workload_info
        lock_labels = ["workload", "lock"]
        counters = {
            "acquisitions": CounterMetricFamily("h5watch_lock_acquisitions", "Outermost acquisitions of the lock.", labels=lock_labels),
            "contentions": CounterMetricFamily("h5watch_lock_contentions", "Acquisitions that had to wait.", labels=lock_labels),
            "reentries": CounterMetricFamily("h5watch_lock_reentries", "Re-entrant acquisitions by the holder.", labels=lock_labels),
        }
        wait = _histogram("h5watch_lock_wait_seconds", "Time spent waiting for the lock, for acquisitions that waited.", lock_labels)
        hold = _histogram("h5watch_lock_hold_seconds", "Time the lock was held, per outermost hold.", lock_labels)
        timeouts = CounterMetricFamily("h5watch_lock_timeouts", "Wait, hold and fork timeouts (incidents).", labels=lock_labels + ["kind"])
        orphans = CounterMetricFamily("h5watch_orphaned_locks", "Locks found orphaned after a fork, by the action taken.",
                                      labels=lock_labels + ["action"])
        for (workload, lock), totals in sorted(aggregate.locks.items()):
            labels = [workload, lock]
            for key, counter in counters.items():
                counter.add_metric(labels, getattr(totals, key))
            _add_histogram(wait, labels, totals.wait_buckets, totals.wait_sum_ns)
            _add_histogram(hold, labels, totals.hold_buckets, totals.hold_sum_ns)
            for kind, value in zip(TIMEOUT_KINDS, totals.timeouts):
                timeouts.add_metric(labels + [kind], int(value))
            for action, value in zip(ORPHAN_ACTIONS, totals.orphans):
                orphans.add_metric(labels + [action], int(value))
        yield from counters.values()
        yield from (wait, hold, timeouts, orphans)

        operation_labels = ["workload", "lock", "operation"]
        operation_counters = {
            "holds": CounterMetricFamily("h5watch_lock_operation_holds", "Outermost holds of the lock by this operation "
                                         "(for h5py.phil, the h5py function).", labels=operation_labels),
            "hold_sum_ns": CounterMetricFamily("h5watch_lock_operation_hold_seconds", "Time this operation held the lock.",
                                               labels=operation_labels),
            "caused_wait_sum_ns": CounterMetricFamily("h5watch_lock_operation_caused_wait_seconds", "Time other threads "
                                                      "waited for the lock while this operation held it.", labels=operation_labels),
            "waits": CounterMetricFamily("h5watch_lock_operation_waits", "Blocked waits for the lock by this operation.",
                                         labels=operation_labels),
            "wait_sum_ns": CounterMetricFamily("h5watch_lock_operation_wait_seconds", "Time this operation waited for the lock.",
                                               labels=operation_labels),
        }
        for operation_key, operation_totals in sorted(aggregate.operations.items()):
            for attribute, counter in operation_counters.items():
                value = getattr(operation_totals, attribute)
                counter.add_metric(list(operation_key), value / 1e9 if attribute.endswith("_ns") else value)
        yield from operation_counters.values()

        gauge_families = {
            "held": GaugeMetricFamily("h5watch_lock_held", "Live processes in which the lock is held now.", labels=lock_labels),
            "hold_age_seconds": GaugeMetricFamily("h5watch_lock_hold_age_seconds", "Age of the longest current hold.", labels=lock_labels),
            "waiters": GaugeMetricFamily("h5watch_lock_waiters", "Threads waiting for the lock now.", labels=lock_labels),
            "oldest_wait_seconds": GaugeMetricFamily("h5watch_lock_oldest_wait_seconds", "Age of the oldest current wait.", labels=lock_labels),
        }
        for (workload, lock), gauges in sorted(aggregate.gauges.items()):
            for key, gauge in gauge_families.items():
                gauge.add_metric([workload, lock], getattr(gauges, key))
        yield from gauge_families.values()

        forks = CounterMetricFamily("h5watch_forks", "Forks made by instrumented processes.", labels=["workload"])
        fork_wait = _histogram("h5watch_fork_wait_seconds", "Time a fork's before-hook waited for the watched locks.", ["workload"])
        for workload, fork_totals in sorted(aggregate.forks.items()):
            forks.add_metric([workload], fork_totals.forks)
            _add_histogram(fork_wait, [workload], fork_totals.wait_buckets, fork_totals.wait_sum_ns)
        yield forks
        yield fork_wait

        deadlocks = CounterMetricFamily("h5watch_deadlocks", "Deadlocks named by the watchdogs (lock.deadlock), by kind.",
                                        labels=["workload", "kind"])
        inversions = CounterMetricFamily("h5watch_lock_order_inversions",
                                         "Lock-order inversions found (lock.order_inversion), before any deadlock.",
                                         labels=["workload"])
        for workload, fork_totals in sorted(aggregate.forks.items()):
            for kind, count in zip(DEADLOCK_KINDS, fork_totals.deadlocks):
                deadlocks.add_metric([workload, kind], int(count))
            inversions.add_metric([workload], fork_totals.order_inversions)
        yield deadlocks
        yield inversions
        deadlocked = GaugeMetricFamily("h5watch_deadlocked_threads", "Threads in a deadlock now (a deadlock never clears by itself).",
                                       labels=["workload"])
        for workload in sorted(aggregate.forks):
            deadlocked.add_metric([workload], aggregate.threads_in_deadlock.get(workload, 0))
        yield deadlocked

        if aggregate.processes is not None:
            gauge = GaugeMetricFamily("h5watch_processes", "Instrumented processes by state.", labels=["workload", "state"])
            for (workload, state), count in sorted(aggregate.processes.items()):
                gauge.add_metric([workload, state], count)
            yield gauge
        if aggregate.heartbeat_age is not None:
            gauge = GaugeMetricFamily("h5watch_heartbeat_age_seconds", "Oldest heartbeat among live processes.", labels=["workload"])
            for workload, age in sorted(aggregate.heartbeat_age.items()):
                gauge.add_metric([workload], age)
            yield gauge
        if aggregate.kills is not None:
            counter = CounterMetricFamily("h5watch_worker_kills", "Stuck workers the daemon killed, by reason.", labels=["workload", "reason"])
            for (workload, reason), count in sorted(aggregate.kills.items()):
                counter.add_metric([workload, reason], count)
            yield counter
        if aggregate.would_kills:
            counter = CounterMetricFamily("h5watch_worker_would_kill", "Stuck workers a daemon with --dry-run would have "
                                          "killed (it sent nothing), by reason.", labels=["workload", "reason"])
            for (workload, reason), count in sorted(aggregate.would_kills.items()):
                counter.add_metric([workload, reason], count)
            yield counter
        if aggregate.scan_seconds is not None:
            yield GaugeMetricFamily("h5watch_daemon_scan_seconds", "Duration of the daemon's last scan of the state directory.",
                                    value=aggregate.scan_seconds)
        if aggregate.scan_success is not None:
            yield GaugeMetricFamily("h5watch_daemon_last_scan_success", "1 if the daemon's last scan could list the state directory.",
                                    value=int(aggregate.scan_success))
        if aggregate.totals_save_failures is not None:
            yield CounterMetricFamily("h5watch_daemon_totals_save_failures", "Failed saves of the daemon's totals (dead "
                                      "processes' files are kept until a save succeeds).", value=aggregate.totals_save_failures)
        if aggregate.locks_unrecorded is not None:
            gauge = GaugeMetricFamily("h5watch_locks_unrecorded", "Watched locks of live processes that found no record in "
                                      "their state file (their counts are not exported).", labels=["workload"])
            for workload, count in sorted(aggregate.locks_unrecorded.items()):
                gauge.add_metric([workload], count)
            yield gauge
        if aggregate.state_file_errors is not None:
            counter = CounterMetricFamily("h5watch_state_file_errors", "State files the daemon skipped, by reason.", labels=["reason"])
            for reason, count in sorted(aggregate.state_file_errors.items()):
                counter.add_metric([reason], count)
            yield counter


def installed_versions() -> dict[str, str]:
    """What a host command knows without importing h5py: h5watch, Python, and
    the h5py installed next to it (its package metadata); never HDF5's."""
    try:
        h5py_version = importlib.metadata.version("h5py")
    except importlib.metadata.PackageNotFoundError:
        h5py_version = ""
    return {"h5watch_version": __version__, "python_version": platform.python_version(), "h5py_version": h5py_version,
            "hdf5_version": ""}


def metrics_registry(collector: AggregateCollector) -> CollectorRegistry:
    """A registry of ``collector`` and prometheus_client's own process_* and
    python_info collectors (of the process that serves it)."""
    # auto_describe: the process and platform collectors have no describe(),
    # and only a described name can be asked for by name[].
    registry = CollectorRegistry(auto_describe=True)
    registry.register(collector)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry
