"""Stacks read from outside before a kill, and the incident file each kill leaves."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from daemon_support import read_json_line, wait_for

pytestmark = pytest.mark.timeout(120)
pytest.importorskip("pystack")


def incidents_of(state_dir: Path) -> list[Path]:
    return sorted((state_dir / str(os.geteuid()) / "incidents").glob("*.json"))


def test_a_worker_frozen_in_c_holding_the_gil_is_killed_with_its_native_stack(state_dir, daemons, workers):
    daemon = daemons(state_dir, "--scan-interval", "0.3", "--kill-after", "1.5", "--grace", "1")
    proc = workers(state_dir, "gil", "-", service="frozen")
    pid = read_json_line(proc)["pid"]
    returncode = wait_for(lambda: proc.poll(), 30, what="the frozen worker to be killed")
    assert returncode in (-signal.SIGTERM, -signal.SIGKILL)
    [killed] = daemon.events("worker.killed")
    assert killed["worker_pid"] == pid and killed["stacks_source"] == "pystack"
    incident = json.loads(Path(killed["incident_file"]).read_text())
    assert incident["process"]["pid"] == pid and incident["process"]["workload"] == "frozen"
    assert incident["process"]["cmdline"][-2:] == ["gil", "-"]
    recorder = incident["recorder"]
    assert recorder["reason"] is None and recorder["entries"], recorder
    hold = [e for e in recorder["entries"] if e["kind"] == "hold" and e["lock"] == "app.x"]
    wait = [e for e in recorder["entries"] if e["kind"] == "wait" and e["lock"] == "app.x"]
    assert hold and hold[-1]["thread_name"] == "gil-holder" and hold[-1]["duration_seconds"] >= 0.09, recorder
    assert wait and wait[-1]["thread_name"] == "MainThread" and "gil-holder" in wait[-1]["operation"], recorder
    assert killed["recorder"] == recorder["entries"][-10:]  # the kill's evidence: the newest entries
    [holder] = [t for t in incident["threads"] if t["holds_gil"]]
    assert incident["gil_holder_native_id"] == holder["native_id"]
    assert holder["thread_name"] == "gil-holder"
    assert holder["python_frames"][-1]["function"] == "hold_the_gil_in_c"
    assert {"sleep", "nanosleep", "clock_nanosleep"} & {f["symbol"].split("@")[0].lstrip("_") for f in holder["native_frames"]}
    assert incident["holder"]["thread_name"] == "gil-holder" and incident["state_file"]["present"]
    assert not daemon.events("worker.spared_stopped")  # pystack's own trace is not a debugger


def test_a_sigstopped_worker_killed_with_kill_stopped_has_an_incident(state_dir, daemons, workers):
    daemon = daemons(state_dir, "--scan-interval", "0.3", "--kill-after", "1.5", "--grace", "1", "--kill-stopped")
    proc = workers(state_dir, "stuck", "-", service="stopped")
    pid = read_json_line(proc)["pid"]
    time.sleep(0.6)
    os.kill(pid, signal.SIGSTOP)
    assert wait_for(lambda: proc.poll(), 30, what="the stopped worker to be killed") in (-signal.SIGTERM, -signal.SIGKILL)
    [killed] = daemon.events("worker.killed")
    incident = json.loads(Path(killed["incident_file"]).read_text())
    assert incident["process"]["state"] in ("T", "t")
    if incident["stacks_source"] != "pystack":
        assert "stopped" in incident["unavailable"]["faulthandler"]
    assert incident["holder"]["thread_name"] == "stuck-holder"


def test_a_worker_whose_state_file_is_gone_is_killed_and_the_evidence_says_so(state_dir, workers, tmp_path):
    from h5watch.host import reaper
    from h5watch.host.incidents import IncidentStore
    from h5watch.statedir import open_user_dir
    from h5watch.statefile import read_state_file

    proc = workers(state_dir, "stuck", "-", service="gone")
    pid = read_json_line(proc)["pid"]
    [path] = wait_for(lambda: list((state_dir / str(os.geteuid())).glob(f"{pid}-*.h5w")), 10, what="the state file")
    state = read_state_file(str(path))
    path.unlink()
    Path(state.stacks_path).unlink()
    store = IncidentStore(open_user_dir(str(tmp_path / "daemon"), parents=False), keep=5)
    counted = []
    reaper.kill_worker(state, "hold", None, kill_after=1.0, grace=1.0, dry_run=False, count_kill=lambda: counted.append(1),
                       incidents=store, stacks_timeout=5)
    assert counted == [1]
    assert wait_for(lambda: proc.poll(), 10, what="the worker to die") in (-signal.SIGTERM, -signal.SIGKILL)
    [incident_path] = (tmp_path / "daemon" / str(os.geteuid()) / "incidents").glob("*.json")
    incident = json.loads(incident_path.read_text())
    assert incident["state_file"]["present"] is False and "gone" in incident["state_file"]["note"]
    assert incident["stacks_source"] == "pystack"  # read from outside all the same


def test_faulthandler_is_the_fallback_and_says_why(state_dir, workers):
    from h5watch.host import outside, reaper
    from h5watch.statefile import read_state_file

    proc = workers(state_dir, "stuck", "-", service="fallback")
    pid = read_json_line(proc)["pid"]
    [path] = wait_for(lambda: list((state_dir / str(os.geteuid())).glob(f"{pid}-*.h5w")), 10, what="the state file")
    state = read_state_file(str(path))
    pidfd = reaper.open_verified(state)
    assert pidfd is not None
    try:
        stacks = outside.read_stacks(pid, lambda: reaper.faulthandler_stacks(state, pidfd), use_pystack=True, timeout=0.001)
    finally:
        os.close(pidfd)
    assert stacks.source == "faulthandler" and "hold_forever" in stacks.text
    assert "no answer within" in stacks.unavailable["pystack"]
    none = outside.read_stacks(pid, None, use_pystack=False)
    assert none.source == "state_file" and set(none.unavailable) == {"pystack", "faulthandler"}


def test_incident_files_are_bounded_oldest_first_in_a_private_directory(tmp_path):
    from h5watch.host.incidents import IncidentStore
    from h5watch.statedir import open_user_dir

    store = IncidentStore(open_user_dir(str(tmp_path / "d"), parents=False), keep=3)
    written = [store.write({"n": i}, 1000 + i, i) for i in range(5)]
    directory = tmp_path / "d" / str(os.geteuid()) / "incidents"
    assert sorted(p.name for p in directory.iterdir()) == [os.path.basename(p) for p in written[2:]]
    assert [json.loads(Path(p).read_text())["n"] for p in written[2:]] == [2, 3, 4]
    assert directory.stat().st_mode & 0o777 == 0o700
    assert IncidentStore(store.own_dir, keep=0).write({}, 1, 1) is None


def test_a_symlinked_incidents_directory_is_never_written_through(tmp_path):
    from h5watch.host.incidents import IncidentStore
    from h5watch.statedir import open_user_dir

    own = open_user_dir(str(tmp_path / "d"), parents=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    os.symlink(elsewhere, os.path.join(own.path, "incidents"))
    assert IncidentStore(own).write({"n": 1}, 1, 1) is None
    assert list(elsewhere.iterdir()) == []


def test_the_daemon_keeps_incidents_keep_files_and_refuses_a_bad_count(state_dir, daemons, workers):
    from daemon_support import H5WATCH

    daemon = daemons(state_dir, "--scan-interval", "0.3", "--kill-after", "1", "--grace", "0.5", "--incidents-keep", "1")
    procs = [workers(state_dir, "stuck", "-", service=f"kept-{n}") for n in range(2)]
    for proc in procs:
        read_json_line(proc)
    for proc in procs:
        wait_for(lambda proc=proc: proc.poll(), 30, what="the stuck worker to be killed")
    killed = wait_for(lambda: len(daemon.events("worker.killed")) == 2 and daemon.events("worker.killed"), 10,
                      what="two worker.killed")
    assert all(event["incident_file"] for event in killed)
    assert [path.name for path in incidents_of(state_dir)] == [max(os.path.basename(e["incident_file"]) for e in killed)]
    for bad in ("-1", "many", "1.5", ""):
        out = subprocess.run([*H5WATCH, "daemon", "--state-dir", str(state_dir), "--incidents-keep", bad],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "--incidents-keep" in out.stderr, out.stderr


def test_a_pystack_read_cut_off_at_its_timeout_leaves_the_process_running(state_dir, workers):
    # The reader is killed wherever its timeout falls, mid-attach or mid-read
    # included: the kernel detaches a dead tracer's tracees, and pystack's
    # seize stops them without a SIGSTOP that could outlive it.
    from h5watch.host import outside

    pytest.importorskip("pystack")
    proc = workers(state_dir, "stuck", "-", service="cut")
    pid = read_json_line(proc)["pid"]
    started = time.monotonic()
    threads, why = outside.pystack_threads(pid, native=True, timeout=10)
    whole_read = time.monotonic() - started
    assert threads is not None, why
    cut = 0
    for step in range(12):
        threads, why = outside.pystack_threads(pid, native=True, timeout=whole_read * (0.4 + 0.05 * step))
        cut += threads is None
        time.sleep(0.05)
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status)
        assert fields["State"].split()[0] in ("S", "R"), fields["State"]
        assert fields["TracerPid"].strip() == "0"
    assert cut, "no read was cut off"
    assert proc.poll() is None
