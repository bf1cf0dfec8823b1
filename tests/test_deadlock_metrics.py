"""Deadlocks and lock-order inversions as metrics: a real worker that
deadlocks under ``h5watch run``, its own ``/metrics`` and a real daemon's,
before and after the worker is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import pytest
from conftest import REPO
from daemon_support import H5WATCH, free_port, kill_group, read_json_line, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)

# Two watched locks taken in opposite orders by two threads (a lock_cycle),
# after a third pair taken in both orders without overlapping (an inversion
# that never deadlocks).
WORKER = r"""
import json, os, threading, time
import h5watch

first, second = h5watch.WatchedLock("app.first"), h5watch.WatchedLock("app.second")
with first:
    with second:
        pass
with second:
    with first:
        pass

a, b = h5watch.WatchedLock("app.a"), h5watch.WatchedLock("app.b")
both_hold = threading.Barrier(2)

def take(one, other):
    with one:
        both_hold.wait()
        with other:
            pass

for name, one, other in (("left", a, b), ("right", b, a)):
    threading.Thread(target=take, args=(one, other), name=name, daemon=True).start()
print(json.dumps({"pid": os.getpid()}), flush=True)
time.sleep(3600)
"""


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    wanted = tuple(sorted(labels.items()))
    return sum(v for (n, have), v in samples.items() if n == name and all(item in have for item in wanted))


@pytest.fixture
def worker(state_dir):
    port = free_port()
    proc = subprocess.Popen(
        [*H5WATCH, "run", "--state-dir", str(state_dir), "--service", "tangled", "--tick-interval", "0.1",
         "--metrics-port", str(port), "--", sys.executable, "-c", WORKER],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO,
    )
    try:
        yield proc, port
    finally:
        kill_group(proc)


def test_a_deadlock_is_counted_by_kind_in_the_process_and_by_the_daemon_for_good(state_dir, daemons, worker):
    proc, port = worker
    pid = read_json_line(proc)["pid"]
    own = wait_for(lambda: (lambda s: s if value(s, "h5watch_deadlocked_threads", workload="tangled") == 2 else None)(scrape(port)),
                   20, what="the worker's own /metrics to show the deadlock")
    assert value(own, "h5watch_deadlocks_total", workload="tangled", kind="lock_cycle") == 1
    for kind in ("gc_under_phil", "import_lock", "holder_waits_on_waiter"):
        assert ("h5watch_deadlocks_total", (("kind", kind), ("workload", "tangled"))) in own
        assert value(own, "h5watch_deadlocks_total", workload="tangled", kind=kind) == 0
    # The pair taken in both orders first, and the deadlocked pair: two inversions.
    assert value(own, "h5watch_lock_order_inversions_total", workload="tangled") == 2

    daemon = daemons(state_dir, "--scan-interval", "0.2")
    wait_for(lambda: daemon.value("h5watch_deadlocked_threads", workload="tangled") == 2, 20,
             what="the daemon to see the threads in the deadlock")
    assert daemon.value("h5watch_deadlocks_total", workload="tangled", kind="lock_cycle") == 1
    assert daemon.value("h5watch_lock_order_inversions_total", workload="tangled") == 2

    # Gone: the count is kept (it is money), the threads are no longer deadlocked.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: daemon.value("h5watch_deadlocked_threads", workload="tangled") == 0, 20,
             what="the dead worker's threads to leave the gauge")
    assert daemon.value("h5watch_deadlocks_total", workload="tangled", kind="lock_cycle") == 1
    assert daemon.value("h5watch_lock_order_inversions_total", workload="tangled") == 2
    daemon.stop()
    again = daemons(state_dir, "--scan-interval", "0.2")
    assert again.value("h5watch_deadlocks_total", workload="tangled", kind="lock_cycle") == 1
    assert again.value("h5watch_lock_order_inversions_total", workload="tangled") == 2
