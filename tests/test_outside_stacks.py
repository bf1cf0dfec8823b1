"""Stacks read from outside before a kill (pystack, else the faulthandler
dump, else the state file alone) and the incident file each kill leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from daemon_support import kill_group, read_json_line, start_worker, wait_for

from h5watch.host import incidents, reaper
from h5watch.statefile import read_state_file

pytestmark = pytest.mark.timeout(120)

NATIVE_SLEEP = ("sleep", "nanosleep", "clock_nanosleep")


@pytest.fixture
def workers():
    started: list[subprocess.Popen] = []

    def start(*args, **kwargs) -> subprocess.Popen:
        proc = start_worker(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        kill_group(proc)


def incident_of(daemon, pid: int) -> dict:
    [killed] = [event for event in daemon.events("worker.killed") if event["worker_pid"] == pid]
    path = killed["incident_file"]
    assert path and os.path.dirname(path).endswith(os.path.join(str(os.geteuid()), "incidents")), killed
    return json.loads(Path(path).read_text())


def state_file_of(state_dir: Path, pid: int) -> Path:
    [path] = (state_dir / str(os.geteuid())).glob(f"{pid}-*.h5w")
    return path


def test_gil_held_in_c_worker_is_killed_and_its_incident_names_the_gil_holder_in_sleep(state_dir, daemons, workers):
    kill_after, scan, grace = 2.0, 0.5, 1.0
    daemon = daemons(state_dir, "--scan-interval", str(scan), "--kill-after", str(kill_after), "--grace", str(grace))
    proc = workers(state_dir, "gil", "-", service="gil")
    pid = read_json_line(proc)["pid"]
    returncode = wait_for(lambda: proc.poll(), kill_after + scan + grace + 15, what="the GIL-holding worker to be killed")
    assert returncode in (-signal.SIGTERM, -signal.SIGKILL)

    incident = incident_of(daemon, pid)
    assert incident["event"] == "worker.killed" and incident["dry_run"] is False
    assert incident["process"]["pid"] == pid and incident["process"]["uid"] == os.geteuid()
    assert incident["process"]["workload"] == "gil" and "worker.py" in " ".join(incident["process"]["cmdline"])
    assert incident["process"]["exe"] and incident["process"]["start_ticks"]
    assert incident["stacks_source"] == "pystack", incident["unavailable"]
    holder = [thread for thread in incident["threads"] if thread["holds_gil"]]
    assert len(holder) == 1 and holder[0]["native_id"] == incident["gil_holder_native_id"]
    assert holder[0]["thread_name"] == "gil-holder"
    assert any(frame["function"] == "hold_the_gil_in_c" for frame in holder[0]["python_frames"])
    assert any(frame["symbol"] in NATIVE_SLEEP for frame in holder[0]["native_frames"]), holder[0]["native_frames"]
    # The lock evidence of the state file, and the recorder's place.
    [lock] = [lock for lock in incident["state_file"]["locks"] if lock["lock"] == "app.x"]
    assert lock["holder"]["thread_name"] == "gil-holder"
    assert incident["state_file"]["present"] is True
    assert incident["recorder"] == {"entries": None, "reason": "no flight recorder in this version"}
    # The heartbeat stopped: the in-process watchdog could not run.
    assert incident["state_file"]["heartbeat_age_seconds"] >= kill_after


def test_sigstopped_worker_incident_says_faulthandler_could_not_run(state_dir, daemons, workers):
    kill_after, scan, grace = 2.0, 0.5, 1.0
    daemon = daemons(state_dir, "--scan-interval", str(scan), "--kill-after", str(kill_after), "--grace", str(grace),
                     "--kill-stopped")
    proc = workers(state_dir, "stuck", "-", service="frozen")
    pid = read_json_line(proc)["pid"]
    time.sleep(0.6)
    os.kill(pid, signal.SIGSTOP)
    returncode = wait_for(lambda: proc.poll(), kill_after + scan + grace + 15, what="the stopped worker to be killed")
    assert returncode in (-signal.SIGTERM, -signal.SIGKILL)
    incident = incident_of(daemon, pid)
    assert incident["process"]["state"] in ("T", "t")
    if incident["stacks_source"] == "pystack":
        assert any(thread["thread_name"] == "stuck-holder" for thread in incident["threads"])
    else:
        assert "stopped" in incident["unavailable"]["faulthandler"], incident["unavailable"]


def test_kill_after_the_state_file_is_gone_says_so(state_dir, workers, tmp_path):
    proc = workers(state_dir, "stuck", "-", service="gone")
    pid = read_json_line(proc)["pid"]
    time.sleep(0.6)
    path = state_file_of(state_dir, pid)
    state = read_state_file(str(path))
    path.unlink()
    Path(state.stacks_path).unlink()
    store = incidents.IncidentStore(reaper_own_dir(tmp_path), keep=10)
    killed: list[bool] = []
    reaper.kill_worker(state, "stale_heartbeat", None, kill_after=1.0, grace=1.0, dry_run=False,
                       count_kill=lambda: killed.append(True), incidents=store)
    assert killed == [True]
    assert wait_for(lambda: proc.poll(), 10, what="the worker to be killed") in (-signal.SIGTERM, -signal.SIGKILL)
    [name] = os.listdir(store.path)
    incident = json.loads((Path(store.path) / name).read_text())
    assert incident["state_file"]["present"] is False and "gone" in incident["state_file"]["note"]
    # Its last read is still the evidence.
    assert incident["state_file"]["locks"] and incident["process"]["pid"] == pid


def test_sources_fall_back_and_say_why(state_dir, workers, tmp_path):
    from h5watch.host import outside

    proc = workers(state_dir, "stuck", "-", service="fallback")
    pid = read_json_line(proc)["pid"]
    time.sleep(0.6)
    state = read_state_file(str(state_file_of(state_dir, pid)))
    pidfd = reaper.open_verified(state)
    assert pidfd is not None
    try:
        via_faulthandler = outside.read_stacks(pid, lambda: reaper.faulthandler_stacks(state, pidfd), use_pystack=False)
    finally:
        os.close(pidfd)
    assert via_faulthandler.source == "faulthandler" and "hold_forever" in via_faulthandler.text
    assert via_faulthandler.unavailable == {"pystack": "not asked for"}
    alone = outside.read_stacks(pid, None, use_pystack=True, timeout=0.001, no_signal="no signal wanted")
    assert alone.source == "state_file"
    assert "no answer within" in alone.unavailable["pystack"] and alone.unavailable["faulthandler"] == "no signal wanted"


def reaper_own_dir(tmp_path: Path):
    from h5watch.statedir import open_user_dir

    base = tmp_path / "own"
    base.mkdir(mode=0o700)
    return open_user_dir(str(base))


def test_incident_files_are_bounded_oldest_first_and_private(tmp_path):
    store = incidents.IncidentStore(reaper_own_dir(tmp_path), keep=3)
    written = []
    for n in range(5):
        path = store.write({"n": n}, pid=1000 + n, start_ticks=n)
        assert path is not None
        written.append(os.path.basename(path))
        time.sleep(0.002)
    assert sorted(os.listdir(store.path)) == written[-3:]
    assert os.stat(store.path).st_mode & 0o777 == 0o700
    assert [json.loads((Path(store.path) / name).read_text())["n"] for name in sorted(os.listdir(store.path))] == [2, 3, 4]
    assert incidents.IncidentStore(store.own_dir, keep=0).write({"n": 9}, pid=1, start_ticks=1) is None


def test_incident_dir_that_is_a_symlink_is_refused_and_the_kill_not_blocked(tmp_path):
    own = reaper_own_dir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, os.path.join(own.path, incidents.INCIDENTS_DIR))
    assert incidents.IncidentStore(own, keep=3).write({"n": 1}, pid=1, start_ticks=1) is None
    assert os.listdir(elsewhere) == []
