"""Statistics with known timings and exact counts; quantiles and merging."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from bisect import bisect_left

import pytest

from h5watch.export.metrics import histogram_quantile
from h5watch.process.stats import LockStats, merge_lock_snapshots
from h5watch.schema import BUCKET_BOUNDS_NS, BUCKET_BOUNDS_SECONDS, N_BUCKETS

pytestmark = pytest.mark.timeout(60)


def test_a_200ms_wait_and_hold_land_in_the_right_buckets(lock_class):
    lock = lock_class("test.timed")
    held = threading.Event()

    def holder():
        with lock:
            held.set()
            time.sleep(0.2)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    with lock:
        pass
    thread.join(5)
    stats = lock.snapshot()["stats"]
    assert stats["acquisitions"] == 2 and stats["contentions"] == 1
    wait = stats["wait"]
    assert wait["count"] == 1
    assert wait["max_ns"] >= 0.19e9 and wait["sum_ns"] == wait["max_ns"]
    [bucket] = [i for i, n in enumerate(wait["buckets"]) if n]
    assert bucket == bisect_left(BUCKET_BOUNDS_NS, wait["max_ns"])
    assert BUCKET_BOUNDS_SECONDS[bucket] == 0.25  # (0.1, 0.25]
    hold = stats["hold"]
    assert hold["count"] == 2 and hold["max_ns"] >= 0.2e9
    assert hold["buckets"][bucket] == 1  # the 200 ms hold


def test_counts_are_exact_under_10_threads_x_1000(lock_class):
    lock = lock_class("test.counts")
    start = threading.Barrier(10)

    def work():
        start.wait()
        for _ in range(1000):
            with lock:
                with lock:  # one re-entry per acquisition
                    pass

    threads = [threading.Thread(target=work) for _ in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    stats = lock.snapshot()["stats"]
    assert stats["acquisitions"] == 10_000
    assert stats["reentries"] == 10_000
    assert 0 <= stats["contentions"] <= 10_000
    assert sum(stats["wait"]["buckets"]) == stats["contentions"] == stats["wait"]["count"]
    assert sum(stats["hold"]["buckets"]) == 10_000 == stats["hold"]["count"]


def test_quantiles_interpolate_within_their_bucket_as_prometheus_does():
    buckets = [0] * N_BUCKETS
    assert histogram_quantile(0.5, buckets, 0.0) is None
    buckets[bisect_left(BUCKET_BOUNDS_NS, 3_000)] = 90  # 3 us -> (2.5 us, 5 us]
    buckets[bisect_left(BUCKET_BOUNDS_NS, 2 * 10**9)] = 10  # 2 s -> (1 s, 2.5 s]
    # rank 50 of 100: 50/90 of the way through (2.5 us, 5 us]
    assert histogram_quantile(0.5, buckets, 10.0) == pytest.approx(2.5e-6 + 2.5e-6 * 50 / 90)
    assert histogram_quantile(0.9, buckets, 10.0) == pytest.approx(5e-6)
    # rank 95: 5 of the 10 in (1 s, 2.5 s]
    assert histogram_quantile(0.95, buckets, 10.0) == pytest.approx(1.75)
    assert histogram_quantile(0.99, buckets, 10.0) == pytest.approx(2.35)
    first = [0] * N_BUCKETS
    first[0] = 4  # (0, 1 us]: the first bucket's lower bound is 0
    assert histogram_quantile(0.25, first, 1.0) == pytest.approx(0.25e-6)


def test_quantiles_never_exceed_the_largest_value_observed():
    buckets = [0] * N_BUCKETS
    buckets[bisect_left(BUCKET_BOUNDS_NS, 3_000)] = 90
    buckets[bisect_left(BUCKET_BOUNDS_NS, 2 * 10**9)] = 10
    # 2.35 s interpolated, but nothing took longer than 2.2 s
    assert histogram_quantile(0.99, buckets, 2.2) == 2.2
    assert histogram_quantile(1.0, buckets, 2.2) == 2.2
    assert histogram_quantile(0.5, buckets, 2.2) == pytest.approx(2.5e-6 + 2.5e-6 * 50 / 90)
    # beyond the last bound Prometheus answers the last bound (60 s), and so do we
    buckets[-1] = 1000
    assert histogram_quantile(0.99, buckets, 100.0) == 60.0
    assert histogram_quantile(0.99, buckets, 45.0) == 45.0


def test_merge_sums_counters_and_histograms():
    a, b = LockStats(), LockStats()
    a.acquisitions, b.acquisitions = 3, 4
    a.record_wait(1_000)
    b.record_wait(5 * 10**9)
    b.bump("timeouts", "hold")
    a.bump("orphans", "killed")
    merged = merge_lock_snapshots([a.snapshot(), b.snapshot()])
    assert merged["acquisitions"] == 7 and merged["contentions"] == 2
    assert merged["wait"]["count"] == 2 and merged["wait"]["sum_ns"] == 5 * 10**9 + 1_000
    assert merged["wait"]["max_ns"] == 5 * 10**9
    assert merged["timeouts"]["hold"] == 1 and merged["orphans"]["killed"] == 1


def test_quantiles_match_prometheus_itself(tmp_path):
    """promtool evaluates histogram_quantile over the same buckets; below the
    max, ours gives the same numbers."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("H5WATCH_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required (H5WATCH_REQUIRE_PROMTOOL) but not installed")
        pytest.skip("promtool not installed")
    buckets = [0] * N_BUCKETS
    for wait_ns, count in ((800, 3), (3_000, 40), (70_000, 17), (2 * 10**6, 9), (40 * 10**6, 1), (3 * 10**9, 2), (90 * 10**9, 1)):
        buckets[bisect_left(BUCKET_BOUNDS_NS, wait_ns)] += count
    bounds = [repr(bound) for bound in BUCKET_BOUNDS_SECONDS] + ["+Inf"]
    cumulative = list(itertools.accumulate(buckets))
    quantiles = (0.01, 0.25, 0.5, 0.9, 0.97, 0.99, 1.0)
    tests = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [{"series": f'h5watch_lock_wait_seconds_bucket{{le="{le}"}}', "values": f"{total}+0x1"}
                             for le, total in zip(bounds, cumulative)],
            "promql_expr_test": [{
                "expr": f"histogram_quantile({q}, h5watch_lock_wait_seconds_bucket)",
                "eval_time": "0m",
                "exp_samples": [{"labels": "{}", "value": histogram_quantile(q, buckets, float("inf"))}],
            } for q in quantiles],
        }],
    }
    path = tmp_path / "quantiles.test.yml"
    path.write_text(json.dumps(tests))  # JSON is YAML
    result = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
