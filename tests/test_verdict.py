"""One verdict for "stuck": :func:`h5watch.host.verdict.judge` on real state
files, and the daemon and ``h5watch status`` agreeing on real workers."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import REPO
from daemon_support import H5WATCH, read_json_line, wait_for

from h5watch.errors import UsageError
from h5watch.host.verdict import OK, Thresholds, judge
from h5watch.statefile import read_state_file

pytestmark = pytest.mark.timeout(120)


class Scene:
    """This process's real state file, with locks held and waited for by real threads."""

    def __init__(self, state_dir: Path, tick_interval: float, hold_timeout: float | None = None,
                 wait_timeout: float | None = None) -> None:
        from h5watch.process.lock import WatchedLock
        from h5watch.process.publisher import lock_record
        from h5watch.statefile import StateWriter, ensure_state_dir

        self.lock_record = lock_record

        self._lock_class = WatchedLock
        self.writer = StateWriter(ensure_state_dir(str(state_dir)), "judged", 0, tick_interval, wait_timeout, hold_timeout)
        self.locks: list = []
        self._release = threading.Event()
        self._threads: list[threading.Thread] = []
        self._inner: dict[str, threading.Lock] = {}
        self._taken: list[threading.Lock] = []

    def lock(self, name: str):
        inner = threading.Lock()
        lock = self._lock_class(name, inner)
        self._inner[name] = inner
        self.locks.append(lock)
        return lock

    def hold(self, lock) -> None:
        """A thread holds ``lock`` until the end of the scene."""
        def holder() -> None:
            with lock:
                self._release.wait(30)

        self._start(holder, f"holder-{lock.name}")
        wait_for(lambda: lock.holder() is not None, 10, what=f"{lock.name} held")

    def take_underneath(self, lock) -> None:
        """Take the wrapped lock itself, as C code takes h5py's phil: no holder is recorded."""
        inner = self._inner[lock.name]
        inner.acquire()
        self._taken.append(inner)

    def wait_on(self, lock) -> None:
        """A thread blocks on ``lock`` until the end of the scene."""
        def waiter() -> None:
            if lock.acquire(timeout=30):
                lock.release()

        self._start(waiter, f"waiter-{lock.name}")
        wait_for(lambda: lock.waiters(), 10, what=f"a waiter on {lock.name}")

    def write(self, watchdog_running: bool = True):
        from h5watch.records import ProcessStatus

        self.writer.write_all([self.lock_record(lock) for lock in self.locks], ProcessStatus(watchdog_running, None))
        return read_state_file(self.writer.path)

    def _start(self, target, name: str) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def close(self) -> None:
        self._release.set()
        for inner in self._taken:
            inner.release()
        for thread in self._threads:
            thread.join(10)
        self.writer.close(exited=False)
        for path in (self.writer.path, self.writer.stacks_path):
            if os.path.exists(path):
                os.unlink(path)


@contextmanager
def scene(state_dir: Path, tick_interval: float = 0.1, **timeouts: float) -> Iterator[Scene]:
    made = Scene(state_dir, tick_interval, **timeouts)
    try:
        yield made
    finally:
        made.close()


def test_a_fresh_process_is_ok(state_dir):
    with scene(state_dir) as s:
        s.hold(s.lock("app.x"))
        state = s.write()
        assert judge(state, time.time(), Thresholds(stuck_after=5, kill_after=5)) == OK
        assert OK.state == "ok" and OK.reason is None and OK.culprit_lock is None and OK.kill_reason is None


def test_a_hold_older_than_the_wait_is_a_hold_not_a_wait(state_dir):
    # The daemon once named a kill caused by a 6 s hold "wait": its waiter had
    # waited past the threshold too, and waits were looked at first.
    with scene(state_dir) as s:
        lock = s.lock("app.x")
        s.hold(lock)
        time.sleep(0.05)
        s.wait_on(lock)
        state = s.write()
        verdict = judge(state, time.time() + 6, Thresholds(stuck_after=5, kill_after=5))
        assert verdict.state == "stuck" and verdict.reason == "hold" and verdict.kill_reason == "hold"
        assert verdict.culprit_lock == "app.x"
        culprit = verdict.stuck.culprit
        assert culprit.holder["thread_name"] == "holder-app.x"
        assert culprit.oldest_wait_seconds > 5  # the wait was past the threshold as well
        assert [w["thread_name"] for w in culprit.waiting_threads] == ["waiter-app.x"]
        assert verdict.stuck.age_seconds > culprit.oldest_wait_seconds


