"""The ``metrics_port`` option: this process's own ``/metrics``, from ``snapshot()``."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any

import numpy as np

from h5watch import logs
from h5watch.export.metrics import Aggregate, AggregateCollector, ForkTotals, LockGauges, LockTotals, OperationTotals, metrics_registry
from h5watch.export.server import MetricsServer
from h5watch.schema import DEADLOCK_KINDS, ORPHAN_ACTIONS, TIMEOUT_KINDS

__all__ = ["InProcessExporter", "aggregate_snapshot"]

_log = logs.get_logger(logger="h5watch.exporter")


def order_inversions(snapshot: dict[str, Any]) -> int:
    """Lock-order inversions this process reported, as its snapshot says."""
    lock_order = snapshot.get("lock_order")
    return int(lock_order.get("inversions", 0)) if isinstance(lock_order, dict) else 0


def aggregate_snapshot(snapshot: dict[str, Any], workload: str) -> Aggregate:
    """This process's ``h5watch.snapshot()`` as an :class:`Aggregate`."""
    aggregate = Aggregate()
    for name, entry in snapshot["locks"].items():
        stats = entry["stats"]
        aggregate.locks[(workload, name)] = LockTotals(
            acquisitions=stats["acquisitions"], contentions=stats["contentions"], reentries=stats["reentries"],
            wait_buckets=np.array(stats["wait"]["buckets"], dtype=np.uint64), wait_sum_ns=stats["wait"]["sum_ns"],
            hold_buckets=np.array(stats["hold"]["buckets"], dtype=np.uint64), hold_sum_ns=stats["hold"]["sum_ns"],
            timeouts=np.array([stats["timeouts"][k] for k in TIMEOUT_KINDS], dtype=np.uint64),
            orphans=np.array([stats["orphans"][k] for k in ORPHAN_ACTIONS], dtype=np.uint64),
        )
        gauges = LockGauges()
        holder = entry["holder"]
        gauges.add(holder is not None, holder["hold_age_seconds"] if holder else 0.0, len(entry["waiters"]),
                   entry["oldest_wait_seconds"])
        aggregate.gauges[(workload, name)] = gauges
        for row in entry.get("operations", ()):
            aggregate.operations[(workload, name, row["operation"])] = OperationTotals(
                row["holds"], round(row["hold_seconds"] * 1e9), round(row["caused_wait_seconds"] * 1e9), row["waits"],
                round(row["wait_seconds"] * 1e9))
    forks = snapshot.get("forks")
    watchdog = snapshot.get("watchdog", {})
    deadlocks = watchdog.get("deadlocks", {})
    if forks is not None:
        aggregate.forks[workload] = ForkTotals(forks["forks"], np.array(forks["wait"]["buckets"], dtype=np.uint64),
                                               forks["wait"]["sum_ns"],
                                               np.array([deadlocks.get(kind, 0) for kind in DEADLOCK_KINDS], dtype=np.uint64),
                                               order_inversions(snapshot))
        aggregate.threads_in_deadlock[workload] = watchdog.get("threads_in_deadlock", 0)
    return aggregate



class InProcessExporter:
    """The ``metrics_port`` option: this process's locks on its own ``/metrics``.

    Only the process that called ``install()`` serves; a forked child does
    not inherit the server (its thread did not survive the fork). With a
    range of ports, the first free one is taken."""

    snapshot_key = "exporter"

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self._snapshot = snapshot
        self.server: MetricsServer | None = None
        self._endpoint: tuple[str, int] | None = None
        self.options: Any = None

    def start(self, options: Any) -> None:
        self.options = options
        endpoint = None if options.metrics_port is None else (options.metrics_addr, options.metrics_port)
        if endpoint == self._endpoint and self.server is not None:
            return
        self.stop()
        if endpoint is None:
            return
        addr, ports = endpoint
        first, last = ports if isinstance(ports, tuple) else (ports, ports)
        registry = metrics_registry(AggregateCollector(lambda: aggregate_snapshot(self._snapshot(), self.options.service)))
        for port in range(first, last + 1):
            try:
                self.server = MetricsServer(registry, addr, port).start()
                break
            except OSError as exc:
                error = exc
                if exc.errno != errno.EADDRINUSE:
                    break
        if self.server is None:
            shown = f"{first}-{last}" if first != last else first
            _log.error("exporter.unavailable", addr=addr, port=shown, error=str(error))
            return
        self._endpoint = endpoint
        _log.info("exporter.listening", addr=addr, port=self.server.port)

    def stop(self) -> None:
        server, self.server = self.server, None
        self._endpoint = None
        if server is not None:
            server.stop()

    def forget_after_fork(self) -> None:
        self.server = None
        self._endpoint = None

    def snapshot(self) -> dict[str, Any]:
        return {"port": self.server.port if self.server else None}
