"""Prometheus export: one aggregate model, one collector, one small HTTP server.

Both exporters (this process's, from ``h5watch.snapshot()``; the daemon's,
from every state file) fill an :class:`Aggregate` keyed by ``workload`` and
``lock``, and :class:`AggregateCollector` turns the latest one into metric
families. ``collect()`` only reads an aggregate that is never modified after
it is published, so concurrent scrapes need no lock.

Names follow DESIGN.md section 4: base units, ``_total`` counters, classic
histograms with h5watch's own log-scale buckets, the ``service`` option
exported as the ``workload`` label.
"""

from __future__ import annotations

import email.utils
import http
import http.client
import io
import queue
import re
import selectors
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from . import __version__, logs
from .stats import BUCKET_BOUNDS_SECONDS, N_BUCKETS, ORPHAN_ACTIONS, TIMEOUT_KINDS

__all__ = ["Aggregate", "LockTotals", "AggregateCollector", "MetricsServer", "aggregate_snapshot", "InProcessExporter"]

_LE = [floatToGoString(bound) for bound in BUCKET_BOUNDS_SECONDS] + ["+Inf"]
_log = logs.get_logger(logger="h5watch.exporter")


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

    def add(self, other: "LockTotals") -> None:
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
    def from_json(cls, data: dict[str, Any]) -> "LockTotals":
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
    forks: int = 0
    wait_buckets: np.ndarray = field(default_factory=lambda: np.zeros(N_BUCKETS, dtype=np.uint64))
    wait_sum_ns: int = 0

    def add(self, other: "ForkTotals") -> None:
        self.forks += other.forks
        self.wait_buckets = self.wait_buckets + other.wait_buckets
        self.wait_sum_ns += other.wait_sum_ns

    def to_json(self) -> dict[str, Any]:
        return {"forks": self.forks, "wait_buckets": [int(v) for v in self.wait_buckets], "wait_sum_ns": self.wait_sum_ns}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ForkTotals":
        totals = cls(int(data["forks"]), np.array(data["wait_buckets"], dtype=np.uint64), int(data["wait_sum_ns"]))
        if totals.wait_buckets.shape != (N_BUCKETS,):
            raise ValueError("bucket count differs from this version's")
        return totals


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
    scan_seconds: float | None = None
    scan_success: bool | None = None
    state_file_errors: dict[str, int] | None = None
    totals_save_failures: int | None = None
    locks_unrecorded: dict[str, int] | None = None


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
    forks = snapshot.get("forks")
    if forks is not None:
        aggregate.forks[workload] = ForkTotals(forks["forks"], np.array(forks["wait"]["buckets"], dtype=np.uint64),
                                               forks["wait"]["sum_ns"])
    return aggregate


def _histogram(name: str, documentation: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, documentation, labels=labels)


def _add_histogram(family: HistogramMetricFamily, labels: list[str], buckets: np.ndarray, sum_ns: int) -> None:
    cumulative = np.cumsum(buckets.astype(np.uint64))
    family.add_metric(labels, [(le, float(count)) for le, count in zip(_LE, cumulative)], sum_value=sum_ns / 1e9)