def test_a_hold_behind_an_older_wait_is_the_hold(state_dir):
    # The waiter began waiting before this holder took the lock (it barged in,
    # or took over from an earlier holder): the hold is still the cause.
    with scene(state_dir) as s:
        lock = s.lock("app.x")
        s.hold(lock)
        s.wait_on(lock)
        state = s.write()
        state.records["oldest_wait_since_unix"][0] = state.records["held_since_unix"][0] - 4
        verdict = judge(state, time.time() + 6, Thresholds(stuck_after=5, kill_after=5))
        assert verdict.stuck.culprit.oldest_wait_seconds > verdict.stuck.culprit.holder["hold_age_seconds"]
        assert (verdict.reason, verdict.kill_reason, verdict.culprit_lock) == ("hold", "hold", "app.x")


@pytest.mark.parametrize("kind", ["hold", "wait"])
def test_a_process_is_stuck_past_its_own_timeout(state_dir, kind):
    # A process that says a hold (or a wait) of 1 s is wrong is stuck at 1 s,
    # long before --stuck-after; no kill is due before --kill-after.
    with scene(state_dir, **{f"{kind}_timeout": 1.0}) as s:
        phil = s.lock("h5py.phil")
        if kind == "hold":
            s.hold(phil)
        else:
            s.take_underneath(phil)
        s.wait_on(phil)
        state = s.write()
        assert getattr(state, f"{kind}_timeout") == 1.0
        assert judge(state, time.time() + 0.5, Thresholds(stuck_after=30, kill_after=60)) == OK
        later = time.time() + 2
        verdict = judge(state, later, Thresholds(stuck_after=30, kill_after=60))
        assert (verdict.state, verdict.reason, verdict.culprit_lock, verdict.kill) == ("stuck", kind, "h5py.phil", None)
        # The daemon's fast path (every process's oldest age in one pass) agrees.
        fast = judge(state, later, Thresholds(stuck_after=30, kill_after=60), oldest_age_seconds=2.0)
        assert fast == verdict
        # A --stuck-after below the process's own timeout still rules.
        assert judge(state, time.time() + 0.9, Thresholds(stuck_after=0.5)).reason == kind


def test_a_wait_with_no_recorded_holder_is_a_wait(state_dir):
    with scene(state_dir) as s:
        phil = s.lock("h5py.phil")
        s.take_underneath(phil)
        s.wait_on(phil)
        state = s.write()
        assert judge(state, time.time() + 1, Thresholds(stuck_after=5)) == OK
        verdict = judge(state, time.time() + 6, Thresholds(stuck_after=5))
        assert (verdict.reason, verdict.culprit_lock) == ("wait", "h5py.phil")
        assert verdict.stuck.culprit.holder is None


def test_the_older_of_hold_and_wait_across_locks_and_a_tie_is_the_hold(state_dir):
    with scene(state_dir) as s:
        phil, app = s.lock("h5py.phil"), s.lock("app.x")
        s.take_underneath(phil)
        s.wait_on(phil)
        time.sleep(0.05)
        s.hold(app)
        state = s.write()
        verdict = judge(state, time.time() + 6, Thresholds(stuck_after=5))
        assert (verdict.reason, verdict.culprit_lock) == ("wait", "h5py.phil")  # the wait began first

        held = int(state.records["held"].argmax())
        waited = int(state.records["n_waiters"].argmax())
        state.records["oldest_wait_since_unix"][waited] = state.records["held_since_unix"][held]
        verdict = judge(state, time.time() + 6, Thresholds(stuck_after=5))
        assert (verdict.reason, verdict.culprit_lock) == ("hold", "app.x")


