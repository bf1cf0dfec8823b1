"""The per-process state file: layout, torn-read safety, one file per process
(forked children too), stacks on demand, the state dir's checks, and the
in-process exporter."""

from __future__ import annotations

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_python

from h5watch.process.lock import IMPLEMENTATION
from h5watch.statefile import FILE_SIZE, StateFileError, proc_start_ticks, read_state_file

pytestmark = pytest.mark.timeout(90)


def state_files(directory: Path) -> dict[int, Path]:
    """The state files in this user's subdirectory of the state dir ``directory``."""
    return {int(p.name.split("-")[0]): p for p in (directory / str(os.geteuid())).glob("*.h5w")}


def test_layout_identity_and_waiter_written_at_once(tmp_path):
    state_dir = tmp_path / "state"
    # A long tick: what the file shows of the wait was written by the waiter itself.
    proc = subprocess.Popen(
        [sys.executable, "-c", f"""
import json, os, threading, time
import h5watch
h5watch.install(state_dir={str(state_dir)!r}, service="layout", tick_interval=60)
import h5py
lock = h5watch.WatchedLock("app.layout")
go = threading.Event()
def holder():
    with lock:
        go.set()
        time.sleep(30)
threading.Thread(target=holder, name="the-holder", daemon=True).start()
go.wait()
# A crowd forming: each wait's start writes the record, which shows one more waiter each time.
for i in range(4):
    threading.Thread(target=lock.acquire, name=f"the-waiter-{{i}}", daemon=True).start()
    while len(lock._waiters) <= i:
        time.sleep(0.001)
time.sleep(0.5)
print(json.dumps({{"pid": os.getpid(), "watchdog": h5watch.snapshot()["watchdog"]["running"]}}), flush=True)
time.sleep(30)
"""],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        shown = json.loads(proc.stdout.readline())
        pid = shown["pid"]
        assert shown["watchdog"]  # ticking (every 60 s): the waits' starts wrote the record, not a tick
        path = state_files(state_dir)[pid]
        assert path.name == f"{pid}-{proc_start_ticks(pid)}.h5w"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700 and path.parent.name == str(os.geteuid())
        assert path.stat().st_size == FILE_SIZE
        state = read_state_file(str(path))
        assert state.pid == pid and state.workload == "layout" and int(state.header["uid"]) == os.geteuid()
        [lock] = [entry for entry in state.locks() if entry["lock"] == "app.layout"]
        assert lock["holder"]["thread_name"] == "the-holder" and lock["holder"]["pid"] == pid
        assert lock["waiters"] == 4
        assert [t["thread_name"] for t in lock["waiting_threads"]] == [f"the-waiter-{i}" for i in range(4)]
        assert 0.3 < lock["oldest_wait_seconds"] < 30
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_readers_never_see_a_torn_record(tmp_path):
    """A writer process takes its lock again and again, each time under a
    thread name and an operation both equal to k = 1, 2, 3..., and rewrites
    the record while holding it: every copy a reader accepts names one single
    k for both, and the live counters a reader sees never go down."""
    state_dir = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"""
import threading, time
from h5watch.process.lock import WatchedLock
from h5watch.process.publisher import lock_record
from h5watch.records import ProcessStatus
from h5watch.statefile import StateWriter, ensure_state_dir
ensure_state_dir({str(state_dir)!r})
writer = StateWriter({str(state_dir)!r}, "torn", 0, 0.5)
lock = WatchedLock("app.torn")
writer.write_all([lock_record(lock)], ProcessStatus(True, None))
print(writer.path, flush=True)
deadline = time.monotonic() + 8
k = 0
me = threading.current_thread()
while time.monotonic() < deadline:
    k += 1
    me.name = f"{{k:012d}}"
    lock.acquire_for(me.name)
    writer.write_one(lock_record(lock))
    lock.release()
    if k % 8 == 0:
        time.sleep(0.0002)  # let readers through now and then
"""],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        path = proc.stdout.readline().strip()
        seen, busy, last_acquisitions = set(), 0, 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                state = read_state_file(path, retries=1)
            except StateFileError as exc:
                assert exc.reason == "busy", exc
                busy += 1
                continue
            assert not state.torn
            (lock,) = state.locks()
            record = state.records[0]
            assert int(record["acquisitions"]) >= last_acquisitions
            last_acquisitions = int(record["acquisitions"])
            if lock["holder"] is None:
                continue
            assert lock["holder"]["thread_name"] == lock["holder"]["operation"], lock["holder"]
            seen.add(lock["holder"]["operation"])
        assert len(seen) > 100  # the test saw the writer at work
        assert last_acquisitions > 100
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("how", ["os", "nohook"])
def test_forked_child_gets_its_own_file(tmp_path, how):
    state_dir = tmp_path / "state"
    result = run_python(
        f"""
        import ctypes, json, os, time
        import h5watch
        h5watch.install(state_dir={str(state_dir)!r}, service="forky", tick_interval=0.1)
        import h5py
        lock = h5watch.WatchedLock("app.fork")
        for _ in range(5):
            with lock:
                pass
        time.sleep(0.3)
        fork = os.fork if {how!r} == "os" else ctypes.PyDLL(None).fork
        pid = fork()
        if pid == 0:
            for _ in range(2):
                with lock:
                    pass
            time.sleep(0.5)
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.3)
        print(json.dumps({{"parent": os.getpid(), "child": pid}}))
        """,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    pids = json.loads(result.stdout.strip().splitlines()[-1])
    files = state_files(state_dir)
    if how == "nohook":
        # Nothing of h5watch runs in the child of a fork that skipped Python's
        # hooks until it waits for a watched lock: this one never does, so it
        # has no file of its own. The compiled core notices the fork at the
        # child's first acquisition and counts privately; the pure-Python
        # implementation cannot notice it there, and the child's uncontended
        # acquisitions land in its parent's record (see README, Limits).
        assert set(files) == {pids["parent"]}
        parent = read_state_file(str(files[pids["parent"]]))
        leaked = 0 if IMPLEMENTATION == "compiled" else 2
        assert {e["lock"]: e["acquisitions"] for e in parent.locks()}["app.fork"] == 5 + leaked
        return
    assert set(files) == {pids["parent"], pids["child"]}
    parent = read_state_file(str(files[pids["parent"]]))
    child = read_state_file(str(files[pids["child"]]))
    assert parent.pid == pids["parent"] and child.pid == pids["child"]
    acquisitions = {s.pid: {e["lock"]: e["acquisitions"] for e in s.locks()} for s in (parent, child)}
    assert acquisitions[pids["parent"]]["app.fork"] == 5
    assert acquisitions[pids["child"]]["app.fork"] == 2  # the child starts from zero


def test_outside_stack_dump_of_a_blocked_process(tmp_path):
    state_dir = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"""
import os, threading, time
import h5watch
h5watch.install(state_dir={str(state_dir)!r}, service="dump")
lock = h5watch.WatchedLock("app.dump", threading.Lock())
def sits_on_the_lock():
    with lock:
        time.sleep(60)
threading.Thread(target=sits_on_the_lock, daemon=True).start()
time.sleep(0.1)
print(os.getpid(), flush=True)
def blocked_forever_here():
    lock.acquire()
blocked_forever_here()
"""],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, start_new_session=True,
    )
    try:
        pid = int(proc.stdout.readline())

        def waiting() -> bool:
            # The file is created by the first thing to write: here, the waiter.
            path = state_files(state_dir).get(pid)
            locks = read_state_file(str(path)).locks() if path else []
            return any(entry["lock"] == "app.dump" and entry["waiters"] for entry in locks)

        deadline = time.monotonic() + 10
        while not waiting():
            assert time.monotonic() < deadline, "the wait never showed in the state file"
            time.sleep(0.02)
        state = read_state_file(str(state_files(state_dir)[pid]))
        os.kill(pid, int(state.header["dump_signal"]))
        stacks = Path(state.stacks_path)
        deadline = time.monotonic() + 5
        while "blocked_forever_here" not in stacks.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        text = stacks.read_text()
        assert "blocked_forever_here" in text and "sits_on_the_lock" in text
        assert proc.poll() is None  # dumping does not stop the process
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_unsafe_state_dirs_are_refused_and_the_service_goes_on(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for bad in (link, not_a_dir):
        result = run_python(
            f"""
            import h5watch
            h5watch.install(state_dir={str(bad)!r})
            import h5py, numpy
            with h5py.File({str(tmp_path / 'ok.h5')!r}, "w") as f:
                f["v"] = numpy.arange(3)
            print("still works")
            """,
            timeout=30,
        )
        assert result.returncode == 0 and "still works" in result.stdout, result.stderr
        [event] = [json.loads(line) for line in result.stderr.splitlines() if '"state.unavailable"' in line]
        assert str(bad) in event["error"]
    assert list(real.iterdir()) == []


def test_in_process_exporter(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", f"""
import time
import h5watch
h5watch.install(metrics_port=0, state_files=False, service="inproc", log_level="info")
import h5py, numpy
with h5py.File({str(tmp_path / 'x.h5')!r}, "w") as f:
    f["v"] = numpy.arange(3)
time.sleep(60)
"""],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        port = None
        deadline = time.monotonic() + 20
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if '"exporter.listening"' in line:
                event = json.loads(line)
                assert event["addr"] == "127.0.0.1"
                port = event["port"]
        assert port, "no exporter.listening event"
        time.sleep(0.3)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        match = re.search(r'h5watch_lock_acquisitions_total\{lock="h5py.phil",workload="inproc"\} (\S+)', body)
        assert match and float(match.group(1)) > 0
        assert 'h5watch_lock_hold_seconds_bucket{le="+Inf",lock="h5py.phil",workload="inproc"}' in body
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_absurd_values_in_a_file_read_as_unknown_never_as_nan_wraps_or_escapes(tmp_path):
    """A forged or damaged file: NaN and infinite times, a counter no real
    count reaches, escape sequences in names. ``h5watch status`` prints no
    NaN/Infinity in its JSON, no control character on the terminal, and sums
    nothing that wraps."""
    import math

    import numpy as np

    from h5watch.process.lock import WatchedLock
    from h5watch.process.publisher import lock_record
    from h5watch.records import ProcessStatus
    from h5watch.statedir import ensure_state_dir
    from h5watch.statefile import HEADER_DTYPE, RECORD_DTYPE, RECORDS_OFFSET, StateWriter

    base = tmp_path / "state"
    user_dir = ensure_state_dir(str(base))
    writer = StateWriter(user_dir, "evil\x1b[2Jname", 0, 0.5)
    lock = WatchedLock("app.\x1b]0;pwned\x07lock")
    with lock:
        pass
    writer.write_all([lock_record(lock)], ProcessStatus(True, None))
    writer.close(exited=False)
    data = bytearray(Path(writer.path).read_bytes())
    header = np.frombuffer(data, dtype=HEADER_DTYPE, count=1)
    header["heartbeat_unix"] = float("nan")
    header["tick_interval"] = float("inf")
    record = np.frombuffer(data, dtype=RECORD_DTYPE, count=1, offset=RECORDS_OFFSET)
    record["held"] = 1
    record["held_since_unix"] = float("-inf")
    record["oldest_wait_since_unix"] = 1e308
    record["waiter_since_unix"][0] = [float("nan"), -1.0, 1e300, 5.0]
    block = int(record["block"][0])
    from h5watch.statefile import BLOCKS_OFFSET

    words = np.frombuffer(data, dtype="<u8", count=64, offset=BLOCKS_OFFSET + 512 * block)
    words[0] = 2**63 + 5  # acquisitions
    Path(writer.path).write_bytes(bytes(data))

    state = read_state_file(writer.path)
    assert int(state.records["acquisitions"][0]) == 0
    assert state.heartbeat_unix == 0.0 and float(state.header["tick_interval"]) == 0.0
    assert float(state.header["started_unix"]) > 0  # a time in range is kept
    assert float(state.records["held_since_unix"][0]) == 0.0 and float(state.records["oldest_wait_since_unix"][0]) == 0.0
    assert state.records["waiter_since_unix"][0].tolist() == [0.0, 0.0, 0.0, 5.0]
    (entry,) = state.locks()
    assert "\x1b" not in entry["lock"] and "\x07" not in entry["lock"]
    assert entry["holder"]["held_since_unix"] is None and entry["oldest_wait_seconds"] == 0.0
    for args in (["--json"], []):
        result = subprocess.run([sys.executable, "-m", "h5watch", "status", "--state-dir", str(base), *args],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode in (0, 1), result.stderr
        assert "evil?[2Jname" in result.stdout  # the process is listed, its name defused
        assert "NaN" not in result.stdout and "Infinity" not in result.stdout
        assert not any(ord(c) < 0x20 and c not in "\n" for c in result.stdout), repr(result.stdout)
    assert math.isfinite(state.heartbeat_unix)


def test_locks_beyond_the_files_records_are_counted_and_logged_never_silently_dropped(tmp_path):
    """More live locks than the file has records: every one that fits keeps
    its record; the rest are counted in the header (the daemon exports it as
    h5watch_locks_unrecorded) and logged once."""
    result = run_python(
        f"""
        import json
        import h5watch
        h5watch.install(state_dir={str(tmp_path / "state")!r}, log_level="error", tick_interval=60)
        from h5watch.statefile import CAPACITY, read_state_file
        locks = [h5watch.WatchedLock(f"app.many.{{i:03d}}") for i in range(CAPACITY + 9)]
        for lock in locks:
            with lock:
                pass
        path = h5watch.snapshot()["state"]["path"]
        state = read_state_file(path)
        print(json.dumps({{"records": len(state.records), "unrecorded": int(state.header["locks_unrecorded"]),
                          "capacity": CAPACITY, "first": int(state.records["acquisitions"][0])}}))
        """,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["records"] == report["capacity"] and report["first"] == 1
    assert report["unrecorded"] == 9
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events].count("state.slots_full") == 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("daemon_running", [False, True])
def test_dead_files_do_not_pile_up_without_a_daemon_and_are_left_to_one(tmp_path, daemon_running):
    """Without a daemon nobody folds dead processes' files: a process making
    its own file keeps the newest 1,000 and removes the rest. With a daemon
    reading the directory, they are the daemon's to fold: nothing is removed."""
    from daemon_support import DaemonProcess

    from h5watch.statedir import ensure_state_dir

    base = tmp_path / "state"
    user_dir = Path(ensure_state_dir(str(base)))
    now = time.time()
    for i in range(2500):
        (user_dir / f"{4_000_000_000 + i}-1.h5w").write_bytes(b"")
        (user_dir / f"{4_000_000_000 + i}-1.stacks").write_bytes(b"")
        # Recent (a daemon removes unreadable dead files only after a grace), in order.
        os.utime(user_dir / f"{4_000_000_000 + i}-1.h5w", (now - 100 + i * 0.01, now - 100 + i * 0.01))
    daemon = DaemonProcess(base, tmp_path / "daemon.log", "--scan-interval", "60") if daemon_running else None
    try:
        result = run_python(
            f"""
            import h5watch
            h5watch.install(state_dir={str(base)!r}, tick_interval=60)
            lock = h5watch.WatchedLock("app.x")
            """,
            timeout=60,
        )
    finally:
        if daemon is not None:
            daemon.stop()
    assert result.returncode == 0, result.stderr
    left = sorted(int(p.name.split("-")[0]) - 4_000_000_000 for p in user_dir.glob("4*-1.h5w"))
    stacks = list(user_dir.glob("4*-1.stacks"))
    if daemon_running:
        assert len(left) == 2500 and "state.pruned" not in result.stderr
    else:
        assert left == list(range(1500, 2500))  # the newest 1,000 kept
        assert len(stacks) == 1000
        assert '"state.pruned"' in result.stderr


@pytest.mark.timeout(60)
def test_a_lock_made_between_a_tick_listing_the_locks_and_its_write_stays_live(tmp_path):
    """The tick lists the locks, a new lock is attached (its constructor), then
    the tick writes: the new lock is missing from that list but alive, so its
    record stays live and its counts are counted once."""
    from h5watch.process.lock import WatchedLock
    from h5watch.process.publisher import lock_record
    from h5watch.records import ProcessStatus
    from h5watch.statefile import SLOT_LIVE, StateWriter, ensure_state_dir

    writer = StateWriter(ensure_state_dir(str(tmp_path / "state")), "race", 0, 0.5)
    try:
        first = WatchedLock("app.first")
        listed = [lock_record(first)]
        late = WatchedLock("app.late")
        writer.attach_locks([lock_record(late)])
        writer.write_all(listed, ProcessStatus(True, None))
        for _ in range(3):
            with late:
                pass
        writer.write_all([lock_record(first), lock_record(late)], ProcessStatus(True, None))
        state = read_state_file(writer.path)
        records = [r for r in state.records if bytes(r["name"]).rstrip(b"\0") == b"app.late"]
        assert [int(r["state"]) for r in records] == [SLOT_LIVE]
        assert sum(lock["acquisitions"] for lock in state.locks() if lock["lock"] == "app.late") == 3
    finally:
        writer.close(exited=False)


def test_operation_names_are_never_read_torn_and_counts_never_go_down(tmp_path):
    """A writer keeps making watched locks and holding them for new
    operations (each new row's name written in the file as it comes, past
    64 counted as other's): a reader only ever finds names the writer used,
    and no (lock, operation)'s holds ever go down from one read to the next.
    A row whose name entry is not whole (its writer died in it; forged) is
    read as other's, its counts kept."""
    state_dir = tmp_path / "state"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"""
import time
from h5watch.process.lock import WatchedLock
from h5watch.process.publisher import lock_record
from h5watch.statefile import StateWriter, ensure_state_dir
ensure_state_dir({str(state_dir)!r})
writer = StateWriter({str(state_dir)!r}, "torn", 0, 0.5)
locks = []
first = True
deadline = time.monotonic() + 6
k = 0
while time.monotonic() < deadline:
    if k % 400 == 0 and len(locks) < 40:
        locks.append(WatchedLock(f"app.{{len(locks)}}"))
        writer.attach_locks([lock_record(locks[-1])])
    k += 1
    lock = locks[k % len(locks)]
    lock.acquire_for(f"op-{{k % 90}}")
    lock.release()
    if first:
        print(writer.path, flush=True)
        first = False
    if k % 8 == 0:
        time.sleep(0.0002)
"""],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        path = proc.stdout.readline().strip()
        expected = {f"op-{k}" for k in range(90)} | {"other"}
        last: dict[tuple[str, str], int] = {}
        reads = 0
        deadline = time.monotonic() + 4
        while time.monotonic() < deadline:
            try:
                state = read_state_file(path, retries=1)
            except StateFileError as exc:
                assert exc.reason == "busy", exc
                continue
            reads += 1
            for record in state.operation_records():
                assert record.operation in expected, record
                key = (record.lock, record.operation)
                assert record.holds >= last.get(key, 0), (record, last.get(key))
                last[key] = record.holds
        assert reads > 100 and len({lock for lock, _ in last}) > 5
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    from h5watch.schema import OPERATION_NAME_ENTRY
    from h5watch.statefile import NAMES_OFFSET

    def holds() -> dict[str, int]:
        return {r.operation: r.holds for r in read_state_file(path, accept_torn=True).operation_records() if r.lock == "app.0"}

    before = holds()
    assert set(before) <= expected and len(before) > 2
    # app.0's rows are its block's (the first): its first named row's (row
    # 2) name entry left odd, as by a writer killed in it.
    entry = NAMES_OFFSET + 2 * OPERATION_NAME_ENTRY
    with open(path, "r+b") as f:
        f.seek(entry)
        assert int.from_bytes(f.read(8), "little") == 2
        f.seek(entry)
        f.write((1).to_bytes(8, "little"))
    after = holds()
    [gone] = set(before) - set(after)
    assert after["other"] == before.get("other", 0) + before[gone]
    assert sum(after.values()) == sum(before.values())


def test_a_writer_killed_at_any_moment_leaves_every_record_and_entry(tmp_path):
    """Writers forked from one state file's owner rewrite its header and its
    lock records, and count operations, without pause and are killed at
    random moments, a thousand times: the file, read as the daemon reads a
    dead process's, still lists both locks and both operations every time (a
    write interrupted half-way leaves old or new values, never zeros)."""
    state_dir = tmp_path / "state"
    script = f"""
import json, os, random, signal, time
from h5watch.process.lock import WatchedLock
from h5watch.process.publisher import lock_record
from h5watch.records import ProcessStatus
from h5watch.statefile import StateWriter, ensure_state_dir, read_state_file
ensure_state_dir({str(state_dir)!r})
writer = StateWriter({str(state_dir)!r}, "killed", 0, 0.5)
locks = [WatchedLock("app.a"), WatchedLock("app.b")]
operations = ["first", "second"]
status = ProcessStatus(True, None)
writer.write_all([lock_record(lock) for lock in locks], status)
for lock, operation in zip(locks, operations):
    lock.acquire_for(operation)
    lock.release()
random.seed({os.getpid()})
missing, torn = [], 0
for round in range(1000):
    ready, started = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            k = 1
            while True:
                if k == 3:
                    os.write(started, b"!")
                k += 1
                for lock, operation in zip(locks, operations):
                    lock.acquire_for(operation)
                writer.write_all([lock_record(lock) for lock in locks], status)
                for lock in locks:
                    lock.release()
        finally:
            os._exit(1)  # a failing writer never runs the rest of this loop as a second parent
    os.close(started)
    assert os.read(ready, 1) == b"!"  # the writer is in its loop (b"": it died)
    os.close(ready)
    time.sleep(random.uniform(0, 0.0005))
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    state = read_state_file(writer.path, accept_torn=True)
    torn += state.torn
    found = (sorted(lock["lock"] for lock in state.locks()), sorted(r.operation for r in state.operation_records()))
    if found != (["app.a", "app.b"], ["first", "second"]):
        missing.append(found)
print(json.dumps({{"missing": missing, "torn": torn}}))
"""
    out = run_python(script, timeout=80)
    result = json.loads(out.stdout.splitlines()[-1])
    assert result["missing"] == []
    assert result["torn"] > 0  # some writers were killed inside a write


MERGE_KILLED = """
import gc, os, sys
from h5watch.process.lock import WatchedLock
from h5watch.process.publisher import lock_record
from h5watch.records import ProcessStatus
from h5watch.statefile import StateWriter, ensure_state_dir

directory, call, when = sys.argv[1], int(sys.argv[2]), sys.argv[3]
writer = StateWriter(ensure_state_dir(directory), "merging", 0, 0.5)
status = ProcessStatus(True, None)
locks = [WatchedLock("app.x") for _ in range(2)]
for times, lock in zip((3, 5), locks):
    for _ in range(times):
        with lock:
            pass
    lock.acquire_for("named")
    lock.release()
writer.write_all([lock_record(lock) for lock in locks], status)
del lock, locks
gc.collect()
# Killed at one step of the merge of the two collected locks' records: a
# record's change (call 1: the retired record's new block; call 2: the
# freed record), before or after it is written.
merge_pair, write_fields, calls = writer._merge_pair, writer._write_record_fields, [0]

def merging(*args):
    writer._write_record_fields = step
    return merge_pair(*args)

def step(slot, **fields):
    calls[0] += 1
    if calls[0] == call and when == "before":
        os._exit(9)
    write_fields(slot, **fields)
    if calls[0] == call and when == "after":
        os._exit(9)

writer._merge_pair = merging
writer.write_all([], status)
os._exit(0 if call == 0 else 1)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("call", "when"), [(1, "before"), (1, "after"), (2, "after"), (0, "never")])
def test_a_writer_killed_inside_a_merge_leaves_each_count_counted_once(tmp_path, call, when):
    """Two collected locks of one name are merged into one record in steps
    under a journal in the header; a reader of a writer killed between any
    two of them counts every acquisition once (3 + 5, and one named
    operation each), by operation too (their tables are merged into the new
    block's, row by name), as it does after the whole merge."""
    result = run_python(MERGE_KILLED, args=[str(tmp_path), str(call), when], timeout=30)
    assert result.returncode == (0 if call == 0 else 9), result.stderr
    (path,) = list(tmp_path.glob("*/*.h5w"))
    state = read_state_file(str(path), accept_torn=True)
    # Before the retired record's new block is written both old blocks count; after, the new one alone.
    assert [name.decode() for name in state.records["name"]].count("app.x") == (2 if (call, when) == (1, "before") else 1)
    assert int(state.records["acquisitions"].sum()) == 10
    assert {(r.lock, r.operation): r.holds for r in state.operation_records()} == {("app.x", "app.x"): 8, ("app.x", "named"): 2}
    assert bool(state.header["merge_active"]) is (call != 0)
