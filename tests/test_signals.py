"""The daemon signals only a process that is provably instrumented now, and
``--dry-run`` signals nothing: real daemons, real instrumented processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from daemon_support import free_port, kill_group, read_json_line, start_worker, wait_for

from h5watch.statefile import DUMP_SIGNAL

pytestmark = pytest.mark.timeout(90)

# An instrumented Python whose thread holds a WatchedLock for good (so the
# daemon finds it stuck once --kill-after has passed), once its own state
# file records the hold. Then, by MODE:
#   exec    execv's /bin/sleep through libc (no Python code runs on the way):
#           same pid, start time and uid, but no longer the instrumented program;
#   daemon  starts `h5watch daemon ARGS...` as its own child: the daemon's parent
#           is a live, stuck-looking instrumented process;
#   killer  runs the daemon's kill path in itself against forged targets: its
#           own state file (pid = itself) and the same file naming other pids;
#   hang_at_exit  exits on SIGTERM, and hangs in an exit handler that runs after
#           h5watch's own, which has unmapped the state file by then.
INSTRUMENTED = r"""
import ctypes, json, os, subprocess, sys, threading, time
import h5watch
from h5watch.statefile import read_state_file

mode, state_dir = sys.argv[1], sys.argv[2]
if mode == "hang_at_exit":
    import atexit, signal
    atexit.register(threading.Event().wait)  # before install(): runs after h5watch's
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
h5watch.install(state_dir=state_dir, service="signals-" + mode, log_level="warning")
lock = h5watch.WatchedLock("app.x")
held = threading.Event()

def hold_forever():
    with lock:
        held.set()
        time.sleep(3600)

threading.Thread(target=hold_forever, name="stuck-holder", daemon=True).start()
held.wait(10)
path = None
deadline = time.monotonic() + 20
while path is None:
    path = h5watch.snapshot()["state"]["path"]
    try:
        if path is None or not any(lock["holder"] for lock in read_state_file(path).locks()):
            path = None
    except Exception:
        path = None
    if time.monotonic() > deadline:
        sys.exit("the state file never recorded the hold")
    time.sleep(0.05)

def emit(**fields):
    os.write(1, (json.dumps(fields) + "\n").encode())

if mode == "exec":
    emit(pid=os.getpid(), state_file=path)
    argv = (ctypes.c_char_p * 3)(b"/bin/sleep", b"60", None)
    ctypes.CDLL(None).execv(b"/bin/sleep", argv)
    sys.exit("execv failed")

if mode == "daemon":
    daemon = subprocess.Popen([sys.executable, "-m", "h5watch", "daemon", *sys.argv[3:]])
    emit(pid=os.getpid(), daemon=daemon.pid)
    daemon.wait()
    sys.exit(0)

if mode == "killer":
    from h5watch.host import reaper as killer

    class NamingPid:
        # The real state file of this process, naming another pid.
        def __init__(self, state, pid):
            self._state, self.pid = state, pid
        def __getattr__(self, name):
            return getattr(self._state, name)

    state = read_state_file(path)
    counted = []
    for pid in (os.getpid(), os.getppid(), 1, 0, -1):
        target = state if pid == os.getpid() else NamingPid(state, pid)
        killer.kill_worker(target, "hold", None, kill_after=1.0, grace=0.5, dry_run=False,
                           count_kill=lambda: counted.append(pid))
    emit(counted=counted, alive=True)
    sys.exit(0)

if mode == "hang_at_exit":
    emit(pid=os.getpid())
    threading.Event().wait()
