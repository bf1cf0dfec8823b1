"""The flight recorder: notable lock events in each process's state file,
written without a lock, read from outside (torn entries never), its own in
each forked child; on both implementations."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import REPO, run_python
from daemon_support import H5WATCH, read_json_line

from h5watch import recorder
from h5watch.process import implementation
from h5watch.schema import RECORDER_ENTRIES
from h5watch.statefile import RECORDER_OFFSET, StateWriter, read_recorder, read_state_file

pytestmark = pytest.mark.timeout(120)

IMPLEMENTATIONS = ["python", "compiled"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation_env(request) -> dict[str, str]:
    if request.param == "compiled" and implementation.compiled_core is None:
        pytest.skip("the compiled core is not built here")
    return {"H5WATCH_IMPLEMENTATION": request.param}


def entries_of(state_dir: Path, pid: int) -> list[dict]:
    [path] = (state_dir / str(os.geteuid())).glob(f"{pid}-*.h5w")
    return read_recorder(read_state_file(str(path)))


CHILD_PRELUDE = """
import json, os, sys, threading, time
import h5watch
h5watch.install(state_dir=sys.argv[1], recorder_threshold=0.02, log_level="critical")
import h5py
from h5watch.process import lock as lock_module
app = h5watch.WatchedLock("app.rec")
def emit(**fields):
    os.write(1, (json.dumps(fields) + "\\n").encode())
"""


def test_a_blocked_wait_and_a_long_hold_are_recorded_and_short_ones_are_not(state_dir, implementation_env, h5_file):
    code = CHILD_PRELUDE + """
taken = threading.Event()
def holder():
    app.acquire_for("load-config")
    taken.set()
    time.sleep(0.15)
    app.release()
t = threading.Thread(target=holder, name="slow-holder")
t.start()
taken.wait(10)
with app:  # waits about 0.15 s
    pass
t.join()
for _ in range(200):  # short holds and no waits: nothing recorded
    with app:
        pass
with h5py.File(sys.argv[2], "r") as f:
    f["values"][:]
emit(pid=os.getpid(), implementation=lock_module.IMPLEMENTATION, main=threading.get_native_id(),
     holder=t.native_id, in_process=h5watch.snapshot()["recorder"]["entries"])
