"""Exact counts across any death: what a process counted reaches the daemon's
totals exactly once, whatever ends it (SIGKILL and SIGTERM with no watchdog
tick in between, exec into another instrumented Python, uninstall and
install), whatever its locks are (re-created, two with one name, more than
16 names), across daemon restarts; and one daemon per state dir."""

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
from daemon_support import (
    H5WATCH,
    DaemonProcess,
    free_port,
    kill_group,
    read_json_line,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)

COUNTS_WORKER = str(REPO / "tests" / "scenarios" / "counts_worker.py")
LOCK_COUNTERS = ("h5watch_lock_", "h5watch_forks", "h5watch_fork_wait_seconds", "h5watch_orphaned_locks")
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
# No watchdog tick during a test: only the state file's shared mapping (or
# an exit path) can carry the counts to the daemon.
NO_TICK = ("--tick-interval", "60")


@pytest.fixture
def daemons(daemons):
    """The shared fixture, scanning every 0.2 s."""

    def start(state_dir: Path, *args: str, kind: type[DaemonProcess] = DaemonProcess) -> DaemonProcess:
        return daemons(state_dir, "--scan-interval", "0.2", *args, kind=kind)

    return start


@pytest.fixture
def counts_workers(tmp_path: Path):
    """Start ``counts_worker.py MODE DIR ARGS`` under ``h5watch run``; DIR is a fresh directory."""
    started: list[subprocess.Popen] = []

    def start(state_dir: Path, mode: str, *args: int, service: str, options: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
        directory = tmp_path / f"{mode}-{len(started)}"
        directory.mkdir()
        proc = subprocess.Popen(
            [*H5WATCH, "run", "--state-dir", str(state_dir), "--service", service, *options, "--",
             sys.executable, COUNTS_WORKER, mode, str(directory), *map(str, args)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO,
        )
        started.append(proc)
        return proc, directory

    yield start
    for proc in started:
        kill_group(proc)


def settles(read, expected, timeout: float, what: str):
    """Poll ``read()`` until it equals ``expected``; fail naming the last value seen."""
    seen = []

    def equal() -> bool:
        seen.append(read())
        return seen[-1] == expected

    try:
        wait_for(equal, timeout, interval=0.1, what=what)
    except AssertionError:
        raise AssertionError(f"{what}: expected {expected}, last seen {seen[-1] if seen else None}") from None


def release(proc: subprocess.Popen, directory: Path) -> None:
    (directory / "release").touch()
    assert proc.wait(20) == 0, proc.stderr.read()[-3000:]


def lock_counters(daemon: DaemonProcess) -> dict:
    return {key: value for key, value in daemon.samples().items()
            if key[0].startswith(LOCK_COUNTERS) and key[0].endswith(COUNTER_SUFFIXES)}


def status_json(state_dir: Path) -> dict:
    result = subprocess.run([*H5WATCH, "status", "--state-dir", str(state_dir), "--json"], capture_output=True, check=False,
                            text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def status_entry(state_dir: Path, pid: int) -> dict | None:
    return next((p for p in status_json(state_dir)["processes"] if p["pid"] == pid), None)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_counts_of_a_worker_killed_right_after_a_burst_are_exact(state_dir, daemons, counts_workers, signum):
    """No watchdog tick between the burst and the death, and no daemon yet:
    the daemon that starts afterwards finds every count in the dead file."""
    n, contended, reentries, forks = 20_000, 3, 7, 2
    workload = f"burst-{signum.name.lower()}"
    proc, _ = counts_workers(state_dir, "burst", n, contended, reentries, forks, service=workload, options=NO_TICK)
    report = read_json_line(proc)
    os.kill(report["pid"], signum)
    assert proc.wait(10) == -signum
    # What the worker counted itself (2 acquisitions per contended round,
    # one outer hold for the re-entries): the test's arithmetic agrees with it.
    expected_app = 2 * contended + 1 + n
    assert (report["app"], report["contentions"], report["reentries"], report["wait_count"], report["hold_count"],
            report["forks"]) == (expected_app, contended, reentries, contended, expected_app, forks)

    daemon = daemons(state_dir)
    settles(lambda: daemon.value("h5watch_lock_acquisitions_total", workload=workload, lock="app.burst"), expected_app,
            15, "app.burst acquisitions after the kill")
    exported = {
        "contentions": daemon.value("h5watch_lock_contentions_total", workload=workload, lock="app.burst"),
        "reentries": daemon.value("h5watch_lock_reentries_total", workload=workload, lock="app.burst"),
        "wait_count": daemon.value("h5watch_lock_wait_seconds_count", workload=workload, lock="app.burst"),
        "hold_count": daemon.value("h5watch_lock_hold_seconds_count", workload=workload, lock="app.burst"),
        "phil": daemon.value("h5watch_lock_acquisitions_total", workload=workload, lock="h5py.phil"),
        "phil_holds": daemon.value("h5watch_lock_hold_seconds_count", workload=workload, lock="h5py.phil"),
        "forks": daemon.value("h5watch_forks_total", workload=workload),
    }
    assert exported == {key: report[key] for key in exported}

    # Folded once: a restarted daemon (after SIGKILL) neither loses nor recounts it.
    os.killpg(daemon.proc.pid, signal.SIGKILL)
    daemon.stop()
    again = daemons(state_dir)
    time.sleep(1)  # several scans
    assert again.value("h5watch_lock_acquisitions_total", workload=workload, lock="app.burst") == expected_app
    assert again.value("h5watch_forks_total", workload=workload) == forks


def test_exec_into_another_instrumented_python_keeps_both_images_counts(state_dir, daemons, counts_workers):
    n1, n2 = 3_000, 500
    daemon = daemons(state_dir)
    proc, directory = counts_workers(state_dir, "exec", n1, n2, service="execer", options=NO_TICK)
    first = read_json_line(proc)
    second = read_json_line(proc)
    assert (first["image"], second["image"]) == (1, 2) and first["pid"] == second["pid"] == proc.pid
    assert (first["app"], second["app"]) == (n1, n2)

    def exported() -> tuple[float, float]:
        return (daemon.value("h5watch_lock_acquisitions_total", workload="execer", lock="app.exec"),
                daemon.value("h5watch_lock_acquisitions_total", workload="execer", lock="h5py.phil"))

    settles(exported, (n1 + n2, first["phil"] + second["phil"]), 15, "both images' counts while the second lives")
    release(proc, directory)
    time.sleep(1)  # the exit folded: still exactly once
    assert exported() == (n1 + n2, first["phil"] + second["phil"])


def test_uninstall_then_install_keeps_the_process_exported_and_its_file(state_dir, daemons, counts_workers):
    n1, n2 = 400, 600
    daemon = daemons(state_dir)
    proc, directory = counts_workers(state_dir, "reinstall", n1, n2, service="reinstaller")

    def exported() -> float:
        return daemon.value("h5watch_lock_acquisitions_total", workload="reinstaller", lock="app.reinstall")

    assert read_json_line(proc)["phase"] == "uninstalled"
    settles(exported, n1, 15, "app.reinstall while uninstalled")
    time.sleep(1)  # several scans of a process that is uninstalled for now
    assert exported() == n1
    (directory / "install").touch()
    report = read_json_line(proc)
    assert report["app"] == n1 + n2
    settles(exported, n1 + n2, 15, "app.reinstall after install() again")
    # Many scans later (and ticks: the default tick is on), still live, still exact.
    for _ in range(5):
        time.sleep(0.4)
        assert status_entry(state_dir, report["pid"]) is not None, "the live process vanished from status"
        assert exported() == n1 + n2
    assert daemon.value("h5watch_processes", workload="reinstaller", state="ok") == 1
    release(proc, directory)
    settles(lambda: daemon.value("h5watch_processes", workload="reinstaller", state="ok"), 0, 15, "the exit seen")
    assert exported() == n1 + n2


def test_a_lock_recreated_under_the_same_name_keeps_counting(state_dir, daemons, counts_workers):
    n1, n2 = 300, 45
    daemon = daemons(state_dir)
    proc, directory = counts_workers(state_dir, "recreate", n1, n2, service="recreator")
    assert read_json_line(proc)["app"] == n2  # the second instance counts only its own

    def exported() -> float:
        return daemon.value("h5watch_lock_acquisitions_total", workload="recreator", lock="app.recreated")

    settles(exported, n1 + n2, 15, "app.recreated while the process lives")
    release(proc, directory)
    time.sleep(1)
    assert exported() == n1 + n2


def test_two_live_locks_with_one_name_are_summed(state_dir, daemons, counts_workers):
    a, b = 123, 456
    daemon = daemons(state_dir)
    proc, directory = counts_workers(state_dir, "twins", a, b, service="twins")
    report = read_json_line(proc)
    assert report["counts"] == [a, b]

    def exported() -> tuple[float, float]:
        return (daemon.value("h5watch_lock_acquisitions_total", workload="twins", lock="app.twin"),
                daemon.value("h5watch_lock_hold_seconds_count", workload="twins", lock="app.twin"))

    settles(exported, (a + b, a + b), 15, "app.twin while both live")
    entry = status_entry(state_dir, report["pid"])
    assert entry is not None
    assert sum(lock["acquisitions"] for lock in entry["locks"] if lock["lock"] == "app.twin") == a + b
    release(proc, directory)
    time.sleep(1)
    assert exported() == (a + b, a + b)


def test_more_than_16_lock_names_are_all_exported(state_dir, daemons, counts_workers):
    daemon = daemons(state_dir)
    proc, directory = counts_workers(state_dir, "names", service="many")
    assert read_json_line(proc)["names"] == 25
    expected = {f"app.short.{i:02d}": i + 1 for i in range(12)}
    expected.update({f"app.live.{i:02d}": 100 + i for i in range(12)})
    expected["app.long"] = 777

    def exported() -> dict[str, float]:
        return {dict(labels)["lock"]: value for (name, labels), value in daemon.samples().items()
                if name == "h5watch_lock_acquisitions_total" and dict(labels).get("workload") == "many"}

    settles(exported, expected, 15, "every lock name while the process lives")
    release(proc, directory)
    time.sleep(1)
    assert exported() == expected
    # Nothing was left out, so nothing may say that something was.
    assert not [line for line in daemon.log_text().splitlines() if "overflow" in line]


def test_a_second_daemon_on_the_same_state_dir_refuses_to_start(state_dir, daemons, tmp_path):
    first = daemons(state_dir)
    second = subprocess.Popen(
        [*H5WATCH, "daemon", "--state-dir", str(state_dir), "--listen", f"127.0.0.1:{free_port()}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, cwd=REPO,
    )
    try:
        out, err = second.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        kill_group(second)
        raise AssertionError("a second daemon on the same state dir started (it ran for 20 s)") from None
    finally:
        kill_group(second)
    assert second.returncode == 2, (second.returncode, out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "daemon" in err.lower(), err
    assert first.healthy() and first.proc.poll() is None

    # The claim goes with its daemon, however it ends: SIGKILL leaves no stale lock.
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.stop()
    assert daemons(state_dir).healthy()


class FirstScrapeDaemon(DaemonProcess):
    """A daemon whose very first answer to ``/metrics`` is kept: start-up polls
    ``/metrics`` as fast as it can instead of waiting for ``/healthz``."""

    first_scrape: tuple[int, str] | None = None

    def healthy(self) -> bool:
        if self.first_scrape is not None:
            return super().healthy()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                status, _, body = self.get("/metrics")
            except OSError:
                time.sleep(0.001)
                continue
            self.first_scrape = (status, body)
            return True
        return False

    def first_counters(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        assert self.first_scrape is not None
        status, body = self.first_scrape
        assert status == 200, body
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(body) for s in family.samples
                if s.name.startswith(LOCK_COUNTERS) and s.name.endswith(COUNTER_SUFFIXES)}


def test_first_scrape_after_each_restart_carries_every_series(state_dir, daemons, tmp_path):
    from daemon_support import start_worker

    gone_k, live_k = 50, 70
    daemon = daemons(state_dir)
    gone_dir, live_dir = tmp_path / "gone", tmp_path / "live"
    gone_dir.mkdir()
    live_dir.mkdir()
    gone = start_worker(state_dir, "count", str(gone_dir), str(gone_k), service="restarts")
    live = start_worker(state_dir, "count", str(live_dir), str(live_k), service="restarts")
    try:
        read_json_line(gone)
        read_json_line(live)
        (gone_dir / "release").touch()
        assert gone.wait(20) == 0
        settles(lambda: daemon.value("h5watch_lock_acquisitions_total", workload="restarts", lock="app.x"),
                gone_k + live_k, 15, "app.x from a gone and a live worker")
        previous = lock_counters(daemon)

        for how in ("SIGTERM", "SIGKILL", "SIGKILL-after-the-live-one-exits"):
            if how == "SIGTERM":
                daemon.stop()
            else:
                os.killpg(daemon.proc.pid, signal.SIGKILL)
                daemon.stop()
            if how.endswith("exits"):  # no daemon to see it go: the next one folds it
                (live_dir / "release").touch()
                assert live.wait(20) == 0
            daemon = daemons(state_dir, kind=FirstScrapeDaemon)
            first = daemon.first_counters()
            missing = sorted(key for key in previous if key not in first)
            assert not missing, f"after a restart by {how}, the first scrape lacks {missing[:5]}"
            lower = sorted(key for key, value in previous.items() if first[key] < value)
            assert not lower, f"after a restart by {how}, the first scrape went down for {lower[:5]}"
            assert first[("h5watch_lock_acquisitions_total", (("lock", "app.x"), ("workload", "restarts")))] == gone_k + live_k
            previous = lock_counters(daemon)
    finally:
        kill_group(gone)
        kill_group(live)


BUSY_AT_ATTACH = r"""
import os, sys, threading
import h5watch
from h5watch.process import runtime
from h5watch.statefile import read_state_file

lock = h5watch.WatchedLock("app.busy")
for _ in range(1000):
    with lock:
        pass
held, go = threading.Event(), threading.Event()

def hold():
    with lock:
        held.set()
        go.wait()

def held_by_another_thread(then):
    held.clear(); go.clear()
    thread = threading.Thread(target=hold)
    thread.start()
    held.wait()
    then()
    go.set()
    thread.join()

def in_file():
    state = read_state_file(runtime.state.writer.path)
    return sum(int(r["acquisitions"]) for r in state.records if bytes(r["name"]).rstrip(b"\0") == b"app.busy")

seen = []
def tick():
    runtime.state.beat()
    seen.append(in_file())

# The file is made while another thread holds the lock (a pure-Python lock's
# counters then move at that holder's release), and ticks find it busy again.
held_by_another_thread(lambda: (h5watch.install(state_dir=sys.argv[1], tick_interval=3600), runtime._build(), tick()))
for _ in range(500):
    with lock:
        pass
held_by_another_thread(tick)
tick()
holds_in_file = sum(r.holds for r in read_state_file(runtime.state.writer.path).operation_records() if r.lock == "app.busy")
holds = sum(row["holds"] for row in h5watch.snapshot()["locks"]["app.busy"]["operations"])
print(h5watch.snapshot()["locks"]["app.busy"]["stats"]["acquisitions"], in_file(), holds, holds_in_file, *seen)
"""


@pytest.mark.parametrize("implementation", ["default", "python"])
def test_a_lock_busy_when_its_counters_move_into_the_file_loses_nothing(state_dir, implementation):
    env = dict(os.environ)
    if implementation == "python":
        env["H5WATCH_IMPLEMENTATION"] = "python"
    result = subprocess.run([sys.executable, "-c", BUSY_AT_ATTACH, str(state_dir)], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    snapshot, final, holds, holds_in_file, *ticks = map(int, result.stdout.split())
    assert snapshot == final == 1502
    assert holds == holds_in_file == 1502  # by operation too: the rows move with the counters
    assert ticks == sorted(ticks) and ticks[-1] == 1502, ticks


def test_a_lock_recorded_after_the_header_s_last_write_is_still_folded(state_dir, daemons):
    """A lock's record is written, then the header that counts it: a process
    killed in between (or an image replaced by exec() while another thread
    was there) has a record its header does not count, and the lock counts
    in it, by operation too. The daemon reads a dead process's file as it
    stands, and a new image adopting the file finds the record too: its
    counts are kept."""
    code = f"""
import json, os, signal, sys
from h5watch.process.lock import WatchedLock
from h5watch.process.publisher import lock_record
from h5watch.records import ProcessStatus
from h5watch.statefile import StateWriter, ensure_state_dir, read_state_file
directory = ensure_state_dir({str(state_dir)!r})
writer = StateWriter(directory, "cut-short", 0, 60)
first = WatchedLock("app.first")
writer.write_all([lock_record(first)], ProcessStatus(True, None))
late = WatchedLock("app.late")
writer._slot_of(lock_record(late))  # its record, before the header that counts it
for _ in range(5):
    late.acquire_for("late-op")
    late.release()
if sys.argv[1] == "adopt":
    again = StateWriter(directory, "cut-short", 0, 60)  # as a new image of this process would
    again.write_all([], ProcessStatus(True, None))
    state = read_state_file(again.path)
    counts = {{lock["lock"]: lock["acquisitions"] for lock in state.locks()}}
    print(json.dumps([counts, [[record.operation, record.holds] for record in state.operation_records()]]), flush=True)
    sys.exit(0)
os.kill(os.getpid(), signal.SIGKILL)
"""
    from conftest import run_python

    adopted = run_python(code, args=["adopt"], timeout=60)
    assert adopted.returncode == 0, adopted.stderr
    assert json.loads(adopted.stdout.splitlines()[-1]) == [{"app.first": 0, "app.late": 5}, [["late-op", 5]]]
    for path in state_dir.glob("*/*"):
        path.unlink()
    killed = run_python(code, args=["kill"], timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    daemon = daemons(state_dir)
    wait_for(lambda: not list(state_dir.glob("*/*.h5w")), 20, what="the dead process's file to be folded")
    assert wait_for(lambda: daemon.value("h5watch_lock_acquisitions_total", workload="cut-short", lock="app.late"), 20,
                    what="app.late's acquisitions") == 5
    assert daemon.value("h5watch_lock_operation_holds_total", workload="cut-short", lock="app.late", operation="late-op") == 5