def test_an_orphaned_lock_with_waiters_comes_first(state_dir):
    with scene(state_dir) as s:
        old, orphaned = s.lock("app.old"), s.lock("app.orphaned")
        s.hold(old)
        time.sleep(0.05)
        s.hold(orphaned)
        s.wait_on(orphaned)
        s.write()
        s.writer.write_one(s.lock_record(orphaned, orphan=orphaned.evidence()))  # as the fork path records an orphan
        state = read_state_file(s.writer.path)
        assert judge(state, time.time() + 1, Thresholds(stuck_after=5)) == OK
        verdict = judge(state, time.time() + 6, Thresholds(stuck_after=5))
        assert (verdict.reason, verdict.culprit_lock) == ("orphaned_lock", "app.orphaned")
        assert verdict.stuck.culprit.orphaned is True


def test_an_orphaned_lock_without_waiters_is_judged_as_a_hold(state_dir):
    with scene(state_dir) as s:
        orphaned = s.lock("app.orphaned")
        s.hold(orphaned)
        s.write()
        s.writer.write_one(s.lock_record(orphaned, orphan=orphaned.evidence()))
        state = read_state_file(s.writer.path)
        verdict = judge(state, time.time() + 6, Thresholds(stuck_after=5))
        assert (verdict.reason, verdict.culprit_lock) == ("hold", "app.orphaned")


def test_the_heartbeat_counts_only_with_a_watchdog_and_after_three_ticks(state_dir):
    with scene(state_dir, tick_interval=2.0) as s:
        s.lock("app.idle")
        beating = s.write(watchdog_running=True)
        beat = beating.heartbeat_unix
        thresholds = Thresholds(stuck_after=1)
        assert judge(beating, beat + 5, thresholds) == OK  # past 1 s, within 3 ticks of 2 s
        verdict = judge(beating, beat + 7, thresholds)
        assert verdict.reason == "heartbeat" and verdict.culprit_lock is None and verdict.stuck.culprit is None
        assert verdict.stuck.age_seconds == pytest.approx(7)
        silent = s.write(watchdog_running=False)
        assert judge(silent, silent.heartbeat_unix + 3600, thresholds) == OK


def test_without_a_watchdog_holds_count_as_of_the_last_write(state_dir):
    with scene(state_dir) as s:
        s.hold(s.lock("app.x"))
        state = s.write(watchdog_running=False)
        assert judge(state, time.time() + 3600, Thresholds(stuck_after=5)) == OK
    with scene(state_dir) as s:
        phil = s.lock("h5py.phil")
        s.take_underneath(phil)
        s.wait_on(phil)
        state = s.write(watchdog_running=False)
        # A wait is recorded by the waiter itself: it counts as of now.
        assert judge(state, time.time() + 6, Thresholds(stuck_after=5)).reason == "wait"


def test_a_process_marked_exited_is_not_judged(state_dir):
    with scene(state_dir) as s:
        s.hold(s.lock("app.x"))
        s.write()
        s.writer.close(exited=True)
        state = read_state_file(s.writer.path)
        assert int(state.header["exited"]) == 1
        assert judge(state, time.time() + 3600, Thresholds(stuck_after=5, kill_after=5)) == OK


def test_stuck_and_kill_are_judged_at_their_own_thresholds(state_dir):
    with scene(state_dir) as s:
        s.hold(s.lock("app.x"))
        state = s.write()
        now = time.time() + 6
        past_kill = judge(state, now, Thresholds(stuck_after=30, kill_after=5))
        assert past_kill.state == "ok" and past_kill.kill_reason == "hold" and past_kill.kill.culprit.lock == "app.x"
        stuck_only = judge(state, now, Thresholds(stuck_after=5))
        assert stuck_only.state == "stuck" and stuck_only.kill is None
        # The shortcut the daemon takes (the oldest age it computed for every
        # process at once) gives the same verdict as the lock by lock look.
        oldest = now - float(state.records["held_since_unix"][0])
        for thresholds in (Thresholds(stuck_after=30, kill_after=5), Thresholds(stuck_after=5), Thresholds(stuck_after=60)):
            assert judge(state, now, thresholds, oldest_age_seconds=oldest) == judge(state, now, thresholds)


@pytest.mark.parametrize(
    "stuck_after, kill_after, expected",
    [(None, None, (30.0, None)), (None, "5", (5.0, 5.0)), ("2", "5", (2.0, 5.0)), ("60", None, (60.0, None))],
)
def test_thresholds_default_as_the_daemon_does(stuck_after, kill_after, expected):
    thresholds = Thresholds.parse(stuck_after, kill_after)
    assert (thresholds.stuck_after, thresholds.kill_after) == expected
    assert thresholds.to_json() == {"stuck_after": expected[0], "kill_after": expected[1]}


