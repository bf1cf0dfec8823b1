"""Deadlocks are named as they form: each kind, in real programs that hang
forever without h5watch (tests/scenarios/deadlocks.py), with no timeout
configured; reported once, within two ticks, every thread named; raise
breaks the cycle, kill exits with the evidence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import REPO

SCRIPT = REPO / "tests" / "scenarios" / "deadlocks.py"
TICK = 0.2  # the scenario's tick_interval
# Program -> (kind reported, the threads of the cycle, the inferred edge's thread or None).
PROGRAMS = {
    "lock_cycle": ("lock_cycle", {"first", "second"}, None),
    "phil_app_lock": ("lock_cycle", {"reader", "writer"}, None),
    "gc_under_phil": ("gc_under_phil", {"reader", "io"}, "reader"),
    "import_lock": ("import_lock", {"importer", "reader"}, None),
    "holder_waits_on_waiter": ("holder_waits_on_waiter", {"holder", "worker"}, "holder"),
}


class Program:
    """A scenario run as a child process (its own session), read as it goes."""

    def __init__(self, program: str, policy: str, workdir: Path, python: str = sys.executable,
                 implementation: str | None = None, extra: tuple[str, ...] = ()) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("H5WATCH_") and k != "PYTHONPATH"}
        if implementation is not None:
            env["H5WATCH_IMPLEMENTATION"] = implementation
        self.proc = subprocess.Popen(
            [python, str(SCRIPT), program, policy, str(workdir), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, lines: list[str]) -> None:
        for line in stream:
            lines.append(line)

    def events(self, name: str) -> list[dict]:
        found = []
        for line in list(self.stderr):
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def wait_for(self, name: str, timeout: float = 20) -> dict:
        deadline = time.monotonic() + timeout
        while not self.events(name):
            assert time.monotonic() < deadline, f"no {name} event\nstdout:\n{''.join(self.stdout)}\nstderr:\n{''.join(self.stderr)}"
            assert self.proc.poll() is None or not self._alive_readers(), self.output()
            time.sleep(0.05)
        return self.events(name)[0]

    def _alive_readers(self) -> bool:
        return any(reader.is_alive() for reader in self._readers)

    def wait_exit(self, timeout: float = 20) -> int:
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(5)
        return code

    def closing_time(self) -> float:
        times = [float(line.split()[1]) for line in self.stdout if line.startswith("CLOSING ")]
        assert times, self.output()
        return max(times)

    def result(self) -> dict:
        lines = [line for line in self.stdout if line.startswith("RESULT ")]
        assert lines, self.output()
        return json.loads(lines[-1][len("RESULT "):])

    def output(self) -> str:
        return f"stdout:\n{''.join(self.stdout)}\nstderr:\n{''.join(self.stderr)}"

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()


@pytest.fixture
def run(tmp_path):
    started: list[Program] = []

    def start(program: str, policy: str, python: str = sys.executable, implementation: str | None = None,
              extra: tuple[str, ...] = ()) -> Program:
        started.append(Program(program, policy, tmp_path / f"run-{len(started)}", python, implementation, extra))
        return started[-1]

    yield start
    for program in started:
        program.kill()


def unix_time(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_a_deadlock_is_reported_once_within_two_ticks_with_every_thread_named(run, program):
    kind, threads, inferred_thread = PROGRAMS[program]
    child = run(program, "warn")
    event = child.wait_for("lock.deadlock")
    assert event["level"] == "critical" and event["action"] == "warn"
    assert event["kind"] == kind
    assert {entry["thread_name"] for entry in event["cycle"]} == threads
    assert event["threads"] == len(threads)
    for entry in event["cycle"]:
        assert entry["native_id"] and entry["waits_for"] and entry["stack"]
    # Two ticks from the moment the last thread blocked (plus the time to log it).
    assert unix_time(event["timestamp"]) - child.closing_time() <= 2 * TICK + 0.4
    if inferred_thread is None:
        assert event["inferred"] is None
        assert all(entry["certain"] for entry in event["cycle"])
    else:
        assert event["inferred"].startswith(f"thread {inferred_thread!r} waits for")
        [uncertain] = [entry for entry in event["cycle"] if not entry["certain"]]
        assert uncertain["thread_name"] == inferred_thread
    for thread in threads:
        assert repr(thread) in event["summary"]
    time.sleep(6 * TICK)  # still deadlocked, and said once
    assert child.proc.poll() is None
    assert len(child.events("lock.deadlock")) == 1
    assert all(len(line.encode()) < 16 * 1024 for line in child.stderr)


@pytest.mark.timeout(60)
def test_gc_under_phil_says_who_holds_phil_in_what_and_who_collects(run):
    event = run("gc_under_phil", "warn").wait_for("lock.deadlock")
    assert event["summary"] == (
        "Deadlock: thread 'reader' holds h5py's phil in h5py._hl.files.File.__init__ and waits (Event.wait) for"
        " thread 'io'; 'io' is in garbage collection freeing an h5py object and waits for phil; neither can go on."
    )
    reader, io = event["cycle"]
    assert reader["holds"] == "lock 'h5py.phil'" and reader["waiting_in"] == "Event.wait"
    assert "readinto" in reader["stack"]
    assert io["waits_for"] == "lock 'h5py.phil'" and io["waiting_in"].startswith("garbage collection")
    assert "gc.collect()" in io["stack"]


@pytest.mark.timeout(60)
def test_gc_under_phil_is_seen_after_a_single_threaded_fork_stopped_the_watchdog(run):
    """On 3.12+ the watchdog stops for a fork while the program has no other
    thread; the program's threads then deadlock with no wait for a watched
    lock to wake it: the collection that closes the cycle does."""
    child = run("gc_under_phil", "warn", extra=("fork-first",))
    event = child.wait_for("lock.deadlock")
    assert event["kind"] == "gc_under_phil"
    stopped = "WATCHDOG False\n" in child.stdout
    assert stopped is (sys.version_info >= (3, 12)), child.output()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_each_program_hangs_forever_without_h5watch(run, program):
    child = run(program, "bare")
    deadline = time.monotonic() + 20
    while not any(line.startswith("CLOSING ") for line in child.stdout):
        assert time.monotonic() < deadline and child.proc.poll() is None, child.output()
        time.sleep(0.05)
    time.sleep(2.0)
    assert child.proc.poll() is None, child.output()  # still stuck, silently
    assert not child.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("program", sorted(set(PROGRAMS) - {"gc_under_phil"}))
def test_raise_interrupts_a_waiting_thread_and_the_program_finishes(run, program):
    _, threads, _ = PROGRAMS[program]
    child = run(program, "raise")
    assert child.wait_exit(30) == 0, child.output()
    [event] = child.events("lock.deadlock")
    assert event["action"] == "raised" and event["interrupted_thread"] in threads
    result = child.result()
    assert set(result["outcomes"]) == threads
    interrupted = result["outcomes"][event["interrupted_thread"]]
    assert interrupted.startswith("DeadlockError: thread ") and "to break a deadlock" in interrupted
    assert all(outcome == "finished" for name, outcome in result["outcomes"].items() if name != event["interrupted_thread"])
    assert result["deadlocks"][event["kind"]] == 1
    assert result["counted_when_raised"][event["kind"]] == 1  # logged and counted before the thread is woken


@pytest.mark.timeout(60)
@pytest.mark.parametrize("implementation", ["python", "compiled"])
@pytest.mark.parametrize("program", ["lock_cycle", "phil_app_lock"])
def test_each_implementation_reports_and_breaks_a_cycle(run, program, implementation):
    if implementation == "compiled":
        from h5watch.process.lock import CompiledWatchedLock

        if CompiledWatchedLock is None:
            pytest.skip("the compiled core is not built here")
    child = run(program, "raise", implementation=implementation)
    assert child.wait_exit(30) == 0, child.output()
    [event] = child.events("lock.deadlock")
    assert event["action"] == "raised"
    assert sorted(child.result()["outcomes"].values())[-1] == "finished"


@pytest.mark.timeout(60)
def test_raise_says_when_no_thread_of_the_cycle_can_be_interrupted(run):
    """In gc_under_phil one thread waits in Event.wait and the other for phil
    at C level: neither is in a watched lock's acquire."""
    child = run("gc_under_phil", "raise")
    event = child.wait_for("lock.deadlock")
    assert event["action"] == "warn"
    assert "could be interrupted" in event["not_raised"]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_kill_exits_70_with_the_evidence(run, program):
    kind, threads, _ = PROGRAMS[program]
    child = run(program, "kill")
    assert child.wait_exit(30) == 70, child.output()
    [event] = child.events("lock.deadlock")
    assert event["action"] == "killed" and event["exit_code"] == 70 and event["kind"] == kind
    assert {entry["thread_name"] for entry in event["cycle"]} == threads
    [killed] = child.events("process.killed")
    assert killed["reason"] == "lock.deadlock" and killed["kind"] == kind


