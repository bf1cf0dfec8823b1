"""The watchdog: hold and wait timeouts under warn, raise and kill, once per incident."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, run_python

SCRIPT = REPO / "tests" / "scenarios" / "timeouts.py"


def run(on_timeout: str, kind: str) -> tuple[int, dict | None, list[dict]]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), on_timeout, kind],
        capture_output=True, text=True, timeout=60, start_new_session=True,
    )
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    return proc.returncode, result, events


def named(events: list[dict], name: str) -> list[dict]:
    return [event for event in events if event.get("event") == name]


@pytest.mark.timeout(90)
def test_hold_timeout_warn_logs_once_per_incident_with_stack():
    code, result, events = run("warn", "hold")
    assert code == 0
    incidents = named(events, "lock.hold_timeout")
    # Held 1.5 s against a 0.3 s limit with a 0.05 s tick: one incident, one line.
    assert len(incidents) == 1
    event = incidents[0]
    assert event["lock"] == "app.slow"
    assert event["holder"]["thread_name"] == "slow-holder"
    assert "slow_holder" in event["holder"]["stack"]
    assert event["action"] == "warn"
    assert result["timeouts"]["hold"] == 1


@pytest.mark.timeout(90)
def test_wait_timeout_warn_logs_waiter_and_holder_stacks():
    code, result, events = run("warn", "wait")
    assert code == 0
    incidents = named(events, "lock.wait_timeout")
    assert len(incidents) == 1
    event = incidents[0]
    assert event["holder"]["thread_name"] == "slow-holder"
    waiters = event["waiters"]
    assert [w["thread_name"] for w in waiters] == ["patient-waiter"]
    assert "waiter" in waiters[0]["stack"]
    assert result["outcome"] == {"acquired": True}
    assert result["timeouts"]["wait"] == 1


@pytest.mark.timeout(90)
def test_wait_timeout_raise_gives_lock_timeout_to_the_waiter():
    code, result, events = run("raise", "wait")
    assert code == 0
    assert "raised" in result["outcome"] and "app.slow" in result["outcome"]["raised"]
    incidents = named(events, "lock.wait_timeout")
    assert len(incidents) == 1 and incidents[0]["action"] == "raised"
    assert result["timeouts"]["wait"] == 1


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["hold", "wait"])
def test_timeout_kill_exits_with_kill_exit_code_and_evidence(kind):
    code, result, events = run("kill", kind)
    assert code == 70
    assert result is None  # killed before it could print
    incidents = named(events, f"lock.{kind}_timeout")
    assert len(incidents) == 1
    assert incidents[0]["action"] == "killed"
    assert incidents[0]["holder"]["thread_name"] == "slow-holder"
    [killed] = named(events, "process.killed")
    assert killed["reason"] == f"lock.{kind}_timeout" and killed["exit_code"] == 70
    assert killed["holder"]["thread_name"] == "slow-holder"


@pytest.mark.timeout(60)
def test_defaults_never_report_a_long_hold():
    """Timeouts are off unless configured."""
    proc = subprocess.run(
        [sys.executable, "-c", (
            "import h5watch, threading, time\n"
            "h5watch.install(tick_interval=0.05, state_files=False)\n"
            "lock = h5watch.WatchedLock('app.long')\n"
            "with lock: time.sleep(1.0)\n"
            "print(h5watch.snapshot()['locks']['app.long']['stats']['timeouts'])\n"
        )],
        capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 0
    assert "timeout" not in proc.stderr.replace("fork_timeout", "")
    assert "'hold': 0" in proc.stdout


@pytest.mark.timeout(60)
def test_the_deadlock_detector_is_loaded_at_the_watchdog_s_first_tick():
    proc = run_python("""
        import sys, time
        import h5watch
        h5watch.install(state_files=False, tick_interval=2)  # no tick while h5py imports, even on a slow machine
        import h5py
        from h5watch.process import runtime
        print("at start:", "h5watch.process.deadlock" in sys.modules, runtime.watchdog.snapshot()["deadlocks"])
        deadline = time.monotonic() + 20
        while runtime.watchdog.ticks < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        print("after a tick:", "h5watch.process.deadlock" in sys.modules, runtime.watchdog.ticks >= 1)
    """, timeout=50)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    kinds = "{'lock_cycle': 0, 'gc_under_phil': 0, 'import_lock': 0, 'holder_waits_on_waiter': 0}"
    assert lines == [f"at start: False {kinds}", "after a tick: True True"]


FORK_WHILE_EXCLUDED = """
    import os, sys, threading, time
    import h5watch
    h5watch.install(state_files=False, fork_timeout=float(sys.argv[1]))
    import h5py
    from h5watch.process import runtime

    hold_for = float(sys.argv[2])
    taken, released = threading.Event(), threading.Event()

    def holder():
        with runtime.fork_guard.excluding_forks():
            taken.set()
            time.sleep(hold_for)
            released.set()

    threading.Thread(target=holder).start()
    taken.wait()
    pid = os.fork()
    if pid == 0:
        # The child's own exclusion, free: the holder is the parent's thread.
        os._exit(0 if runtime.fork_guard.excluding_forks().acquire(False) else 1)
    print("released when the fork returned:", released.is_set())
    _, status = os.waitpid(pid, 0)
    print("child:", os.waitstatus_to_exitcode(status))
    sys.stdout.flush()
    os._exit(0)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("fork_timeout", "hold_for", "released"), [(10, 0.5, True), (0.2, 5, False)])
