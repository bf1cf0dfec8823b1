"""Daemon scan + collect over many state files, and the per-tick write cost.

Run alone: ``python benchmarks/daemon_scan.py [--files 1000] [--repeats 15]``.

The state files name real live processes (``sleep``), with their true start
times, so the daemon treats every one as a live worker: read, verified,
aggregated, exported. Each file holds three locks and ten operations that
held them (contention by operation), written as a process writes it: only
the pages in use (the rest of the file is a hole). Timings are medians;
peak RSS is the benchmark process's own (it runs the daemon's code in-process).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from h5watch.export.metrics import AggregateCollector
from h5watch.host.daemon import Daemon
from h5watch.process.lock import WatchedLock
from h5watch.process.publisher import lock_record
from h5watch.records import ProcessStatus
from h5watch.statefile import HEADER_DTYPE, HEADER_SIZE, StateWriter, ensure_state_dir, proc_start_ticks, state_file_name

# What an h5py reader's phil is held for (contention by operation), and the
# operation of each application lock: 10 operation rows per file.
PHIL_OPERATIONS = ("h5py._hl.files.File.__init__", "h5py._hl.group.Group.__getitem__",
                   "h5py._hl.dataset.Dataset.__getitem__", "h5py._hl.dataset.Dataset.shape",
                   "h5py._hl.dataset.Dataset.dtype", "h5py._hl.base.HLObject.attrs",
                   "h5py._hl.attrs.AttributeManager.__getitem__", "h5py._hl.files.File.close")
PAGE = 4096


def _template(directory: str) -> bytes:
    """A real state file with three locks that have seen some traffic, by
    operation too."""
    writer = StateWriter(directory, "bench", 0, 0.5)
    locks = [WatchedLock(name) for name in ("h5py.phil", "app.cache", "app.db")]
    for lock in locks:
        for operation in (PHIL_OPERATIONS if lock.name == "h5py.phil" else (None,)):
            for _ in range(100):
                lock.acquire_for(operation)
                lock.release()
    operations = [row for lock in locks for row in lock.snapshot()["operations"]]
    assert len(operations) == len(PHIL_OPERATIONS) + 2, operations
    writer.write_all([lock_record(lock) for lock in locks], ProcessStatus(True, None))
    data = Path(writer.path).read_bytes()
    writer.close(exited=False)
    os.unlink(writer.path)
    return data


def bench_daemon_scan(n_files: int = 1000, repeats: int = 15) -> dict[str, float]:
    sleepers = [subprocess.Popen(["sleep", "600"]) for _ in range(n_files)]
    try:
        with tempfile.TemporaryDirectory(prefix="h5watch-bench-") as tmp:
            state_dir = os.path.join(tmp, "state")
            user_dir = ensure_state_dir(state_dir)
            template = bytearray(_template(user_dir))
            pages = [0] + [offset for offset in range(PAGE, len(template), PAGE) if any(template[offset : offset + PAGE])]
            for proc in sleepers:
                ticks = proc_start_ticks(proc.pid)
                header = np.frombuffer(template, dtype=HEADER_DTYPE, count=1).copy()
                header["pid"] = proc.pid
                header["start_ticks"] = ticks
                header["heartbeat_unix"] = time.time() + 3600  # fresh for the whole run
                template[:HEADER_SIZE] = header.tobytes()
                path = os.path.join(user_dir, state_file_name(proc.pid, ticks))
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(fd, len(template))
                for offset in pages:
                    os.pwrite(fd, template[offset : offset + PAGE], offset)
                os.close(fd)
            daemon = Daemon(state_dir, scan_interval=1.0)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(AggregateCollector(lambda: daemon.aggregate))
            scans, collects = [], []
            for _ in range(repeats):
                start = time.perf_counter()
                aggregate = daemon.scan()
                scans.append(time.perf_counter() - start)
                start = time.perf_counter()
                body = generate_latest(registry)
                collects.append(time.perf_counter() - start)
            live = sum(v for (w, s), v in aggregate.processes.items() if s != "dead")
            assert live == n_files, f"expected {n_files} live processes, the daemon saw {live}"
            assert b"h5watch_lock_acquisitions_total" in body
            holds = sum(totals.holds for totals in aggregate.operations.values())
            assert holds == n_files * 100 * (len(PHIL_OPERATIONS) + 2), f"the daemon counted {holds} operation holds"
    finally:
        for proc in sleepers:
            proc.kill()
        for proc in sleepers:
            proc.wait()
    scan_ms = statistics.median(scans) * 1e3
    collect_ms = statistics.median(collects) * 1e3
    return {
        "files": n_files,
        "scan_ms_median": scan_ms,
        "collect_ms_median": collect_ms,
        "scan_plus_collect_ms_median": statistics.median(a + b for a, b in zip(scans, collects)) * 1e3,
        "scan_plus_collect_ms_max": max(a + b for a, b in zip(scans, collects)) * 1e3,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def bench_state_write(repeats: int = 2000) -> dict[str, float]:
    """One watchdog tick's write: three lock records and the header."""
    with tempfile.TemporaryDirectory(prefix="h5watch-bench-") as tmp:
        state_dir = ensure_state_dir(os.path.join(tmp, "state"))
        writer = StateWriter(state_dir, "bench", 0, 0.5)
        locks = [WatchedLock(name) for name in ("h5py.phil", "app.cache", "app.db")]
        holder = threading.Thread(target=lambda: locks[1].acquire(), daemon=True)
        holder.start()
        holder.join()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter_ns()
            writer.write_all([lock_record(lock) for lock in locks], ProcessStatus(True, None))
            samples.append(time.perf_counter_ns() - start)
        writer.close()
    return {"tick_write_us_median": statistics.median(samples) / 1e3, "tick_write_us_max": max(samples) / 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(json.dumps({**bench_daemon_scan(args.files, args.repeats), **bench_state_write()}, indent=2))


if __name__ == "__main__":
    main()
