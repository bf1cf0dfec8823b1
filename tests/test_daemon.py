"""The host daemon against real workers under ``h5watch run``: export, exact
aggregation across exits, killing stuck workers (and never the wrong process)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from daemon_support import H5WATCH, DaemonProcess, kill_group, read_json_line, wait_for
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.timeout(120)

COUNTERS = ("_total", "_count", "_bucket", "_sum")


def counter_samples(samples: dict) -> dict:
    return {key: value for key, value in samples.items() if key[0].endswith(COUNTERS)}


def test_metrics_parse_and_pass_promtool(state_dir, daemons, workers, tmp_path):
    proc = workers(state_dir, "count", str(tmp_path), "50")
    read_json_line(proc)
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    wait_for(lambda: daemon.value("h5watch_lock_acquisitions_total", lock="app.x") == 50, 10, what="app.x in /metrics")

    status, content_type, text = daemon.get("/metrics")
    assert status == 200 and content_type.startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(text)}
    for name in ("h5watch_lock_acquisitions", "h5watch_lock_wait_seconds", "h5watch_lock_hold_seconds",
                 "h5watch_lock_held", "h5watch_processes", "h5watch_heartbeat_age_seconds",
                 "h5watch_daemon_scan_seconds", "h5watch_build_info", "h5watch_forks", "h5watch_fork_wait_seconds"):
        assert name in names
    assert 'workload="worker"' in text and "pid=" not in text

    status, content_type, openmetrics = daemon.get("/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert status == 200 and content_type.startswith("application/openmetrics-text")
    assert openmetrics.rstrip().endswith("# EOF")
    assert daemon.get("/nope")[0] == 404

    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("H5WATCH_REQUIRE_PROMTOOL"):
            pytest.fail("promtool is required (H5WATCH_REQUIRE_PROMTOOL) but not installed")
        pytest.skip("promtool not installed")
    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr


def test_exact_aggregation_and_counters_never_decrease(state_dir, daemons, workers, tmp_path):
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    k = 137
    expected_phil = 0
    scrapes = []
    for wave in range(2):
        release = tmp_path / "release"
        release.unlink(missing_ok=True)
        procs = [workers(state_dir, "count", str(tmp_path), str(k)) for _ in range(3)]
        reports = [read_json_line(proc) for proc in procs]
        assert all(report["app"] == k for report in reports)
        expected_phil += sum(report["phil"] for report in reports)
        live_pids = {report["pid"] for report in reports}
        # The watchdog writes each tick: wait for the workers' final counts.
        wait_for(lambda wave=wave: daemon.value("h5watch_lock_acquisitions_total", lock="app.x") == 3 * k * (wave + 1), 15,
                 what="app.x acquisitions from live workers")
        scrapes.append(counter_samples(daemon.samples()))
        release.touch()
        for proc in procs:
            assert proc.wait(20) == 0
        wait_for(lambda live_pids=live_pids: not any(str(pid) in name for name in os.listdir(state_dir / str(os.geteuid())) for pid in live_pids), 15,
                 what="exited workers' files folded and removed")
        scrapes.append(counter_samples(daemon.samples()))

    assert daemon.value("h5watch_lock_acquisitions_total", lock="app.x", workload="worker") == 6 * k
    assert daemon.value("h5watch_lock_acquisitions_total", lock="h5py.phil", workload="worker") == expected_phil
    assert daemon.value("h5watch_lock_hold_seconds_count", lock="app.x") == 6 * k
    for before, after in zip(scrapes, scrapes[1:]):
        for key, value in before.items():
            assert after.get(key, 0) >= value, f"{key} went from {value} to {after.get(key)}"

    # A restarted daemon keeps the totals of processes that are gone.
    daemon.stop()
    again = daemons(state_dir, "--scan-interval", "0.2")
    assert again.value("h5watch_lock_acquisitions_total", lock="app.x") == 6 * k


def test_a_sigstopped_stuck_worker_is_reported_and_spared(state_dir, daemons, workers):
    daemon = daemons(state_dir, "--scan-interval", "0.2", "--kill-after", "1.5", "--grace", "0.5")
    proc = workers(state_dir, "stuck", "-", service="paused")
    pid = read_json_line(proc)["pid"]
    time.sleep(0.6)  # one watchdog tick: the holder is in the state file
    os.kill(pid, signal.SIGSTOP)
    [spared] = wait_for(lambda: daemon.events("worker.spared_stopped"), 15, what="worker.spared_stopped")
    assert spared["worker_pid"] == pid and spared["stopped"].startswith("stopped (state T")
    assert spared["reason"] in ("hold", "wait", "heartbeat")
    assert daemon.value("h5watch_processes", workload="paused", state="stopped") == 1
    assert daemon.value("h5watch_processes", workload="paused", state="stuck") == 0
    time.sleep(1.5)  # several more scans: spared, and logged once
    assert proc.poll() is None and daemon.events("worker.killed") == []
    assert len(daemon.events("worker.spared_stopped")) == 1
    assert daemon.value("h5watch_worker_kills_total", workload="paused") == 0

    result = subprocess.run([*H5WATCH, "status", "--state-dir", str(state_dir), "--kill-after", "1.5"], capture_output=True,
                            text=True, timeout=30, cwd=REPO)
    assert result.returncode == 1, result  # stuck by its file, and stopped
    [row] = [line for line in result.stdout.splitlines() if f" {pid} " in line]
    assert "STOPPED" in row and "stopped (state T" in row and "a daemon would spare it" in row, row

    # Once it runs again it is a stuck worker like any other.
    os.kill(pid, signal.SIGCONT)
    wait_for(lambda: proc.poll() is not None, 15, what="the resumed worker to be killed")
    wait_for(lambda: daemon.value("h5watch_worker_kills_total", workload="paused") == 1, 10, what="the kill counted")


def test_a_traced_stuck_worker_is_reported_and_spared(state_dir, daemons, workers):
    daemon = daemons(state_dir, "--scan-interval", "0.2", "--kill-after", "1.5", "--grace", "0.5")
    proc = workers(state_dir, "stuck", "-", service="traced")
    pid = read_json_line(proc)["pid"]
    # A real tracer that lets the worker run on: PTRACE_SEIZE stops nothing.
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(pid)], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        if tracer.stdout.readline().strip() != "seized":
            pytest.skip("ptrace is not permitted here")
        [spared] = wait_for(lambda: daemon.events("worker.spared_stopped"), 15, what="worker.spared_stopped")
        assert spared["worker_pid"] == pid and spared["stopped"] == f"traced by pid {tracer.pid}"
        assert daemon.value("h5watch_processes", workload="traced", state="stopped") == 1
        time.sleep(1.0)
        assert proc.poll() is None and daemon.events("worker.killed") == []
    finally:
        kill_group(tracer)


TRACER = """
import ctypes, os, sys, time
PTRACE_SEIZE = 0x4206
libc = ctypes.CDLL(None, use_errno=True)
pid = int(sys.argv[1])
ok = libc.ptrace(PTRACE_SEIZE, pid, None, None) == 0
print("seized" if ok else f"refused {os.strerror(ctypes.get_errno())}", flush=True)
time.sleep(60)
"""


def test_sigstopped_worker_is_killed_with_evidence_given_kill_stopped(state_dir, daemons, workers):
    kill_after, scan, grace = 2.0, 0.5, 1.0
    daemon = daemons(state_dir, "--scan-interval", str(scan), "--kill-after", str(kill_after), "--grace", str(grace),
                     "--kill-stopped")
    proc = workers(state_dir, "stuck", "-", service="frozen")
    pid = read_json_line(proc)["pid"]
    time.sleep(0.6)  # one watchdog tick: the holder is in the state file
    os.kill(pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    returncode = wait_for(lambda: proc.poll(), kill_after + scan + grace + 5, what="the stopped worker to be killed")
    elapsed = time.monotonic() - stopped_at
    assert returncode in (-signal.SIGTERM, -signal.SIGKILL)
    [killed] = daemon.events("worker.killed")
    assert killed["worker_pid"] == pid and killed["workload"] == "frozen"
    assert killed["lock"] == "app.x"
    assert killed["holder"]["thread_name"] == "stuck-holder"
    assert elapsed <= kill_after + scan + grace + 2.5, elapsed
    wait_for(lambda: daemon.value("h5watch_worker_kills_total", workload="frozen") == 1, 10, what="the kill counted")


def test_worker_blocked_on_orphan_without_watchdog_is_killed_with_its_stack(state_dir, daemons, workers):
    kill_after, scan, grace = 2.0, 0.5, 1.0
    daemon = daemons(state_dir, "--scan-interval", str(scan), "--kill-after", str(kill_after), "--grace", str(grace))
    proc = workers(state_dir, "orphan", "-", service="orphans", options=("--on-orphan", "warn"))
    child = read_json_line(proc)["child"]
    started = time.monotonic()
    status = read_json_line(proc, timeout=kill_after + scan + grace + 10)["child_status"]
    elapsed = time.monotonic() - started
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGTERM, signal.SIGKILL)
    # The daemon logs worker.killed just after its SIGTERM: the child may be
    # reaped by its parent before the line is written.
    wait_for(lambda: [event for event in daemon.events("worker.killed") if event["worker_pid"] == child], 10,
             what="worker.killed for the child")
    killed = [event for event in daemon.events("worker.killed") if event["worker_pid"] == child]
    assert len(killed) == 1, daemon.log_text()[-3000:]
    killed = killed[0]
    assert killed["reason"] == "orphaned_lock"
    assert killed["lock"] == "app.x" and killed["orphaned"] is True
    assert killed["holder"]["thread_name"] == "doomed-holder"
    assert "child_waits_here" in killed["stacks"], killed["stacks"]
    assert elapsed <= kill_after + scan + grace + 3, elapsed
    assert proc.wait(10) == 0  # the parent lives on
    wait_for(lambda: daemon.value("h5watch_orphaned_locks_total", lock="app.x", action="warned") == 1, 10,
             what="the orphan counted")


def test_dry_run_kills_nothing(state_dir, daemons, workers):
    daemon = daemons(state_dir, "--scan-interval", "0.3", "--kill-after", "1", "--grace", "0.5", "--dry-run")
    proc = workers(state_dir, "stuck", "-", service="dry")
    pid = read_json_line(proc)["pid"]
    wait_for(lambda: daemon.events("worker.would_kill"), 15, what="worker.would_kill")
    time.sleep(2)
    assert proc.poll() is None
    [event] = daemon.events("worker.would_kill")
    assert event["worker_pid"] == pid and event["lock"] == "app.x" and event["holder"]["thread_name"] == "stuck-holder"
    # --dry-run sends no signal at all: pystack reads Python frames without stopping it, else no stacks.
    if event["stacks_source"] == "pystack":
        assert "hold_forever" in event["stacks"] and "stuck-holder" in event["stacks"]
    else:
        assert event["stacks_source"] == "state_file"
        assert event["stacks_unavailable"]["faulthandler"] == "no signal sent (dry run)"
    # The would-be kill leaves its incident file too: it is evidence, not a kill.
    incident = json.loads(Path(event["incident_file"]).read_text())
    assert incident["event"] == "worker.would_kill" and incident["dry_run"] is True
    assert incident["process"]["pid"] == pid and incident["process"]["state"] not in ("T", "t")
    assert daemon.events("worker.killed") == []
    assert daemon.value("h5watch_processes", workload="dry", state="stuck") == 1
    # Counted as a would-be kill, once, with its reason; never as a kill.
    assert daemon.value("h5watch_worker_would_kill_total", workload="dry") == 1
    assert daemon.value("h5watch_worker_would_kill_total", workload="dry", reason=event["reason"]) == 1
    assert daemon.value("h5watch_worker_kills_total", workload="dry") == 0
    # Kept across a restart, as the kills are.
    daemon.stop()
    again = daemons(state_dir, "--scan-interval", "0.3")
    assert again.value("h5watch_worker_would_kill_total", workload="dry", reason=event["reason"]) == 1
    assert again.value("h5watch_worker_kills_total", workload="dry") == 0


def test_would_kill_series_exist_only_with_dry_run(state_dir, daemons, workers, tmp_path):
    read_json_line(workers(state_dir, "count", str(tmp_path), "3", service="calm"))
    plain = daemons(state_dir, "--scan-interval", "0.3")
    assert ("h5watch_worker_kills_total", (("reason", "hold"), ("workload", "calm"))) in plain.samples()
    assert "h5watch_worker_would_kill" not in plain.metrics_text()
    plain.stop()
    dry = daemons(state_dir, "--scan-interval", "0.3", "--dry-run", "--kill-after", "60")
    assert dry.samples()[("h5watch_worker_would_kill_total", (("reason", "hold"), ("workload", "calm")))] == 0


def test_reused_pid_is_never_killed_and_bad_files_are_skipped(state_dir, daemons, workers, tmp_path):
    # A real state file, left by a worker that has exited...
    proc = workers(state_dir, "count", str(tmp_path), "5")
    report = read_json_line(proc)
    (tmp_path / "release").touch()
    assert proc.wait(20) == 0
    files = state_dir / str(os.geteuid())  # this user's subdirectory of the state dir
    [original] = [p for p in files.iterdir() if p.name.startswith(f"{report['pid']}-") and p.suffix == ".h5w"]
    data = bytearray(original.read_bytes())
    original.unlink()

    # ...rewritten to name a live process (pid reuse: same pid, other start time),
    # with a stale heartbeat and an old hold.
    import numpy as np

    from h5watch.statefile import HEADER_DTYPE, HEADER_SIZE, RECORD_DTYPE

    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        header = np.frombuffer(data, dtype=HEADER_DTYPE, count=1).copy()
        header["pid"] = bystander.pid
        header["heartbeat_unix"] = time.time() - 3600
        header["exited"] = 0
        data[:HEADER_SIZE] = header.tobytes()
        record = np.frombuffer(data, dtype=RECORD_DTYPE, count=1, offset=HEADER_SIZE).copy()
        record["held"] = 1
        record["held_since_unix"] = time.time() - 3600
        data[HEADER_SIZE : HEADER_SIZE + record.nbytes] = record.tobytes()
        forged = files / f"{bystander.pid}-{int(header['start_ticks'][0])}.h5w"
        forged.write_bytes(bytes(data))
        os.chmod(forged, 0o600)

        # Files that must be skipped, each logged once, while /metrics answers.
        (tmp_path / "elsewhere.h5w").write_bytes(bytes(data))
        (files / "1-1.h5w").symlink_to(tmp_path / "elsewhere.h5w")
        (files / "2-2.h5w").write_bytes(os.urandom(len(data)))
        (files / "3-3.h5w").write_bytes(bytes(data[: len(data) // 2]))
        foreign = files / "4-4.h5w"
        foreign.write_bytes(bytes(data))
        if os.geteuid() == 0:
            os.chown(foreign, 65534, 65534)  # owned by nobody, naming uid 0 inside

        daemon = daemons(state_dir, "--scan-interval", "0.2", "--kill-after", "1", "--grace", "0.5")
        time.sleep(2.5)
        assert bystander.poll() is None, "the daemon killed a process that reused a pid"
        assert daemon.events("worker.killed") == []
        assert not forged.exists()  # recognised as dead (folded), not as the bystander
        skipped = {Path(event["path"]).name: event["reason"] for event in daemon.events("daemon.state_file_skipped")}
        assert skipped["1-1.h5w"] == "symlink"
        assert skipped["2-2.h5w"] == "corrupt"
        assert skipped["3-3.h5w"] == "truncated"
        if os.geteuid() == 0:
            assert skipped["4-4.h5w"] == "foreign_owner"
        assert len(daemon.events("daemon.state_file_skipped")) == len(skipped)  # once each, not once a scan
        assert daemon.value("h5watch_state_file_errors_total", reason="corrupt") == 1
        assert daemon.get("/healthz")[0] == 200
        assert (files / "1-1.h5w").is_symlink() and (tmp_path / "elsewhere.h5w").exists()
    finally:
        bystander.kill()
        bystander.wait()


def test_run_appears_in_status_and_metrics_and_passes_exit_code(state_dir, daemons, tmp_path):
    script = tmp_path / "script.py"
    script.write_text(
        "import h5py, sys, time, os\n"
        "import numpy as np\n"
        "with h5py.File(sys.argv[1], 'w') as f:\n"
        "    f['v'] = np.arange(10)\n"
        "print(os.getpid(), flush=True)\n"
        "while not os.path.exists(sys.argv[2]):\n"
        "    time.sleep(0.05)\n"
        "sys.exit(3)\n"
    )
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    proc = subprocess.Popen(
        [*H5WATCH, "run", "--state-dir", str(state_dir), "--service", "scripted", "--",
         sys.executable, str(script), str(tmp_path / "f.h5"), str(tmp_path / "go")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        pid = int(proc.stdout.readline())
        wait_for(lambda: daemon.value("h5watch_lock_acquisitions_total", workload="scripted", lock="h5py.phil") > 0, 10,
                 what="the script's phil in the daemon's metrics")
        status = subprocess.run([*H5WATCH, "status", "--state-dir", str(state_dir), "--json"], capture_output=True,
                                text=True, timeout=30, cwd=REPO)
        assert status.returncode == 0, status.stderr
        import json

        [entry] = [p for p in json.loads(status.stdout)["processes"] if p["pid"] == pid]
        assert entry["workload"] == "scripted" and entry["state"] == "ok"
        assert [lock["lock"] for lock in entry["locks"]] == ["h5py.phil"]
        table = subprocess.run([*H5WATCH, "status", "--state-dir", str(state_dir)], capture_output=True, text=True,
                               timeout=30, cwd=REPO)
        assert str(pid) in table.stdout and "scripted" in table.stdout and "h5py.phil" in table.stdout
        (tmp_path / "go").touch()
        assert proc.wait(20) == 3
    finally:
        kill_group(proc)


def test_status_marks_stuck_holder(state_dir, workers):
    proc = workers(state_dir, "stuck", "-", service="stuckish")
    pid = read_json_line(proc)["pid"]
    time.sleep(1.5)
    table = subprocess.run([*H5WATCH, "status", "--state-dir", str(state_dir), "--stuck-after", "1"],
                           capture_output=True, text=True, timeout=30, cwd=REPO)
    line = [row for row in table.stdout.splitlines() if str(pid) in row][0]
    assert "STUCK" in line
    assert "held by stuck-holder" in table.stdout and "1 waiting (MainThread)" in table.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["daemon", "--listen", "nowhere"], "--listen"),
        (["daemon", "--scan-interval", "soon"], "--scan-interval"),
        (["daemon", "--kill-after", "-3"], "--kill-after"),
        (["run", "--on-orphan", "explode", "--", "true"], "on_orphan"),
        (["status", "--stuck-after", "0"], "--stuck-after"),
        (["status", "--kill-after", "-3"], "--kill-after"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, state_dir):
    result = subprocess.run([*H5WATCH, *args], capture_output=True, text=True, timeout=30, cwd=REPO,
                            env={**os.environ, "H5WATCH_STATE_DIR": str(state_dir)})
    assert result.returncode == 2, result
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr


def test_symlinked_state_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    for args in (["daemon", "--state-dir", str(link)], ["status", "--state-dir", str(link)]):
        result = subprocess.run([*H5WATCH, *args], capture_output=True, text=True, timeout=30, cwd=REPO)
        assert result.returncode == 2 and "symlink" in result.stderr, (args, result)
        assert len(result.stderr.strip().splitlines()) == 1
    # run does not start the command unmonitored: one line, exit 2.
    result = subprocess.run([*H5WATCH, "run", "--state-dir", str(link), "--", "sh", "-c", "exit 3"], capture_output=True,
                            text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2 and "symlink" in result.stderr and "error" in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1
    assert list(real.iterdir()) == []


def test_status_of_a_missing_state_dir_says_so(tmp_path):
    result = subprocess.run([*H5WATCH, "status", "--state-dir", str(tmp_path / "typo")], capture_output=True, text=True,
                            timeout=30, cwd=REPO)
    assert result.returncode == 2 and "does not exist" in result.stderr, result
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_the_daemon_makes_a_missing_state_dir_but_never_its_parents(tmp_path):
    typo = tmp_path / "typo"
    result = subprocess.run([*H5WATCH, "daemon", "--state-dir", str(typo / "deep" / "dir"), "--listen", "127.0.0.1:0"],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 2, result
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert f"its parent '{typo / 'deep'}' does not exist" in result.stderr
    assert not typo.exists()
    # The state dir itself, when its parent exists, is made (and the daemon runs).
    daemon = DaemonProcess(tmp_path / "fresh", tmp_path / "daemon.log", "--scan-interval", "0.2")
    try:
        assert (tmp_path / "fresh" / str(os.geteuid())).is_dir()
    finally:
        assert daemon.stop() == 0


def test_sighup_keeps_the_totals_of_exited_workers(state_dir, daemons, workers, tmp_path):
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    proc = workers(state_dir, "count", str(tmp_path), "7", service="hup")
    pid = read_json_line(proc)["pid"]
    (tmp_path / "release").touch()
    assert proc.wait(20) == 0
    wait_for(lambda: not any(name.startswith(f"{pid}-") for name in os.listdir(state_dir / str(os.geteuid()))), 15,
             what="the exited worker folded")
    assert daemon.value("h5watch_lock_acquisitions_total", workload="hup", lock="app.x") == 7
    daemon.proc.send_signal(signal.SIGHUP)
    assert daemon.proc.wait(10) == 0, daemon.log_text()
    again = daemons(state_dir, "--scan-interval", "0.2")
    assert again.value("h5watch_lock_acquisitions_total", workload="hup", lock="app.x") == 7


def test_run_instruments_children_and_keeps_an_existing_sitecustomize(state_dir, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import os\nos.environ['ORIGINAL_SITECUSTOMIZE_RAN'] = '1'\n")
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, subprocess, sys\n"
        "import h5watch\n"
        "child = subprocess.run([sys.executable, '-c', 'import h5watch, os; "
        "print(h5watch.is_installed(), os.environ.get(\"ORIGINAL_SITECUSTOMIZE_RAN\"))'],\n"
        "                       capture_output=True, text=True, check=True)\n"
        "print(h5watch.is_installed(), os.environ.get('ORIGINAL_SITECUSTOMIZE_RAN'), child.stdout.strip())\n"
    )
    result = subprocess.run(
        [*H5WATCH, "run", "--state-dir", str(state_dir), "--", sys.executable, str(script)],
        capture_output=True, text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(site)},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "1", "True", "1"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_daemon_exits_cleanly_on_sigterm_sigint_and_sighup(state_dir, tmp_path, signum):
    daemon = DaemonProcess(state_dir, tmp_path / "daemon.log", "--scan-interval", "0.2")
    daemon.proc.send_signal(signum)
    assert daemon.proc.wait(10) == 0, daemon.log_text()
    [stopped] = daemon.events("daemon.stopped")
    assert stopped["signal"] == signal.Signals(signum).name and stopped["totals_saved"] is True
    assert "Traceback" not in daemon.log_text()
    assert (state_dir / str(os.geteuid()) / "h5watch-daemon.json").exists()  # totals saved on the way out
    daemon.stop()