class AggregateCollector:
    """A prometheus_client collector over whatever ``source()`` returns now."""

    def __init__(self, source: Callable[[], Aggregate | None]) -> None:
        self.source = source

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        aggregate = self.source()
        versions = build_versions()
        info = GaugeMetricFamily("h5watch_build_info", "h5watch build and the h5py/HDF5 it was built against.",
                                 labels=["version", "h5py_version", "hdf5_version"])
        info.add_metric([__version__, versions.get("h5py", ""), versions.get("hdf5", "")], 1)
        yield info
        if aggregate is None:
            return
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
            for key, family in counters.items():
                family.add_metric(labels, getattr(totals, key))
            _add_histogram(wait, labels, totals.wait_buckets, totals.wait_sum_ns)
            _add_histogram(hold, labels, totals.hold_buckets, totals.hold_sum_ns)
            for kind, value in zip(TIMEOUT_KINDS, totals.timeouts):
                timeouts.add_metric(labels + [kind], int(value))
            for action, value in zip(ORPHAN_ACTIONS, totals.orphans):
                orphans.add_metric(labels + [action], int(value))
        yield from counters.values()
        yield from (wait, hold, timeouts, orphans)

        gauge_families = {
            "held": GaugeMetricFamily("h5watch_lock_held", "Live processes in which the lock is held now.", labels=lock_labels),
            "hold_age_seconds": GaugeMetricFamily("h5watch_lock_hold_age_seconds", "Age of the longest current hold.", labels=lock_labels),
            "waiters": GaugeMetricFamily("h5watch_lock_waiters", "Threads waiting for the lock now.", labels=lock_labels),
            "oldest_wait_seconds": GaugeMetricFamily("h5watch_lock_oldest_wait_seconds", "Age of the oldest current wait.", labels=lock_labels),
        }
        for (workload, lock), gauges in sorted(aggregate.gauges.items()):
            for key, family in gauge_families.items():
                family.add_metric([workload, lock], getattr(gauges, key))
        yield from gauge_families.values()

        forks = CounterMetricFamily("h5watch_forks", "Forks made by instrumented processes.", labels=["workload"])
        fork_wait = _histogram("h5watch_fork_wait_seconds", "Time a fork's before-hook waited for the watched locks.", ["workload"])
        for workload, totals in sorted(aggregate.forks.items()):
            forks.add_metric([workload], totals.forks)
            _add_histogram(fork_wait, [workload], totals.wait_buckets, totals.wait_sum_ns)
        yield forks
        yield fork_wait

        if aggregate.processes is not None:
            family = GaugeMetricFamily("h5watch_processes", "Instrumented processes by state.", labels=["workload", "state"])
            for (workload, state), count in sorted(aggregate.processes.items()):
                family.add_metric([workload, state], count)
            yield family
        if aggregate.heartbeat_age is not None:
            family = GaugeMetricFamily("h5watch_heartbeat_age_seconds", "Oldest heartbeat among live processes.", labels=["workload"])
            for workload, age in sorted(aggregate.heartbeat_age.items()):
                family.add_metric([workload], age)
            yield family
        if aggregate.kills is not None:
            family = CounterMetricFamily("h5watch_worker_kills", "Stuck workers the daemon killed, by reason.", labels=["workload", "reason"])
            for (workload, reason), count in sorted(aggregate.kills.items()):
                family.add_metric([workload, reason], count)
            yield family
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
            family = GaugeMetricFamily("h5watch_locks_unrecorded", "Watched locks of live processes that found no record in "
                                       "their state file (their counts are not exported).", labels=["workload"])
            for workload, count in sorted(aggregate.locks_unrecorded.items()):
                family.add_metric([workload], count)
            yield family
        if aggregate.state_file_errors is not None:
            family = CounterMetricFamily("h5watch_state_file_errors", "State files the daemon skipped, by reason.", labels=["reason"])
            for reason, count in sorted(aggregate.state_file_errors.items()):
                family.add_metric([reason], count)
            yield family


def build_versions() -> dict[str, str]:
    """h5py and HDF5 versions for ``h5watch_build_info``, once h5py is imported
    (the exporter never imports it itself: install() may precede that import)."""
    h5py = sys.modules.get("h5py")
    version = getattr(h5py, "version", None)
    if version is None:
        return {}
    return {"h5py": getattr(version, "version", ""), "hdf5": getattr(version, "hdf5_version", "")}