def test_a_hooked_fork_waits_for_what_excludes_forks_by_fork_timeout(fork_timeout, hold_for, released):
    # The watchdog imports the deadlock detector holding it: a child forked
    # in the middle would inherit the import half done.
    proc = run_python(FORK_WHILE_EXCLUDED, args=[str(fork_timeout), str(hold_for)], timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"released when the fork returned: {released}", "child: 0"]


@pytest.mark.timeout(60)
def test_the_watchdog_ticks_on_while_a_fork_waits_before_its_detector_is_loaded():
    # The fork holds off the detector's import; the tick that wanted it goes
    # on without it (it must report the fork's stall, not wait it out).
    proc = run_python("""
        import os, sys, threading, time
        import h5watch
        h5watch.install(state_files=False, tick_interval=1, fork_timeout=10)  # the fork starts before the first tick
        import h5py
        from h5py import _objects
        from h5watch.process import runtime

        seen = {}
        holding = threading.Event()

        def holder():
            with _objects.phil:
                holding.set()
                time.sleep(4)
                seen["ticks"] = runtime.watchdog.ticks
                seen["loaded"] = "h5watch.process.deadlock" in sys.modules

        threading.Thread(target=holder).start()
        holding.wait()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        print("during the fork:", seen["ticks"] >= 2, seen["loaded"])
        ticks = runtime.watchdog.ticks
        deadline = time.monotonic() + 20
        while runtime.watchdog.ticks < ticks + 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        print("after it:", "h5watch.process.deadlock" in sys.modules)
        sys.stdout.flush()
        os._exit(0)
    """, timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["during the fork: True False", "after it: True"]


@pytest.mark.timeout(60)
def test_a_tick_never_has_more_objects_alive_than_its_gc_headroom(tmp_path):
    # Whatever the number of locks and operations: a tick that made the
    # state file's records all at once (here 180 operations: several hundred objects)
    # would start a collection here.
    proc = run_python("""
        import gc, sys
        import h5watch
        h5watch.install(state_dir=sys.argv[1], tick_interval=3600)
        import h5py
        from h5watch.process import runtime, watchdog

        locks = [h5watch.WatchedLock(name=f"app{i}") for i in range(3)]
        for lock in locks:
            for op in range(60):
                lock.acquire_for(f"operation {op}")
                lock.release()
        tick = runtime.watchdog.tick
        tick()  # the first loads the deadlock detector
        collections = []
        gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(1))

        def collections_in_a_tick(threshold):
            gc.collect()
            collections.clear()
            gc.set_threshold(threshold)
            try:
                tick()
                for _ in range(10):  # a collection a tick scheduled (3.12+) runs here
                    pass
            finally:
                gc.set_threshold(700)
            return len(collections)

        print("within the headroom:", collections_in_a_tick(watchdog.GC_HEADROOM))
        print("with almost none:", collections_in_a_tick(5) > 0)
    """, args=[str(tmp_path)], timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["within the headroom: 0", "with almost none: True"]


@pytest.mark.timeout(60)
def test_garbage_collections_run_on_the_program_s_threads_not_the_watchdog_s(tmp_path):
    # A collection calls finalizers on the thread it runs on, and h5py's take
    # phil: on the watchdog's thread it took phil from under a program that
    # had just let go of it (h5py's test_phil_fork_with_threads, 3.13).
    proc = run_python("""
        import gc, sys, threading, time
        import h5watch
        h5watch.install(state_dir=sys.argv[1], tick_interval=0.01)
        import h5py
        from h5watch.process import runtime

        by_thread = {}

        def started(phase, info):
            if phase == "start":
                name = threading.current_thread().name
                by_thread[name] = by_thread.get(name, 0) + 1

        gc.callbacks.append(started)
        ticks = runtime.watchdog.ticks
        end = time.monotonic() + 3
        while time.monotonic() < end:
            garbage = []
            garbage.append(garbage)
        print("ticks:", runtime.watchdog.ticks - ticks >= 20)
        print("program's:", by_thread.get("MainThread", 0) > 100)
        print("watchdog's:", by_thread.get("h5watch-watchdog", 0))
    """, args=[str(tmp_path)], timeout=50)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["ticks: True", "program's: True", "watchdog's: 0"]


@pytest.mark.timeout(60)
def test_ticks_leave_no_garbage_while_the_program_waits_behind_a_held_lock(tmp_path):
    # A program blocked behind phil allocates nothing: garbage its ticks made
    # (a reference cycle each time the deadlock detector read the threads'
    # stacks) was then collected on the watchdog's thread, whose finalizers
    # took phil the moment the program's fork gave it back (h5py 3.16's
    # test_phil_fork_with_threads under h5watch, Python 3.13).
    proc = run_python("""
        import gc, sys, threading, time
        import h5watch
        h5watch.install(state_dir=sys.argv[1], tick_interval=0.01)
        import h5py
        from h5py import _objects
        from h5watch.process import runtime

        held = threading.Event()

        def holder():
            with _objects.phil:
                held.set()
                time.sleep(1.5)

        def waiter():
            with _objects.phil:
                pass

        threads = [threading.Thread(target=holder)]
        threads[0].start()
        held.wait()
        threads.append(threading.Thread(target=waiter))
        threads[1].start()
        time.sleep(0.1)
        gc.collect()
        gc.disable()
        try:
            ticks = runtime.watchdog.ticks
            time.sleep(0.8)
            ticks = runtime.watchdog.ticks - ticks
            garbage = gc.collect()
        finally:
            gc.enable()
        for thread in threads:
            thread.join()
        print("ticks:", ticks >= 20)
        print("garbage:", garbage)
    """, args=[str(tmp_path)], timeout=50)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "ticks: True", proc.stdout
    # The ticks' own: none (a few objects of the interpreter's may be there).
    assert int(lines[1].split(":")[1]) < 20, proc.stdout


@pytest.mark.timeout(60)
def test_no_collection_runs_on_the_watchdog_thread_while_a_fork_waits_for_phil(tmp_path):
    # A program whose fork waits behind phil allocates nothing; a collection
    # on the watchdog's thread then would queue h5py's finalizers for phil
    # behind the fork, and they would take it the moment the fork gave it
    # back (h5py 3.16's test_phil_fork_with_threads, Python 3.13, again with
    # the youngest generation close to its threshold).
    proc = run_python("""
        import gc, os, sys, threading, time
        import h5watch
        h5watch.install(state_dir=sys.argv[1], tick_interval=0.01)
        import h5py
        from h5py import _objects

        collections = []
        gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(
            (threading.current_thread().name, time.monotonic())))
        held = threading.Event()
        window = []

        def holder():
            with _objects.phil:
                held.set()
                time.sleep(0.8)

        def squeeze():
            # While the fork waits: the youngest generation brought within
            # the headroom a tick wants (ticks would cross the threshold,
            # waiting does not); the window opens once a tick under way has
            # had time to end.
            time.sleep(0.1)
            gc.set_threshold(gc.get_count()[0] + 30, *gc.get_threshold()[1:])
            time.sleep(0.1)
            window.append(time.monotonic())

        thread = threading.Thread(target=holder)
        thread.start()
        held.wait()
        gc.collect()
        threading.Thread(target=squeeze).start()
        pid = os.fork()
        if pid == 0:
            os._exit(0 if _objects.phil.acquire(blocking=False) else 1)
        ended = time.monotonic()
        took = _objects.phil.acquire(blocking=False)
        if took:
            _objects.phil.release()
        _, status = os.waitpid(pid, 0)
        thread.join()
        during = [name for name, at in collections if window and window[0] <= at < ended]
        print("window:", bool(window) and ended - window[0] > 0.3)
        print("on the watchdog in it:", during.count("h5watch-watchdog"))
        print("took phil after the fork:", took, "child:", os.waitstatus_to_exitcode(status))
    """, args=[str(tmp_path)], timeout=50)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == ["window: True", "on the watchdog in it: 0", "took phil after the fork: True child: 0"], proc.stdout


@pytest.mark.timeout(60)
def test_an_idle_program_near_its_gc_threshold_still_gets_its_ticks(tmp_path):
    # The wait for headroom is bounded: nothing in an idle program collects.
    proc = run_python("""
        import gc, sys, time
        import h5watch
        h5watch.install(state_dir=sys.argv[1], tick_interval=0.2)
        import h5py
        from h5watch.process import runtime

        gc.set_threshold(60)  # never 100 objects of headroom
        ticks = runtime.watchdog.ticks
        time.sleep(3)
        print("ticks:", runtime.watchdog.ticks - ticks)
    """, args=[str(tmp_path)], timeout=50)
    assert proc.returncode == 0, proc.stderr
    ticks = int(proc.stdout.split("ticks:")[1])
    # Every 0.2 s plus at most 0.2 s of waiting: 7 or more in 3 s.
    assert 5 <= ticks <= 16, proc.stdout