"""
    result = run_python(code, args=[str(state_dir), str(h5_file)], env=implementation_env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["implementation"] == implementation_env["H5WATCH_IMPLEMENTATION"]
    entries = entries_of(state_dir, report["pid"])
    assert entries == report["in_process"]  # the file's ring is the process's
    assert [e["kind"] for e in entries] == ["hold", "wait"], entries  # the hold ends first, then the wait
    hold, wait = entries
    assert hold["lock"] == "app.rec" and hold["operation"] == "load-config"
    assert hold["thread_name"] == "slow-holder" and hold["thread_native_id"] == report["holder"]
    assert 0.14 <= hold["duration_seconds"] < 5 and hold["waiters"] == 1
    assert wait["lock"] == "app.rec" and wait["thread_name"] == "MainThread"
    assert wait["thread_native_id"] == report["main"]
    assert wait["operation"] == "behind 'slow-holder' in load-config"
    assert 0.1 <= wait["duration_seconds"] < 5
    assert wait["seq"] == hold["seq"] + 1 and wait["time_unix"] >= hold["time_unix"]


def test_wrap_around_keeps_the_newest_entries_in_order(state_dir):
    writer = StateWriter(str(state_dir), "ring", 0, 0.5)
    try:
        ring = recorder.Ring(writer.recorder_region())
        total = 3 * RECORDER_ENTRIES + 7
        for n in range(total):
            ring.write("hold", n, 1.0 + n, 100 + n, f"t{n}", "app.ring", f"op-{n}", n * 1000, n)
        entries = read_recorder(read_state_file(writer.path))
        assert len(entries) == RECORDER_ENTRIES
        assert [e["seq"] for e in entries] == list(range(total - RECORDER_ENTRIES, total))
        assert all(e["operation"] == f"op-{e['seq']}" and e["waiters"] == e["seq"] and e["thread_name"] == f"t{e['seq']}"
                   for e in entries)
        assert [e["seq"] for e in read_recorder(read_state_file(writer.path), 5)] == list(range(total - 5, total))
    finally:
        writer.close()


def test_a_ring_moved_into_a_file_keeps_its_last_lap_in_order_after_what_the_file_held(state_dir):
    """The ring kept before a process's state file exists moves into it: its
    newest entries (a lap at most, whole ones only, in order); into a new
    file without reading it, into an adopted one after the entries it has."""
    private = recorder.Ring()
    total = RECORDER_ENTRIES + 37
    for n in range(total):
        private.write("hold", n, 1.0 + n, 7, "t", "app.move", f"op-{n}", n, n)
    # The newest entry as a writer frozen in its middle leaves it: odd sequence word.
    at = recorder.HEADER_BYTES + ((total - 1) % RECORDER_ENTRIES) * recorder.ENTRY_BYTES
    recorder.store_seq(private._buffer, at, 2 * (total - 1) + 1)
    writer = StateWriter(str(state_dir), "move", 0, 0.5)
    try:
        assert not writer.adopted
        moved = private.moved_to(writer.recorder_region(), 0, empty=True)
        kept = [e["operation"] for e in read_recorder(read_state_file(writer.path))]
        assert kept == [f"op-{n}" for n in range(total - RECORDER_ENTRIES, total - 1)]
        moved.write("wait", 0, 1.0, 7, "t", "app.move", "after", 0, 0)
        # A region that already holds entries (a file adopted after exec()) goes on after them.
        again = recorder.Ring()
        again.write("fork", 0, 1.0, 7, "t", None, "adopted", 0, 0)
        again.moved_to(writer.recorder_region(), 0)
        entries = read_recorder(read_state_file(writer.path))
        assert [e["operation"] for e in entries[-3:]] == [f"op-{total - 2}", "after", "adopted"]
        assert [e["seq"] for e in entries] == sorted(e["seq"] for e in entries)
    finally:
        writer.close()


def test_a_torn_entry_is_never_read(state_dir):
    writer = StateWriter(str(state_dir), "torn", 0, 0.5)
    try:
        ring = recorder.Ring(writer.recorder_region())
        for n in range(10):
            ring.write("wait", n, 1.0 + n, 1, "t", "app.torn", f"op-{n}", n, n)
        # Entry 4 as a writer frozen (or killed) in its middle leaves it: an
        # odd sequence word, half of a new body.
        at = RECORDER_OFFSET + recorder.HEADER_BYTES + 4 * recorder.ENTRY_BYTES
        fd = os.open(writer.path, os.O_RDWR)
        try:
            os.pwrite(fd, (2 * 14 + 1).to_bytes(8, "little"), at)
            os.pwrite(fd, b"\xff" * 100, at + 8)
        finally:
            os.close(fd)
        entries = read_recorder(read_state_file(writer.path))
        assert [e["seq"] for e in entries] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
        assert all(e["operation"] == f"op-{e['seq']}" for e in entries)
    finally:
        writer.close()


def test_entries_read_while_they_are_written_are_whole(state_dir):
    """A reader racing a writer thread sees each entry whole or not at all."""
    writer = StateWriter(str(state_dir), "race", 0, 0.5)
    stop = threading.Event()
    ring = recorder.Ring(writer.recorder_region())

    def write() -> None:
        n = 0
        while not stop.is_set():
            ring.write("hold", n, float(n), n, f"t{n}", f"lock-{n}", f"op-{n}" * 10, n, n)
            n += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        state = read_state_file(writer.path)
        seen = 0
        for _ in range(200):
            for entry in read_recorder(state):
                n = entry["monotonic_ns"]
                assert entry["lock"] == f"lock-{n}" and entry["waiters"] == n and entry["operation"].startswith(f"op-{n}op-")
                seen += 1
        assert seen
    finally:
        stop.set()
        thread.join(10)
        writer.close()


def test_a_forked_child_starts_its_own_ring_and_the_parent_s_is_unaffected(state_dir, implementation_env):
    code = CHILD_PRELUDE + """
def hold(operation, seconds):
    app.acquire_for(operation)
    time.sleep(seconds)
    app.release()
hold("parent-before", 0.05)
pid = os.fork()
if pid == 0:
    hold("child-only", 0.05)
    emit(child=os.getpid(), entries=h5watch.snapshot()["recorder"]["entries"])
    os._exit(0)