"""


@pytest.fixture
def processes():
    """Start processes in sessions of their own; every one is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(*args: str, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("stderr", subprocess.PIPE)
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        kill_group(proc)


def instrumented(processes, tmp_path: Path, mode: str, state_dir: Path, *args: str, **kwargs) -> subprocess.Popen:
    script = tmp_path / "instrumented.py"
    script.write_text(INSTRUMENTED)
    return processes(sys.executable, str(script), mode, str(state_dir), *args, **kwargs)


def catches(pid: int, signum: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        mask = next(line.split()[1] for line in status if line.startswith("SigCgt:"))
    return bool(int(mask, 16) >> (signum - 1) & 1)


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


FAST = ("--scan-interval", "0.2", "--kill-after", "1", "--grace", "0.5")


@pytest.mark.parametrize("dry_run", [False, True], ids=["kill", "dry-run"])
def test_instrumented_python_that_exec_ed_sleep_is_not_signalled(state_dir, daemons, processes, tmp_path, dry_run):
    proc = instrumented(processes, tmp_path, "exec", state_dir)
    pid = read_json_line(proc)["pid"]
    # Same pid, start time and uid as its state file says; no mapping of it any more.
    wait_for(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == "sleep", 10, what="the exec")
    assert not catches(pid, DUMP_SIGNAL)
    # The daemon starts only now: one scanning before the exec may judge the
    # still instrumented process stuck and then, rightly, refuse to signal
    # what it has become (daemon.refused_signal), which is not this test's case.
    daemon = daemons(state_dir, *FAST, *(["--dry-run"] if dry_run else []))

    # Its lock record looks stuck, but the process is not the instrumented one
    # any more: the daemon does not judge it (so it neither signals nor tries
    # to), and exports it as a process whose counts are still live.
    wait_for(lambda: daemon.value("h5watch_processes", state="ok") >= 1, 15, what="the exec'd process seen")
    deadline = time.monotonic() + 4.0  # well past --kill-after, many scans
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the exec'd sleep died: {proc.returncode}\n{daemon.log_text()[-3000:]}"
        time.sleep(0.1)
    assert daemon.events("daemon.refused_signal") == []
    assert daemon.events("worker.killed") == [] and daemon.events("worker.would_kill") == []
    assert daemon.value("h5watch_worker_kills_total") == 0
    assert daemon.value("h5watch_processes", state="stuck") == 0
    # And were it judged, the kill path itself would refuse it.
    from h5watch.host.reaper import why_not_signal
    from h5watch.statefile import read_state_file

    [path] = list(state_dir.rglob(f"{pid}-*.h5w"))
    assert "does not map its state file" in (why_not_signal(read_state_file(str(path))) or "")


@pytest.mark.timeout(60)
def test_dry_run_sends_no_signal_at_all(state_dir, daemons):
    daemon = daemons(state_dir, *FAST, "--dry-run")
    proc = start_worker(state_dir, "stuck", "-", service="dry")
    try:
        pid = read_json_line(proc)["pid"]
        [stacks_file] = wait_for(lambda: list(state_dir.rglob(f"{pid}-*.stacks")), 10, what="the stacks file")
        assert catches(pid, DUMP_SIGNAL)  # a dump signal would write its stacks there
        [event] = wait_for(lambda: daemon.events("worker.would_kill"), 15, what="worker.would_kill")
        assert event["worker_pid"] == pid and event["holder"]["thread_name"] == "stuck-holder"
        # No signal: the stacks are pystack's (read without stopping it), or none.
        assert event["stacks_source"] in ("pystack", "state_file"), event
        if event["stacks_source"] == "state_file":
            assert event["stacks_unavailable"]["faulthandler"] == "no signal sent (dry run)"
        deadline = time.monotonic() + 1.5  # several more scans
        while time.monotonic() < deadline:
            assert proc.poll() is None
            time.sleep(0.1)
        assert stacks_file.stat().st_size == 0, stacks_file.read_text()
        assert daemon.events("worker.killed") == []
        assert daemon.value("h5watch_worker_kills_total") == 0
        assert daemon.value("h5watch_processes", workload="dry", state="stuck") == 1
    finally:
        kill_group(proc)


def test_daemon_never_signals_its_stuck_instrumented_parent(state_dir, processes, tmp_path):
    log_path = tmp_path / "daemon.log"
    port = free_port()
    with open(log_path, "wb") as log:
        proc = instrumented(processes, tmp_path, "daemon", state_dir, "--state-dir", str(state_dir), "--listen",
                            f"127.0.0.1:{port}", *FAST, stderr=log)
    started = read_json_line(proc)
    parent = started["pid"]

    def refusals() -> list[dict]:
        return [e for e in json_lines(log_path.read_text(errors="replace"))
                if e.get("event") == "daemon.refused_signal" and e["worker_pid"] == parent]

    [refused] = wait_for(refusals, 20, what="daemon.refused_signal for the daemon's parent")
    assert refused["reason"] == "pid is the daemon's parent"
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the daemon's parent died: {proc.returncode}\n{log_path.read_text()[-3000:]}"
        time.sleep(0.1)
    assert len(refusals()) == 1
    events = {e.get("event") for e in json_lines(log_path.read_text(errors="replace"))}
    assert "worker.killed" not in events
    os.kill(started["daemon"], signal.SIGTERM)  # the daemon exits; its parent then does too
    assert proc.wait(15) == 0


def test_kill_path_refuses_itself_its_parent_pid_1_and_process_groups(state_dir, processes, tmp_path):
    proc = instrumented(processes, tmp_path, "killer", state_dir)
    report = read_json_line(proc)
    assert proc.wait(15) == 0, proc.stderr.read()
    assert report == {"counted": [], "alive": True}
    reasons = {e["worker_pid"]: e["reason"] for e in json_lines(proc.stderr.read()) if e.get("event") == "daemon.refused_signal"}
    assert reasons == {
        proc.pid: "pid is the daemon itself",
        os.getpid(): "pid is the daemon's parent",
        1: "pid 1 is init",
        0: "pid 0 is not a single process",
        -1: "pid -1 is not a single process",
    }


def test_worker_that_unmaps_its_file_while_exiting_on_sigterm_still_gets_sigkill(state_dir, daemons, processes, tmp_path):
    daemon = daemons(state_dir, *FAST)
    proc = instrumented(processes, tmp_path, "hang_at_exit", state_dir)
    pid = read_json_line(proc)["pid"]
    assert wait_for(lambda: proc.poll(), 20, what="the worker to be killed") == -signal.SIGKILL
    [killed] = daemon.events("worker.killed")
    assert killed["worker_pid"] == pid and killed["holder"]["thread_name"] == "stuck-holder"
    assert "hold_forever" in killed["stacks"]
    assert [e["worker_pid"] for e in daemon.events("worker.sigkilled")] == [pid]
    assert daemon.events("daemon.refused_signal") == []