@pytest.mark.timeout(240)
def test_no_deadlock_is_reported_in_the_seed_workload(tmp_path):
    """10 reader threads (each holding an application lock around its h5py
    calls) while the main thread forks readers; the detector looks every 50 ms."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("H5WATCH_")}
    env["H5WATCH_TICK_INTERVAL"] = "0.05"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "scenarios" / "seed_fork.py"), "--dir", str(tmp_path), "--instrument",
         "--rounds", "2", "--app-lock"],
        capture_output=True, text=True, timeout=200, env=env, start_new_session=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["hung"] == 0 and result["children"] == 20
    assert "lock.deadlock" not in proc.stderr
    # Each reader takes its application lock, then phil, always in that order.
    assert "lock.order_inversion" not in proc.stderr


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["flag", "variable"])
def test_a_bad_on_deadlock_is_one_line_exit_2(where):
    args = [sys.executable, "-m", "h5watch", "run"]
    env = dict(os.environ)
    if where == "flag":
        args += ["--on-deadlock", "explode"]
    else:
        env["H5WATCH_ON_DEADLOCK"] = "explode"
    result = subprocess.run([*args, "--", sys.executable, "-c", "pass"], capture_output=True, text=True, timeout=30,
                            env=env, cwd=REPO)
    assert result.returncode == 2, result
    [line] = result.stderr.strip().splitlines()
    assert ("--on-deadlock" if where == "flag" else "H5WATCH_ON_DEADLOCK") in line or "on_deadlock" in line
    assert "warn, raise, kill" in line


@pytest.mark.timeout(60)
def test_h5watch_run_kills_an_unchanged_program_stuck_in_gc_under_phil(tmp_path):
    """The program itself installs nothing: ``h5watch run --on-deadlock kill`` does."""
    (tmp_path / "w").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("H5WATCH_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "h5watch", "run", "--on-deadlock", "kill", "--state-files", "false", "--",
         sys.executable, str(SCRIPT), "gc_under_phil", "bare", str(tmp_path / "w")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True,
    )
    try:
        _, err = proc.communicate(timeout=40)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 70, err[-2000:]
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    [event] = [event for event in events if event["event"] == "lock.deadlock"]
    assert event["kind"] == "gc_under_phil" and event["action"] == "killed"


@pytest.mark.timeout(60)
def test_uninstall_takes_the_garbage_collection_callback_away():
    code = """
        import gc, h5py, h5watch
        from h5watch.process.gc_activity import GcActivity
        ours = lambda: [cb for cb in gc.callbacks if isinstance(cb, GcActivity)]
        h5watch.install(state_files=False)
        before = len(ours())
        h5watch.install(state_files=False, tick_interval=0.1)  # reconfigured: still one
        again = len(ours())
        h5watch.uninstall()
        print(before, again, len(ours()))
    """
    from conftest import run_python

    result = run_python(code, timeout=30)
    assert result.stdout.split() == ["1", "1", "0"], result.stderr


lock_tests = pytest.importorskip("test.lock_tests", reason="this interpreter has no test.lock_tests")


class TestRLockParityWithInterruptibleWaits(lock_tests.RLockTests):
    """``on_deadlock=raise`` makes blocking waits wait in slices: CPython's
    RLock tests still hold, on a lock wrapping h5py's FastRLock (the timed
    FastRLock path) and, below, on one with its own inner lock."""

    @staticmethod
    def locktype():
        import h5py

        from h5watch.process.lock import WatchedLock

        phil = h5py._objects.phil
        fastrlock = type(getattr(phil, "_inner", phil))
        return WatchedLock("test.interruptible.fastrlock", lock=fastrlock())

    def setUp(self):
        from h5watch.process.lock import wiring

        super().setUp()
        wiring.interruptible = True

    def tearDown(self):
        from h5watch.process.lock import wiring

        wiring.interruptible = False
        super().tearDown()


class TestRLockParityOwnLockWithInterruptibleWaits(TestRLockParityWithInterruptibleWaits):
    @staticmethod
    def locktype():
        from h5watch.process.lock import WatchedLock

        return WatchedLock("test.interruptible.own")


def test_an_interrupted_wait_raises_deadlock_error_and_a_later_wait_does_not():
    from h5watch.process.lock import DeadlockError, WatchedLock, interrupt_wait, wiring

    lock = WatchedLock("test.interrupt")
    wiring.interruptible = True
    outcome: dict[str, object] = {}
    try:
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with lock:
                held.set()
                release.wait(10)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(5)

        def wait() -> None:
            try:
                with lock:
                    outcome["first"] = "acquired"
            except DeadlockError as exc:
                outcome["first"] = exc
            with lock:  # a new wait: an interruption meant for the old one is not for it
                outcome["second"] = "acquired"

        waiter = threading.Thread(target=wait)
        waiter.start()
        deadline = time.monotonic() + 5
        while not lock._wait_starts():
            assert time.monotonic() < deadline
            time.sleep(0.01)
        [(ident, since_ns)] = lock._wait_starts()
        interrupt_wait(ident, since_ns - 1, DeadlockError("stale"))  # another wait's: ignored
        time.sleep(0.15)
        assert "first" not in outcome
        error = DeadlockError("break it", {"kind": "lock_cycle"})
        interrupt_wait(ident, since_ns, error)
        deadline = time.monotonic() + 5
        while "first" not in outcome:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert outcome["first"] is error and error.evidence == {"kind": "lock_cycle"}
        release.set()
        holder.join(5)
        waiter.join(5)
        assert outcome["second"] == "acquired"
    finally:
        wiring.interruptible = False
        wiring.interrupts.clear()


@pytest.mark.timeout(60)
def test_a_fork_waiting_for_the_locks_is_no_deadlock(tmp_path):
    """A fork starts while a thread holds an application lock and is about to
    call h5py: the before-fork hook never holds one lock while it waits for
    another, so the detector, looking every 0.1 s, finds no cycle."""
    from conftest import run_python

    code = """
        import os, sys, threading, time
        import h5watch
        h5watch.install(state_files=False, fork_timeout=1.5, tick_interval=0.1)
        import h5py
        app = h5watch.WatchedLock("app.config")
        holding = threading.Event()
        def holder():
            with app:
                holding.set()
                time.sleep(0.3)  # the fork starts meanwhile and takes phil first
                with h5py.File(sys.argv[1], "w") as f:
                    f.attrs["x"] = 1
        thread = threading.Thread(target=holder, name="config-writer")
        thread.start()
        holding.wait()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        thread.join()
        print("done", h5watch.snapshot()["watchdog"]["deadlocks"]["lock_cycle"])
    """
    result = run_python(code, args=[str(tmp_path / "x.h5")], timeout=40)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["done", "0"], result.stderr
    assert "lock.deadlock" not in result.stderr