os.waitpid(pid, 0)
hold("parent-after", 0.05)
emit(parent=os.getpid(), child=pid)
"""
    result = run_python(code, args=[str(state_dir)], env=implementation_env)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    child, parent = lines[0], lines[1]
    parent_entries = entries_of(state_dir, parent["parent"])
    child_entries = entries_of(state_dir, child["child"])
    assert child_entries == child["entries"]
    assert [(e["kind"], e["operation"]) for e in parent_entries] == [
        ("hold", "parent-before"), ("fork", "os.fork"), ("hold", "parent-after")]
    assert [(e["kind"], e["operation"]) for e in child_entries] == [("forked", "a fork's child"), ("hold", "child-only")]
    assert child_entries[0]["parent_pid"] == parent["parent"]
    assert [e["seq"] for e in child_entries] == [0, 1]


def test_timeouts_gc_under_phil_and_off(state_dir, implementation_env):
    code = """
import gc, json, os, sys, threading, time
import h5watch
h5watch.install(state_dir=sys.argv[1], recorder_threshold=sys.argv[2], hold_timeout=0.2, tick_interval=0.05)
import h5py
from h5watch.process.h5py_hook import PHIL_LOCK_NAME
from h5watch.process.lock import watched_locks
phil = [lock for lock in watched_locks() if lock.name == PHIL_LOCK_NAME][0]
app = h5watch.WatchedLock("app.slow")
with app:
    time.sleep(0.5)  # a hold timeout, reported by the watchdog
junk = [[i] for i in range(300_000)]
phil.acquire_for("test.holds_phil")
gc.collect()  # a collection of ~300k objects while phil is held
phil.release()
os.write(1, (json.dumps({"pid": os.getpid()}) + "\\n").encode())
"""
    on = run_python(code, args=[str(state_dir), "0.0001"], env=implementation_env)
    assert on.returncode == 0, on.stderr
    kinds = [e["kind"] for e in entries_of(state_dir, json.loads(on.stdout)["pid"])]
    assert "hold_timeout" in kinds and "hold" in kinds and "gc_under_phil" in kinds, kinds
    [gc_entry] = [e for e in entries_of(state_dir, json.loads(on.stdout)["pid"]) if e["kind"] == "gc_under_phil"]
    assert gc_entry["lock"] == "h5py.phil" and gc_entry["operation"] == "phil held by this thread in test.holds_phil"
    assert gc_entry["generation"] == 2
    [event] = [json.loads(line) for line in on.stderr.splitlines() if '"lock.hold_timeout"' in line]
    assert event["recorder"][-1]["kind"] == "hold_timeout" and event["recorder"][-1]["lock"] == "app.slow"
    off = run_python(code, args=[str(state_dir), "off"], env=implementation_env)
    assert off.returncode == 0, off.stderr
    kinds = [e["kind"] for e in entries_of(state_dir, json.loads(off.stdout)["pid"])]
    assert kinds == ["hold_timeout"], kinds  # incidents are recorded whatever the threshold


def test_status_json_and_dump_show_the_newest_entries(state_dir, workers):
    proc = workers(state_dir, "gil", "-", service="recorded")
    pid = read_json_line(proc)["pid"]
    status = subprocess.run([*H5WATCH, "status", "--json", "--state-dir", str(state_dir)], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    [process] = [p for p in json.loads(status.stdout)["processes"] if p["pid"] == pid]
    assert {"hold", "wait"} <= {e["kind"] for e in process["recorder"]}, process["recorder"]
    assert len(process["recorder"]) <= 5
    dump = subprocess.run([*H5WATCH, "dump", "--state-dir", str(state_dir), str(pid), "--format", "text"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert dump.returncode == 0, dump.stderr
    assert "recorder: " in dump.stdout and "lock app.x" in dump.stdout and "thread gil-holder" in dump.stdout


def test_a_bad_recorder_threshold_is_one_line_and_exit_2(tmp_path):
    for bad in ("soon", "-1", "1e-9", "nan"):
        out = subprocess.run([*H5WATCH, "run", "--state-dir", str(tmp_path), "--recorder-threshold", bad, "--",
                              sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "recorder_threshold" in out.stderr, out.stderr
    env = {**os.environ, "H5WATCH_RECORDER_THRESHOLD": "often"}
    out = subprocess.run([*H5WATCH, "run", "--state-dir", str(tmp_path), "--", sys.executable, "-c", "pass"],
                         capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "H5WATCH_RECORDER_THRESHOLD" in out.stderr and len(out.stderr.splitlines()) == 1