@pytest.mark.parametrize("stuck_after, kill_after, flag", [
    ("0", None, "--stuck-after"), ("soon", None, "--stuck-after"), (None, "-3", "--kill-after"), (None, "nan", "--kill-after"),
])
def test_bad_thresholds_name_the_option(stuck_after, kill_after, flag):
    with pytest.raises(UsageError, match=f"^{flag}: expected a number of seconds > 0"):
        Thresholds.parse(stuck_after, kill_after)


# -- the daemon and h5watch status, on the same real workers ---------------------


def status(state_dir: Path, *args: str, json_output: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*H5WATCH, "status", "--state-dir", str(state_dir), *(["--json"] if json_output else []), *args],
                            capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode in (0, 1), result.stderr  # 1: a process is stuck
    return result


def waited_past(state_dir: Path, pid: int, seconds: float) -> None:
    """Until the ``stuck`` worker's main thread has waited for app.x longer
    than ``seconds`` (its holder has held it a little longer)."""
    def waited() -> bool:
        report = json.loads(status(state_dir).stdout)
        return any(lock["lock"] == "app.x" and lock["oldest_wait_seconds"] > seconds
                   for process in report["processes"] if process["pid"] == pid for lock in process["locks"])

    wait_for(waited, 20, interval=0.2, what=f"a wait older than {seconds} s")


def test_status_and_the_daemon_give_the_same_verdict(state_dir, daemons, workers, tmp_path):
    # The worker's holder takes app.x, then its main thread waits for it; the
    # daemon starts once both are older than its --kill-after, the hold by a
    # little more.
    stuck_pid = read_json_line(workers(state_dir, "stuck", "-", service="wedged"))["pid"]
    ok_pid = read_json_line(workers(state_dir, "count", str(tmp_path), "5", service="fine"))["pid"]
    waited_past(state_dir, stuck_pid, 2.2)
    daemon = daemons(state_dir, "--scan-interval", "0.2", "--kill-after", "2", "--dry-run")
    wait_for(lambda: daemon.value("h5watch_processes", workload="wedged", state="stuck") == 1, 20,
             what="the daemon to export the worker as stuck")
    assert daemon.value("h5watch_processes", workload="fine", state="ok") == 1
    assert daemon.value("h5watch_processes", workload="fine", state="stuck") == 0
    [would_kill] = wait_for(lambda: daemon.events("worker.would_kill"), 10, what="worker.would_kill")
    assert would_kill["worker_pid"] == stuck_pid and would_kill["reason"] == "hold" and would_kill["lock"] == "app.x"
    assert would_kill["oldest_wait_seconds"] > 2  # the wait was past --kill-after as well

    report = json.loads(status(state_dir, "--kill-after", "2").stdout)
    assert report["thresholds"] == {"stuck_after": 2.0, "kill_after": 2.0}  # stuck_after defaults to kill_after, as for the daemon
    processes = {p["pid"]: p for p in report["processes"]}
    assert processes[stuck_pid]["state"] == "stuck"
    assert processes[stuck_pid]["reason"] == "hold" and processes[stuck_pid]["culprit_lock"] == "app.x"
    assert processes[stuck_pid]["kill_reason"] == "hold"
    [app] = [lock for lock in processes[stuck_pid]["locks"] if lock["lock"] == "app.x"]
    assert app["stuck"] and app["waiters"] == 1 and app["oldest_wait_seconds"] > 2
    assert processes[ok_pid]["state"] == "ok" and processes[ok_pid]["reason"] is None
    assert processes[ok_pid]["kill_reason"] is None

    # Given none, status judges as the daemon running on the state dir does.
    default = json.loads(status(state_dir).stdout)
    assert default["thresholds"] == {"stuck_after": 2.0, "kill_after": 2.0}
    assert default["thresholds_of_daemon_pid"] == daemon.proc.pid
    assert {p["pid"]: p["state"] for p in default["processes"]}[stuck_pid] == "stuck"
    assert f"--kill-after 2s (the daemon's, pid {daemon.proc.pid})" in status(state_dir, json_output=False).stdout

    table = status(state_dir, "--kill-after", "2", json_output=False).stdout
    assert "thresholds: --stuck-after 2s, --kill-after 2s" in table
    [row] = [line for line in table.splitlines() if f" {stuck_pid} " in line]
    assert "STUCK" in row and "hold of app.x for" in row and "a daemon would kill it (hold)" in row
    assert daemon.value("h5watch_processes", workload="wedged", state="stuck") == 1
    (tmp_path / "release").touch()