class MetricsServer:
    """``/metrics`` (text or OpenMetrics, by the Accept header) and ``/healthz``,
    made to survive abuse: many scrapers at once, slow clients, vanishing ones.

    One thread reads the requests of every connection in a ``selectors`` loop,
    so a client that sends half a request and waits costs a socket and a few
    bytes, not a thread (one thread per connection, or a pool whose threads
    each wait on one client, lets a few hundred slow clients starve every
    scrape). A connection whose request is not complete
    ``REQUEST_TIMEOUT_SECONDS`` after it was accepted is dropped. A complete
    request goes to a fixed pool of ``WORKERS`` threads, which build the reply
    and send it, giving up on a client that does not read it within
    ``SEND_TIMEOUT_SECONDS``. At most ``MAX_CONNECTIONS`` are held: beyond
    that the oldest incomplete one is dropped. One request per connection
    (``Connection: close``). Clients that go away are not logged.
    """

    WORKERS = 4
    REQUEST_TIMEOUT_SECONDS = 5.0
    SEND_TIMEOUT_SECONDS = 10.0
    MAX_REQUEST_BYTES = 16 * 1024
    MAX_CONNECTIONS = 512
    LISTEN_BACKLOG = 256

    def __init__(self, registry: CollectorRegistry, addr: str, port: int, healthy: Callable[[], bool] = lambda: True) -> None:
        self._registry = registry
        self._healthy = healthy
        family, kind, proto, _, sockaddr = socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(self.LISTEN_BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port: int = listener.getsockname()[1]
        # Owned by the loop thread: connections still sending their request,
        # in the order accepted (so the first is the next to time out).
        self._reading: dict[socket.socket, tuple[float, bytearray]] = {}
        # poll rather than epoll: no kernel object that a forked child of an
        # instrumented process would share with this loop.
        self._selector = selectors.PollSelector() if hasattr(selectors, "PollSelector") else selectors.DefaultSelector()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_writer.setblocking(False)
        self._requests: queue.SimpleQueue[tuple[socket.socket, bytes] | None] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="h5watch-metrics", daemon=True)
        self._workers = [threading.Thread(target=self._work, name=f"h5watch-metrics-{i}", daemon=True) for i in range(self.WORKERS)]

    def start(self) -> "MetricsServer":
        for worker in self._workers:
            worker.start()
        self.thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass
        if self.thread.is_alive():
            self.thread.join(5)
        for _ in self._workers:
            self._requests.put(None)
        for sock in (self._listener, self._wake_reader, self._wake_writer):
            sock.close()

    # -- the loop thread: accept, read requests, drop slow clients ---------------

    def _serve(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_reader, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                try:
                    self._serve_once()
                except Exception as exc:  # never let one bad round end the server
                    _log.error("metrics.server_error", error=repr(exc))
                    time.sleep(0.1)
        finally:
            for conn in list(self._reading):
                self._drop(conn)
            self._selector.close()

    def _serve_once(self) -> None:
        timeout = None
        if self._reading:
            first_deadline = next(iter(self._reading.values()))[0]
            timeout = max(0.0, first_deadline - time.monotonic())
        for key, _ in self._selector.select(timeout):
            if key.fileobj is self._listener:
                self._accept()
            elif key.fileobj is self._wake_reader:
                self._wake_reader.recv(64)
            else:
                self._read(key.fileobj)  # type: ignore[arg-type]
        now = time.monotonic()
        while self._reading:
            conn, (deadline, _) = next(iter(self._reading.items()))
            if deadline > now:
                break
            self._drop(conn)

    def _accept(self) -> None:
        for _ in range(64):  # a burst per round; the backlog keeps the rest
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError:
                # Out of descriptors (EMFILE, ENFILE) or memory: make room by
                # dropping the oldest slow client, or wait for the workers.
                if self._reading:
                    self._drop(next(iter(self._reading)))
                else:
                    time.sleep(0.05)
                return
            if len(self._reading) + self._requests.qsize() >= self.MAX_CONNECTIONS:
                if not self._reading:
                    conn.close()
                    continue
                self._drop(next(iter(self._reading)))
            conn.setblocking(False)
            self._reading[conn] = (time.monotonic() + self.REQUEST_TIMEOUT_SECONDS, bytearray())
            self._selector.register(conn, selectors.EVENT_READ)

    def _read(self, conn: socket.socket) -> None:
        entry = self._reading.get(conn)
        if entry is None:
            return
        try:
            chunk = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(conn)
            return
        data = entry[1]
        data += chunk
        end = _end_of_head(data)
        if end is None:
            if len(data) > self.MAX_REQUEST_BYTES:
                self._drop(conn)
            return
        self._selector.unregister(conn)
        del self._reading[conn]
        self._requests.put((conn, bytes(data[:end])))

    def _drop(self, conn: socket.socket) -> None:
        self._reading.pop(conn, None)
        try:
            self._selector.unregister(conn)
        except (KeyError, ValueError):
            pass
        conn.close()

    # -- the worker threads: answer complete requests ----------------------------

    def _work(self) -> None:
        while True:
            item = self._requests.get()
            if item is None:
                return
            conn, head = item
            try:
                self._answer(conn, head, time.monotonic() + self.SEND_TIMEOUT_SECONDS)
            except OSError:
                pass  # the client went away or stopped reading: nothing to tell
            except Exception as exc:
                _log.error("metrics.request_failed", error=repr(exc))
            finally:
                conn.close()

    def _answer(self, conn: socket.socket, head: bytes, deadline: float) -> None:
        request_line, _, header_lines = head.partition(b"\n")
        parts = request_line.decode("latin-1").split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            _send_reply(conn, deadline, 400, b"bad request\n", _TEXT, head_only=False)
            return
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            _send_reply(conn, deadline, 405, b"only GET and HEAD\n", _TEXT, head_only=False, extra="Allow: GET, HEAD\r\n")
            return
        head_only = method == "HEAD"
        try:
            headers = http.client.parse_headers(io.BytesIO(header_lines))
        except http.client.HTTPException:
            _send_reply(conn, deadline, 400, b"bad request headers\n", _TEXT, head_only)
            return
        path = target.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("Accept", ""))
            try:
                body = encoder(self._registry)
            except Exception as exc:
                _log.error("metrics.collect_failed", error=repr(exc))
                _send_reply(conn, deadline, 500, b"collect failed\n", _TEXT, head_only)
                return
            _send_reply(conn, deadline, 200, body, content_type, head_only)
        elif path == "/healthz":
            ok = self._healthy()
            _send_reply(conn, deadline, 200 if ok else 503, b"ok\n" if ok else b"unhealthy\n", _TEXT, head_only)
        else:
            _send_reply(conn, deadline, 404, b"not found: try /metrics or /healthz\n", _TEXT, head_only)


