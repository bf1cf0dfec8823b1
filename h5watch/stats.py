"""Counters and log-scale histograms of one lock, and of forks.

Buckets are fixed for every process and every version of the state file: a
log scale from 1 us to 60 s with a boundary at each alert threshold of
``deploy/prometheus`` (0.1 s, 1 s, 5 s, 10 s, 30 s). Values are kept in
integer nanoseconds; bucketing is one ``bisect`` over a tuple.

Who writes: the fields of :class:`LockStats` that describe holds and waits
that ended in an acquisition are written only by the thread that holds the
lock, so the lock itself serialises them. The rare counters written by
threads that do not hold it (timeouts, orphans) go through :meth:`bump`,
which takes a small lock of its own.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from typing import Any, Iterable

__all__ = [
    "BUCKET_BOUNDS_SECONDS",
    "BUCKET_BOUNDS_NS",
    "N_BUCKETS",
    "LockStats",
    "CoreLockStats",
    "ForkStats",
    "quantile_seconds",
    "merge_lock_snapshots",
    "TIMEOUT_KINDS",
    "ORPHAN_ACTIONS",
]

BUCKET_BOUNDS_SECONDS: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6,
    1e-5, 2.5e-5, 5e-5,
    1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)
BUCKET_BOUNDS_NS: tuple[int, ...] = tuple(round(b * 1e9) for b in BUCKET_BOUNDS_SECONDS)
# One bucket per bound plus the +Inf bucket; counts are per bucket, not cumulative.
N_BUCKETS = len(BUCKET_BOUNDS_NS) + 1

TIMEOUT_KINDS = ("wait", "hold", "fork")
ORPHAN_ACTIONS = ("killed", "recovered", "raised", "warned")


class LockStats:
    __slots__ = (
        "acquisitions",
        "contentions",
        "reentries",
        "wait_buckets",
        "wait_sum_ns",
        "wait_max_ns",
        "hold_buckets",
        "hold_sum_ns",
        "hold_max_ns",
        "timeouts",
        "orphans",
        "_bump_lock",
    )

    def __init__(self) -> None:
        self.acquisitions = 0
        self.contentions = 0
        self.reentries = 0
        self.wait_buckets = [0] * N_BUCKETS
        self.wait_sum_ns = 0
        self.wait_max_ns = 0
        self.hold_buckets = [0] * N_BUCKETS
        self.hold_sum_ns = 0
        self.hold_max_ns = 0
        self.timeouts = dict.fromkeys(TIMEOUT_KINDS, 0)
        self.orphans = dict.fromkeys(ORPHAN_ACTIONS, 0)
        self._bump_lock = threading.Lock()

    def record_wait(self, wait_ns: int) -> None:
        self.contentions += 1
        self.wait_buckets[bisect_left(BUCKET_BOUNDS_NS, wait_ns)] += 1
        self.wait_sum_ns += wait_ns
        if wait_ns > self.wait_max_ns:
            self.wait_max_ns = wait_ns

    def bump(self, table: str, key: str) -> None:
        with self._bump_lock:
            getattr(self, table)[key] += 1

    def reset_after_fork(self) -> None:
        """A forked child is a new process: its statistics start at zero."""
        self.__init__()  # type: ignore[misc]

    def snapshot(self) -> dict[str, Any]:
        wait_buckets = list(self.wait_buckets)
        hold_buckets = list(self.hold_buckets)
        return {
            "acquisitions": self.acquisitions,
            "contentions": self.contentions,
            "reentries": self.reentries,
            "wait": _histogram(wait_buckets, self.wait_sum_ns, self.wait_max_ns),
            "hold": _histogram(hold_buckets, self.hold_sum_ns, self.hold_max_ns),
            "timeouts": dict(self.timeouts),
            "orphans": dict(self.orphans),
        }


class CoreLockStats(LockStats):
    """LockStats whose hot counters live in the compiled lock core (written
    there by acquire and release, without touching Python objects)."""

    __slots__ = ("_core",)

    def __init__(self, core: Any = None) -> None:
        if core is not None:
            self._core = core
        super().__init__()

    def _hot(name: str) -> property:  # type: ignore[misc]
        attribute = "_core_" + name
        return property(lambda self: getattr(self._core, attribute), lambda self, value: setattr(self._core, attribute, value))

    acquisitions = _hot("acquisitions")
    reentries = _hot("reentries")
    hold_buckets = _hot("hold_buckets")
    hold_sum_ns = _hot("hold_sum_ns")
    hold_max_ns = _hot("hold_max_ns")
    del _hot


class ForkStats:
    """Forks this process made and how long their before-hooks waited."""

    __slots__ = ("forks", "wait_buckets", "wait_sum_ns", "wait_max_ns")

    def __init__(self) -> None:
        self.forks = 0
        self.wait_buckets = [0] * N_BUCKETS
        self.wait_sum_ns = 0
        self.wait_max_ns = 0

    def record(self, wait_ns: int) -> None:
        self.forks += 1
        self.wait_buckets[bisect_left(BUCKET_BOUNDS_NS, wait_ns)] += 1
        self.wait_sum_ns += wait_ns
        if wait_ns > self.wait_max_ns:
            self.wait_max_ns = wait_ns

    def snapshot(self) -> dict[str, Any]:
        return {
            "forks": self.forks,
            "wait": _histogram(list(self.wait_buckets), self.wait_sum_ns, self.wait_max_ns),
        }


def _histogram(buckets: list[int], sum_ns: int, max_ns: int) -> dict[str, Any]:
    return {"buckets": buckets, "count": sum(buckets), "sum_ns": sum_ns, "max_ns": max_ns}


def quantile_seconds(buckets: Iterable[int], q: float) -> float | None:
    """Upper bound of the bucket holding quantile ``q`` (None when empty).

    Like Prometheus's ``histogram_quantile`` but without interpolation, so it
    never reports a value below what was actually measured.
    """
    counts = list(buckets)
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank and count:
            if index < len(BUCKET_BOUNDS_SECONDS):
                return BUCKET_BOUNDS_SECONDS[index]
            return float("inf")
    return float("inf")


def merge_histograms(into: dict[str, Any], other: dict[str, Any]) -> None:
    into["buckets"] = [a + b for a, b in zip(into["buckets"], other["buckets"])]
    into["count"] += other["count"]
    into["sum_ns"] += other["sum_ns"]
    into["max_ns"] = max(into["max_ns"], other["max_ns"])


def merge_lock_snapshots(snapshots: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Sum the counters and histograms of several snapshots of one lock."""
    merged = LockStats().snapshot()
    for snap in snapshots:
        for key in ("acquisitions", "contentions", "reentries"):
            merged[key] += snap[key]
        merge_histograms(merged["wait"], snap["wait"])
        merge_histograms(merged["hold"], snap["hold"])
        for table in ("timeouts", "orphans"):
            for key, value in snap[table].items():
                merged[table][key] = merged[table].get(key, 0) + value
    return merged