def test_a_kill_for_a_long_hold_is_counted_as_a_hold(state_dir, daemons, workers):
    proc = workers(state_dir, "stuck", "-", service="held")
    pid = read_json_line(proc)["pid"]
    waited_past(state_dir, pid, 2.2)
    daemon = daemons(state_dir, "--scan-interval", "0.2", "--kill-after", "2", "--grace", "0.5")
    wait_for(lambda: proc.poll() is not None, 20, what="the stuck worker to be killed")
    wait_for(lambda: daemon.value("h5watch_worker_kills_total", workload="held") == 1, 10, what="the kill counted")
    assert daemon.value("h5watch_worker_kills_total", workload="held", reason="hold") == 1
    assert daemon.value("h5watch_worker_kills_total", workload="held", reason="wait") == 0
    [killed] = daemon.events("worker.killed")
    assert killed["worker_pid"] == pid and killed["reason"] == "hold" and killed["lock"] == "app.x"
    assert killed["oldest_wait_seconds"] > 2  # the wait was past --kill-after as well


def test_without_a_daemon_status_judges_at_the_defaults(state_dir, daemons, workers):
    pid = read_json_line(workers(state_dir, "stuck", "-", service="wedged"))["pid"]
    waited_past(state_dir, pid, 1.2)
    report = json.loads(status(state_dir).stdout)
    assert report["thresholds"] == {"stuck_after": 30.0, "kill_after": None} and report["thresholds_of_daemon_pid"] is None
    assert {p["pid"]: p["state"] for p in report["processes"]}[pid] == "ok"
    daemon = daemons(state_dir, "--scan-interval", "0.2", "--stuck-after", "1", "--dry-run")
    wait_for(lambda: json.loads(status(state_dir).stdout)["thresholds_of_daemon_pid"] == daemon.proc.pid, 10,
             what="status to take the running daemon's thresholds")
    report = json.loads(status(state_dir).stdout)
    assert report["thresholds"] == {"stuck_after": 1.0, "kill_after": None}
    assert {p["pid"]: p["state"] for p in report["processes"]}[pid] == "stuck"
    daemon.stop()
    # A daemon that is gone leaves its settings in its lock file: not used.
    assert json.loads(status(state_dir).stdout)["thresholds"] == {"stuck_after": 30.0, "kill_after": None}


def test_a_worker_past_its_own_hold_timeout_is_stuck_for_status_and_daemon(state_dir, daemons, workers):
    pid = read_json_line(workers(state_dir, "stuck", "-", service="strict", options=("--hold-timeout", "1")))["pid"]
    waited_past(state_dir, pid, 1.2)
    result = subprocess.run([*H5WATCH, "status", "--state-dir", str(state_dir), "--json"], capture_output=True, text=True,
                            timeout=30, cwd=REPO)
    assert result.returncode == 1, result
    [process] = [p for p in json.loads(result.stdout)["processes"] if p["pid"] == pid]
    assert (process["state"], process["reason"], process["culprit_lock"]) == ("stuck", "hold", "app.x")
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    wait_for(lambda: daemon.value("h5watch_processes", workload="strict", state="stuck") == 1, 20,
             what="the daemon to export the worker as stuck")


def test_status_takes_the_daemons_threshold_options(state_dir):
    table = status(state_dir, "--stuck-after", "1.5", json_output=False).stdout
    assert "thresholds: --stuck-after 1.5s, --kill-after none" in table
    for args, flag in ((["--kill-after", "-3"], "--kill-after"), (["--stuck-after", "soon"], "--stuck-after")):
        result = subprocess.run([*H5WATCH, "status", "--state-dir", str(state_dir), *args], capture_output=True,
                                text=True, timeout=30, cwd=REPO)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result
        assert f"{flag}: expected a number of seconds > 0" in result.stderr and "Traceback" not in result.stderr
