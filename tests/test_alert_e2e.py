"""Alerts delivered end to end: worker -> daemon -> Prometheus -> Alertmanager -> receiver.

A worker holds h5py's lock forever in a thread. The daemon (``--stuck-after
1 --kill-after 12``) judges it stuck at once and kills it 12 s later.
Prometheus scrapes the daemon every second and evaluates the shipped rules,
their expressions exactly as shipped, every ``for:`` shortened to 1 s; it
sends to a real Alertmanager, whose config here routes everything at once to
a webhook receiver this test runs (the shipped config's routing is checked
by amtool in test_deploy). The receiver must get ``H5WatchProcessStuck`` for
the worker's workload while it is stuck, then its resolution once the daemon
has killed it.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import RULES, tool
from test_prometheus_e2e import Stack, free_port, wait_for, wait_for_http

pytestmark = pytest.mark.timeout(150)

WORKLOAD = "alert-e2e-stuck"
KILL_AFTER_SECONDS = 12
# Each wait below, bounded: start-up, firing, the kill, the resolution.
DEADLINE_SECONDS = 40

STUCK_WORKER = """
    import sys, threading, time
    import h5watch
    h5watch.install(state_dir=sys.argv[1], service=sys.argv[2])
    import h5py

    phil = h5py._objects.phil
    held = threading.Event()

    def hold_forever():
        with phil:
            held.set()
            time.sleep(3600)

    threading.Thread(target=hold_forever, name="stuck-holder", daemon=True).start()
    held.wait(10)
    print("ready", flush=True)
    while True:
        time.sleep(0.1)
"""


def alertmanager_binary() -> str:
    """Alertmanager is ``prometheus-alertmanager`` in Debian, ``alertmanager`` upstream."""
    found = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
    return found or tool("alertmanager")


class Receiver:
    """A webhook receiver on 127.0.0.1: every notification Alertmanager posts, in order."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self._thread = threading.Thread(target=self.server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    def alerts(self, alertname: str, status: str) -> list[dict[str, Any]]:
        """The alerts named ``alertname`` with ``status`` (firing, resolved) received so far."""
        with self._lock:
            return [alert for notification in self.notifications for alert in notification["alerts"]
                    if alert["labels"].get("alertname") == alertname and alert["status"] == status]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def rules_with_short_fors(tmp: Path) -> Path:
    """The shipped rules, expressions untouched, every ``for:`` set to 1 s."""
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "1s"
    path = tmp / "h5watch.rules.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(tmp=tmp_path, prometheus_url=f"http://127.0.0.1:{free_port()}",
                  daemon_address=f"127.0.0.1:{free_port()}", started_at=time.time())
    try:
        yield stack
    finally:
        stack.stop()


def start_alertmanager(stack: Stack, receiver: Receiver) -> str:
    config = {
        "route": {"receiver": "test", "group_by": ["alertname", "workload"],
                  "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{"name": "test", "webhook_configs": [{"url": receiver.url, "send_resolved": True}]}],
    }
    path = stack.tmp / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{free_port()}"
    process = stack.start("alertmanager", [
        alertmanager_binary(), f"--config.file={path}", f"--storage.path={stack.tmp / 'alertmanager'}",
        f"--web.listen-address={address}", "--cluster.listen-address=", "--log.level=warn",
    ])
    if not wait_for_http(process, f"http://{address}/-/ready", DEADLINE_SECONDS):
        pytest.fail(f"Alertmanager did not become ready (exit code {process.poll()})\n{stack.diagnostics()}")
    return address


def start_prometheus(stack: Stack, alertmanager: str) -> None:
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_with_short_fors(stack.tmp))],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]},
        "scrape_configs": [{"job_name": "h5watch", "static_configs": [{"targets": [stack.daemon_address]}]}],
    }
    path = stack.tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    process = stack.start("prometheus", [
        tool("prometheus"), f"--config.file={path}", f"--storage.tsdb.path={stack.tmp / 'tsdb'}",
        f"--web.listen-address={stack.prometheus_url.removeprefix('http://')}", "--log.level=warn",
    ])
    if not wait_for_http(process, f"{stack.prometheus_url}/-/ready", DEADLINE_SECONDS):
        pytest.fail(f"Prometheus did not become ready (exit code {process.poll()})\n{stack.diagnostics()}")
    if not wait_for(lambda: stack.api("alertmanagers")["data"]["activeAlertmanagers"], DEADLINE_SECONDS):
        pytest.fail(f"Prometheus found no Alertmanager\n{stack.diagnostics()}")


def test_a_stuck_worker_pages_and_resolves_once_the_daemon_kills_it(stack, receiver):
    alertmanager = start_alertmanager(stack, receiver)
    state_dir = stack.tmp / "state"
    state_dir.mkdir(mode=0o700)
    daemon = stack.start("daemon", [
        sys.executable, "-m", "h5watch", "daemon", "--listen", stack.daemon_address, "--state-dir", str(state_dir),
        "--stuck-after", "1", "--kill-after", str(KILL_AFTER_SECONDS), "--grace", "1", "--scan-interval", "0.5",
    ])
    if not wait_for_http(daemon, f"http://{stack.daemon_address}/metrics", DEADLINE_SECONDS):
        pytest.fail(f"h5watch daemon did not serve /metrics (exit code {daemon.poll()})\n{stack.diagnostics()}")
    start_prometheus(stack, alertmanager)

    worker = stack.start_worker("worker", STUCK_WORKER, str(state_dir), WORKLOAD)
    if not wait_for(lambda: "ready" in stack.logs["worker"].read_text(errors="replace"), DEADLINE_SECONDS, 0.2):
        pytest.fail(f"the worker did not start\n{stack.diagnostics()}")

    def details() -> str:
        return (f"notifications: {json.dumps(receiver.notifications, indent=1)[-3000:]}\n"
                f"h5watch_processes: {stack.query('h5watch_processes')}\n"
                f"Prometheus alerts: {stack.api('alerts')['data']['alerts']}\n{stack.diagnostics()}")

    firing = wait_for(lambda: receiver.alerts("H5WatchProcessStuck", "firing"), DEADLINE_SECONDS)
    assert firing, f"no firing H5WatchProcessStuck reached the receiver\n{details()}"
    assert worker.poll() is None, "the alert came only after the worker was gone"
    labels = firing[0]["labels"]
    assert {"workload": WORKLOAD, "job": "h5watch", "instance": stack.daemon_address, "severity": "critical"}.items() \
        <= labels.items(), labels
    assert firing[0]["annotations"]["runbook_url"].endswith("docs/runbook.md#h5watchprocessstuck")

    assert wait_for(lambda: worker.poll() is not None, KILL_AFTER_SECONDS + DEADLINE_SECONDS, 0.2), \
        f"the daemon did not kill the stuck worker\n{details()}"
    assert worker.returncode < 0, f"the worker exited {worker.returncode}, not by the daemon's signal\n{details()}"
    assert '"worker.killed"' in stack.logs["daemon"].read_text(errors="replace"), details()

    resolved = wait_for(lambda: [alert for alert in receiver.alerts("H5WatchProcessStuck", "resolved")
                                 if alert["labels"]["workload"] == WORKLOAD], DEADLINE_SECONDS)
    assert resolved, f"H5WatchProcessStuck did not resolve at the receiver after the kill\n{details()}"
    assert resolved[0]["labels"] == labels
