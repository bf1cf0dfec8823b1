"""The exporters behave like the ones Prometheus users know: prometheus_client's
own replies (gzip, OpenMetrics, ``name[]``), its process_* and python_info
metrics, ``--listen :PORT`` and IPv6, build and workload versions filled, and
workloads that leave /metrics once they have had no process for
``--workload-retention``. Real daemons, real workers, real sockets."""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import os
import platform
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import h5py
import pytest
from conftest import REPO, run_python
from daemon_support import H5WATCH, free_port, kill_group, read_json_line, wait_for
from prometheus_client.parser import text_string_to_metric_families

import h5watch
from h5watch.statefile import StateWriter, read_state_file

pytestmark = pytest.mark.timeout(120)


def fetch(url: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, dict(response.headers), response.read()


def families(text: str) -> dict[str, list]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


# -- prometheus_client's own replies --------------------------------------------


def test_metrics_are_gzipped_when_the_scraper_accepts_it(state_dir, daemons):
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    status, headers, body = fetch(f"http://127.0.0.1:{daemon.port}/metrics", {"Accept-Encoding": "gzip"})
    assert status == 200 and headers.get("Content-Encoding") == "gzip", headers
    assert int(headers["Content-Length"]) == len(body)
    assert "h5watch_daemon_scan_seconds" in families(gzip.decompress(body).decode())

    status, headers, body = fetch(f"http://127.0.0.1:{daemon.port}/metrics")
    assert "Content-Encoding" not in headers and b"h5watch_daemon_scan_seconds" in body


def test_name_filter_returns_only_the_families_asked_for(state_dir, daemons):
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    url = f"http://127.0.0.1:{daemon.port}/metrics?name[]=h5watch_build_info&name[]=process_open_fds"
    _, _, body = fetch(url)
    assert set(families(body.decode())) == {"h5watch_build_info", "process_open_fds"}


def test_head_is_answered_with_the_get_s_headers_and_no_body(state_dir, daemons):
    # prometheus_client's own app answers HEAD with 405 in recent versions (0.26): ours still answers it.
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    status, headers, body = fetch(f"http://127.0.0.1:{daemon.port}/metrics", {"Accept": "application/openmetrics-text"}, method="HEAD")
    assert status == 200 and body == b""
    assert headers["Content-Type"].startswith("application/openmetrics-text") and int(headers["Content-Length"]) > 0


def test_the_daemon_exports_its_own_process_metrics(state_dir, daemons):
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    samples = families(daemon.metrics_text())
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds", "python_info"):
        assert name in samples, sorted(samples)
    [rss] = samples["process_resident_memory_bytes"]
    with open(f"/proc/{daemon.proc.pid}/status") as status:
        vm_rss_kib = int(next(line.split()[1] for line in status if line.startswith("VmRSS:")))
    assert 0.5 < rss.value / (vm_rss_kib * 1024) < 2


def test_the_in_process_exporter_has_process_metrics_and_its_versions(tmp_path):
    result = run_python(
        """
        import json, sys, urllib.request
        import h5watch
        h5watch.install(state_dir=sys.argv[1], metrics_port=0, tick_interval=0.05)
        import h5py
        port = h5watch.snapshot()["exporter"]["port"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            print(json.dumps(response.read().decode()))
        """,
        args=[str(tmp_path)], timeout=60,
    )
    assert result.returncode == 0, result.stderr
    samples = families(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "process_resident_memory_bytes" in samples and "python_info" in samples
    [info] = samples["h5watch_build_info"]
    assert info.labels == {"version": h5watch.__version__, "python_version": platform.python_version(),
                           "h5py_version": h5py.version.version, "hdf5_version": h5py.version.hdf5_version}


# -- where the daemon listens -----------------------------------------------------


def start_daemon(state_dir: Path, log: Path, listen: str, *args: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([*H5WATCH, "daemon", "--state-dir", str(state_dir), "--listen", listen, "--scan-interval", "0.2", *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)


def answers(host: str, port: int) -> bool:
    try:
        return fetch(f"http://{host}:{port}/healthz")[0] == 200
    except OSError:
        return False


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_listen_colon_port_serves_every_address_ipv4_and_ipv6(state_dir, tmp_path):
    port = free_port()
    proc = start_daemon(state_dir, tmp_path / "daemon.log", f":{port}")
    try:
        wait_for(lambda: answers("127.0.0.1", port), 20, what="the daemon on 127.0.0.1")
        if has_ipv6():
            assert answers("[::1]", port)
        started = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines() if '"daemon.started"' in line]
        assert started[0]["listen"] == f":{port}"
    finally:
        kill_group(proc)
        proc.wait(10)


def test_listen_on_a_bracketed_ipv6_address(state_dir, tmp_path):
    if not has_ipv6():
        pytest.skip("no IPv6 loopback here")
    port = free_port()
    proc = start_daemon(state_dir, tmp_path / "daemon.log", f"[::1]:{port}")
    try:
        wait_for(lambda: answers("[::1]", port), 20, what="the daemon on [::1]")
        assert not answers("127.0.0.1", port)
        started = [json.loads(line) for line in (tmp_path / "daemon.log").read_text().splitlines() if '"daemon.started"' in line]
        assert started[0]["listen"] == f"[::1]:{port}"
    finally:
        kill_group(proc)
        proc.wait(10)


@pytest.mark.parametrize("listen", ["::1:9464", "[::1]", "9464", "[]:9464", "[127.0.0.1:9464", "host:99999"])
def test_a_listen_address_that_cannot_be_read_is_a_one_line_error(state_dir, listen):
    result = subprocess.run([*H5WATCH, "daemon", "--state-dir", str(state_dir), "--listen", listen],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--listen" in result.stderr and "[::1]:9464" in result.stderr


# -- TLS ----------------------------------------------------------------------


def make_certificate(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made by openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
                    "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


def https_get(port: int, cafile: Path, client: tuple[Path, Path] | None = None, headers: dict[str, str] | None = None
              ) -> tuple[int, dict[str, str], bytes]:
    context = ssl.create_default_context(cafile=str(cafile))
    if client is not None:
        context.load_cert_chain(str(client[0]), str(client[1]))
    request = urllib.request.Request(f"https://127.0.0.1:{port}/metrics", headers=headers or {})
    with urllib.request.urlopen(request, timeout=10, context=context) as response:
        return response.status, dict(response.headers), response.read()


@pytest.fixture
def tls_daemon(state_dir, tmp_path):
    """start(*args): a daemon serving HTTPS with a fresh certificate; (port, certificate)."""
    started: list[subprocess.Popen] = []
    cert, key = make_certificate(tmp_path, "daemon")

    def start(*args: str) -> tuple[int, Path]:
        port = free_port()
        proc = start_daemon(state_dir, tmp_path / f"daemon-{len(started)}.log", f"127.0.0.1:{port}", "--tls-cert", str(cert),
                            "--tls-key", str(key), *args)
        started.append(proc)

        def listening() -> bool:
            assert proc.poll() is None, (tmp_path / f"daemon-{len(started) - 1}.log").read_text()
            with socket.socket() as sock:
                return sock.connect_ex(("127.0.0.1", port)) == 0

        wait_for(listening, 20, what="the TLS daemon to listen")
        return port, cert

    yield start
    for proc in started:
        kill_group(proc)
        proc.wait(10)


def test_tls_serves_https_and_drops_plain_http(tls_daemon):
    port, cert = tls_daemon()
    status, headers, body = https_get(port, cert, headers={"Accept-Encoding": "gzip"})
    assert status == 200 and headers["Content-Encoding"] == "gzip"
    assert "h5watch_daemon_scan_seconds" in families(gzip.decompress(body).decode())
    with pytest.raises(OSError):
        fetch(f"http://127.0.0.1:{port}/metrics")
    assert https_get(port, cert)[0] == 200


def test_tls_clients_that_never_finish_the_handshake_block_nobody(tls_daemon):
    port, cert = tls_daemon()
    silent = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(100)]
    try:
        for _ in range(5):
            assert https_get(port, cert)[0] == 200

        def all_dropped() -> bool:
            for sock in silent:
                sock.setblocking(False)
                try:
                    if sock.recv(1) != b"":
                        return False
                except BlockingIOError:
                    return False
                except ConnectionError:
                    pass
            return True

        wait_for(all_dropped, 20, interval=0.2, what="the silent TLS clients to be dropped")
    finally:
        for sock in silent:
            sock.close()
    assert https_get(port, cert)[0] == 200


def test_tls_client_ca_admits_only_clients_with_a_certificate(tls_daemon, tmp_path):
    client = make_certificate(tmp_path, "scraper")
    stranger = make_certificate(tmp_path, "stranger")
    port, cert = tls_daemon("--tls-client-ca", str(client[0]))
    assert https_get(port, cert, client=client)[0] == 200
    for refused in (None, stranger):
        with pytest.raises((ssl.SSLError, OSError)):
            https_get(port, cert, client=refused)
    assert https_get(port, cert, client=client)[0] == 200


def test_tls_options_that_cannot_be_used_are_one_line_errors(state_dir, tmp_path):
    cert, key = make_certificate(tmp_path, "daemon")
    for args, names in (
        (["--tls-cert", str(cert)], "--tls-cert and --tls-key"),
        (["--tls-key", str(key)], "--tls-cert and --tls-key"),
        (["--tls-client-ca", str(cert)], "--tls-client-ca"),
        (["--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key)], "--tls-cert"),
        (["--tls-cert", str(key), "--tls-key", str(cert)], "--tls-cert"),
        (["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(tmp_path / "missing.pem")], "--tls-client-ca"),
    ):
        result = subprocess.run([*H5WATCH, "daemon", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0", *args],
                                capture_output=True, text=True, timeout=30, cwd=REPO)
        assert result.returncode == 2, (args, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1 and names in result.stderr, (args, result.stderr)


# -- versions -----------------------------------------------------------------


def test_the_state_file_names_what_the_process_runs(tmp_path):
    writer = StateWriter(str(tmp_path), "svc", 0, 1.0)
    try:
        assert read_state_file(writer.path).versions == dict.fromkeys(
            ("h5watch_version", "python_version", "h5py_version", "hdf5_version"), "")
        versions = {"h5watch_version": "0.1.0", "python_version": "3.11.2", "h5py_version": "3.16.0", "hdf5_version": "1.14.6"}
        writer.set_versions(versions)
        writer.write_all([], writer._last_status)
        assert read_state_file(writer.path).versions == versions
        writer.set_versions({**versions, "h5py_version": "\x1b[31m" + "9" * 100})  # too long, and an escape
        writer.write_all([], writer._last_status)
        read = read_state_file(writer.path).versions["h5py_version"]
        assert "\x1b" not in read and len(read) <= 24
    finally:
        writer.close()


def test_the_daemon_names_each_workload_s_versions(state_dir, daemons, workers, tmp_path):
    proc = workers(state_dir, "count", str(tmp_path), "5", service="versions")
    read_json_line(proc)
    daemon = daemons(state_dir, "--scan-interval", "0.2")

    def info() -> list:
        return families(daemon.metrics_text()).get("h5watch_workload_info", [])

    # The file names h5py's versions from the first watchdog tick after h5py's import.
    [sample] = wait_for(lambda: [s for s in info() if s.labels["h5py_version"]], 10, what="h5watch_workload_info with h5py's versions")
    assert sample.value == 1
    assert sample.labels == {"workload": "versions", "h5py_version": h5py.version.version, "hdf5_version": h5py.version.hdf5_version,
                             "h5watch_version": h5watch.__version__, "python_version": platform.python_version()}
    [build] = families(daemon.metrics_text())["h5watch_build_info"]
    # The daemon never imports h5py: the h5py installed with it, and no HDF5.
    assert build.labels == {"version": h5watch.__version__, "python_version": platform.python_version(),
                            "h5py_version": importlib.metadata.version("h5py"), "hdf5_version": ""}

    (tmp_path / "release").touch()
    assert proc.wait(20) == 0
    wait_for(lambda: not info(), 10, what="the versions of a workload with no process left to go")


# -- workload retention ---------------------------------------------------------


def totals_workloads(state_dir: Path) -> set[str]:
    try:
        data = json.loads((state_dir / str(os.geteuid()) / "h5watch-daemon.json").read_text())
    except FileNotFoundError:
        return set()
    return {w for w, _, _ in data["locks"]} | {w for w, _ in data["forks"]} | {w for w, _, _ in data["kills"]}


def run_to_completion(workers, state_dir: Path, tmp_path: Path, service: str) -> None:
    release = Path(tempfile.mkdtemp(prefix=service, dir=tmp_path))
    proc = workers(state_dir, "count", str(release), "3", service=service)
    read_json_line(proc)
    (release / "release").touch()
    assert proc.wait(20) == 0


def test_a_workload_without_a_process_leaves_metrics_after_the_retention(state_dir, daemons, workers, tmp_path):
    daemon = daemons(state_dir, "--scan-interval", "0.2", "--workload-retention", "3s")
    keeper = workers(state_dir, "count", str(tmp_path), "3", service="lives-on")
    read_json_line(keeper)
    run_to_completion(workers, state_dir, tmp_path, "one-off")
    wait_for(lambda: daemon.value("h5watch_lock_acquisitions_total", workload="one-off", lock="app.x") == 3, 10,
             what="the one-off workload's counts folded")
    wait_for(lambda: "one-off" in totals_workloads(state_dir), 10, what="the one-off workload's counts saved in the totals")
    gone_at = time.monotonic()

    wait_for(lambda: 'workload="one-off"' not in daemon.metrics_text(), 15, what="the one-off workload to expire")
    assert time.monotonic() - gone_at > 2  # not before its retention
    [expired] = daemon.events("daemon.workload_expired")
    assert expired["workload"] == "one-off" and expired["retention_seconds"] == 3
    # Saved without it: a restart does not bring it back; the live workload stays.
    wait_for(lambda: "one-off" not in totals_workloads(state_dir), 5, what="the totals saved without it")
    assert daemon.value("h5watch_lock_acquisitions_total", workload="lives-on", lock="app.x") == 3
    saved = json.loads((state_dir / str(os.geteuid()) / "h5watch-daemon.json").read_text())
    assert "lives-on" in dict(saved["last_seen"])  # when the retention of a live workload starts, after a restart
    daemon.stop()
    again = daemons(state_dir, "--scan-interval", "0.2", "--workload-retention", "3s")
    text = again.metrics_text()
    assert 'workload="one-off"' not in text and 'workload="lives-on"' in text

    # It returns: its counters start from 0 (3, not 6).
    run_to_completion(workers, state_dir, tmp_path, "one-off")
    wait_for(lambda: again.value("h5watch_lock_acquisitions_total", workload="one-off", lock="app.x") == 3, 10,
             what="the returning workload's counts")
    time.sleep(4)  # longer than the retention: a live workload never expires
    assert again.value("h5watch_lock_acquisitions_total", workload="lives-on", lock="app.x") == 3


def test_retention_off_keeps_every_workload(state_dir, daemons, workers, tmp_path):
    daemon = daemons(state_dir, "--scan-interval", "0.2", "--workload-retention", "off")
    run_to_completion(workers, state_dir, tmp_path, "one-off")
    wait_for(lambda: daemon.value("h5watch_lock_acquisitions_total", workload="one-off", lock="app.x") == 3, 10,
             what="the one-off workload's counts folded")
    time.sleep(2)
    assert daemon.value("h5watch_lock_acquisitions_total", workload="one-off", lock="app.x") == 3
    assert daemon.events("daemon.workload_expired") == []


@pytest.mark.parametrize("value", ["-1", "soon", "3x", "nan", "1e20"])
def test_a_bad_workload_retention_is_a_one_line_error(state_dir, value):
    result = subprocess.run([*H5WATCH, "daemon", "--state-dir", str(state_dir), "--listen", "127.0.0.1:0", "--workload-retention", value],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "--workload-retention: expected a duration" in result.stderr, result.stderr