_TEXT = "text/plain; charset=utf-8"
_END_OF_HEAD = re.compile(rb"\r?\n\r?\n")


def _end_of_head(data: bytearray) -> int | None:
    """Where a request's head (request line and headers) ends, or None if it has not yet."""
    match = _END_OF_HEAD.search(data)
    return None if match is None else match.end()


def _send_reply(conn: socket.socket, deadline: float, code: int, body: bytes, content_type: str, head_only: bool,
                extra: str = "") -> None:
    head = (
        f"HTTP/1.1 {code} {http.HTTPStatus(code).phrase}\r\nServer: h5watch\r\n"
        f"Date: {email.utils.formatdate(usegmt=True)}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n"
    ).encode("latin-1")
    view = memoryview(head if head_only else head + body)
    while view:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("client did not read the reply in time")
        conn.settimeout(remaining)
        view = view[conn.send(view):]


class InProcessExporter:
    """The ``metrics_port`` option: this process's locks on its own ``/metrics``.

    Only the process that called ``install()`` serves; a forked child does
    not inherit the server (its thread did not survive the fork)."""

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
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AggregateCollector(lambda: aggregate_snapshot(self._snapshot(), self.options.service)))
        try:
            self.server = MetricsServer(registry, endpoint[0], endpoint[1]).start()
        except OSError as exc:
            _log.error("exporter.unavailable", addr=endpoint[0], port=endpoint[1], error=str(exc))
            return
        self._endpoint = endpoint
        _log.info("exporter.listening", addr=endpoint[0], port=self.server.port)

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
