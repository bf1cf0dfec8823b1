"""The daemon's /metrics under abuse: many scrapers at once, slow clients,
clients that vanish mid-reply. A real daemon on 127.0.0.1, real sockets."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from daemon_support import DaemonProcess, wait_for
from prometheus_client.parser import text_string_to_metric_families

from h5watch.export.server import MetricsServer

pytestmark = pytest.mark.timeout(120)

SCRAPE_TIMEOUT = 10.0


@pytest.fixture
def daemon(tmp_path: Path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    started = DaemonProcess(state_dir, tmp_path / "daemon.log", "--scan-interval", "0.5")
    yield started
    started.stop()


def scrape(port: int) -> str:
    """One scrape, as Prometheus makes it: the whole body, or an exception."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT) as response:
        assert response.status == 200
        body = response.read()  # raises IncompleteRead if shorter than Content-Length
        assert len(body) == int(response.headers["Content-Length"])
    text = body.decode()
    names = {family.name for family in text_string_to_metric_families(text)}
    assert "h5watch_daemon_scan_seconds" in names, text[:500]
    return text


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith("Threads:")))


def scrape_concurrently(port: int, clients: int) -> list[BaseException]:
    """``clients`` scrapes started at the same moment; the failures."""
    start = threading.Barrier(clients)
    failures: list[BaseException] = []

    def one() -> None:
        try:
            start.wait(30)
            scrape(port)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SCRAPE_TIMEOUT + 35)
    assert not any(thread.is_alive() for thread in threads)
    return failures


def test_64_concurrent_scrapers_are_all_answered(daemon):
    for _ in range(5):
        failures = scrape_concurrently(daemon.port, 64)
        assert failures == [], failures[:3]
    assert threads_of(daemon.proc.pid) <= MetricsServer.WORKERS + 4


def test_300_slow_connections_neither_block_scrapes_nor_add_threads(daemon):
    scrape(daemon.port)
    baseline = threads_of(daemon.proc.pid)
    slow: list[socket.socket] = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            sock.sendall(b"GET /metrics HTT")  # half a request line, then nothing
            slow.append(sock)
        most_threads = baseline
        for _ in range(10):
            failures = scrape_concurrently(daemon.port, 4)
            assert failures == [], failures[:3]
            most_threads = max(most_threads, threads_of(daemon.proc.pid))
        assert most_threads <= baseline + 1, (baseline, most_threads)
        assert most_threads <= MetricsServer.WORKERS + 4

        # Each slow client is dropped a few seconds after it connected.
        waiting = list(slow)

        def all_dropped() -> bool:
            waiting[:] = [sock for sock in waiting if not dropped_by_server(sock)]
            return not waiting

        wait_for(all_dropped, MetricsServer.REQUEST_TIMEOUT_SECONDS + 10, interval=0.2,
                 what="the slow clients to be dropped")
    finally:
        for sock in slow:
            sock.close()
    scrape(daemon.port)


def dropped_by_server(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_clients_that_vanish_leave_no_traceback(daemon):
    request = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    for i in range(60):
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        try:
            sock.sendall(request)
            if i % 2:
                sock.recv(16)  # the reply has started
            # Reset, not a clean close: the daemon's next read or write fails.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()
    for _ in range(20):  # half a request, then gone
        with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
            sock.sendall(b"GET /metr")
    scrape(daemon.port)
    time.sleep(0.5)  # the daemon's workers are done with the last of them
    scrape(daemon.port)
    log = daemon.log_text()
    assert "Traceback" not in log, log[-3000:]
    for line in filter(None, log.splitlines()):
        json.loads(line)  # one JSON object a line, nothing else
