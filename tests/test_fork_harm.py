"""First, do no harm: every kind of fork behaves as without h5watch, except
that a fork is bounded and an orphaned lock is named instead of hanging.

Each case runs the same program in a fresh interpreter twice, bare and with
``h5watch.install()`` first, and compares what the program saw.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from conftest import REPO, run_python
from test_fork import events_named, run_scenario

HOLDER = """
import os, sys, threading, time
INSTRUMENT = {instrument}
if INSTRUMENT:
    import h5watch
    h5watch.install(state_files=False, fork_timeout=0.5, {options})
import h5py
held = threading.Event()
def hold():
    with h5py._objects.phil:
        held.set()
        time.sleep({hold_seconds})
holder = threading.Thread(target=hold, name="phil-holder", daemon=True)
holder.start()
held.wait(5)
"""


def _program(body: str, instrument: bool, hold_seconds: float = 2.0, options: str = "") -> str:
    return HOLDER.format(instrument=instrument, hold_seconds=hold_seconds, options=options) + body


def _both(body: str, hold_seconds: float = 2.0, timeout: float = 60, python: str | None = None) -> tuple:
    bare = run_python(_program(body, False, hold_seconds), timeout=timeout, python=python)
    watched = run_python(_program(body, True, hold_seconds), timeout=timeout, python=python)
    return bare, watched


SUBPROCESS_CASES = {
    "default": "subprocess.run(['/bin/echo', 'x'], capture_output=True)",
    "user": "subprocess.run(['/bin/echo', 'x'], capture_output=True, user=os.getuid())",
    "group": "subprocess.run(['/bin/echo', 'x'], capture_output=True, group=os.getgid())",
    "extra_groups": "subprocess.run(['/bin/echo', 'x'], capture_output=True, extra_groups=[os.getgid()])",
    "preexec_fn": "subprocess.run(['/bin/echo', 'x'], capture_output=True, preexec_fn=lambda: None)",
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_subprocess_while_another_thread_holds_phil_returns_as_without_h5watch(case):
    body = f"""
import subprocess
result = {SUBPROCESS_CASES[case]}
print(json.dumps({{"returncode": result.returncode, "stdout": result.stdout.decode()}}))
sys.stdout.flush()
os._exit(0)
"""
    bare, watched = _both("import json\n" + body)
    assert bare.returncode == 0, bare.stderr
    assert watched.returncode == 0, watched.stderr
    assert json.loads(watched.stdout) == json.loads(bare.stdout) == {"returncode": 0, "stdout": "x\n"}


C_FORK = """
import ctypes
SUBINTERPRETER = {subinterpreter}
if SUBINTERPRETER:
    import _testcapi
    assert _testcapi.run_in_subinterp("x = 1") == 0
libc = ctypes.{dll}(None)
pid = libc.fork()
if pid == 0:
    total = sum(range(1000))
    {child_action}
    os._exit(0 if total == 499500 else 3)
_, status = os.waitpid(pid, 0)
print(json.dumps({{"status": os.waitstatus_to_exitcode(status)}}))
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dll", ["PyDLL", "CDLL"])
@pytest.mark.parametrize("subinterpreter", [False, True])
def test_c_level_fork_child_that_survives_bare_survives_with_h5watch(dll, subinterpreter):
    """PyDLL keeps the GIL across fork(), CDLL releases it; a subinterpreter
    once created makes PyGILState_Check() useless. The child runs Python
    without touching h5py: bare and watched it exits 0."""
    body = "import json\n" + C_FORK.format(dll=dll, subinterpreter=subinterpreter, child_action="pass")
    bare, watched = _both(body, hold_seconds=5)
    assert json.loads(bare.stdout) == {"status": 0}, bare.stderr
    assert json.loads(watched.stdout) == {"status": 0}, watched.stderr
    assert watched.stderr == "" or all(line.startswith("{") for line in watched.stderr.splitlines())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dll", ["PyDLL", "CDLL"])
@pytest.mark.parametrize("subinterpreter", [False, True])
def test_c_level_fork_child_using_orphaned_phil_is_killed_with_evidence(dll, subinterpreter, tmp_path):
    """Bare, the child blocks forever on its first h5py call (phil's holder
    did not survive the fork); with h5watch it exits 70 naming the holder."""
    path = tmp_path / "data.h5"
    child_action = f"h5py.File({str(path)!r}, 'w').close()"
    body = "import json\n" + C_FORK.format(dll=dll, subinterpreter=subinterpreter, child_action=child_action)
    watched = run_python(_program(body, True, hold_seconds=30), timeout=60)
    assert json.loads(watched.stdout) == {"status": 70}, watched.stderr
    events = [json.loads(line) for line in watched.stderr.splitlines() if line.startswith("{")]
    [orphaned] = events_named(events, "lock.orphaned")
    assert orphaned["lock"] == "h5py.phil"
    assert orphaned["holder"]["thread_name"] == "phil-holder"
    assert orphaned["fork_hooks_ran"] is False


BOUNDED_FORK = """
import json
data = {path!r}
started = time.monotonic()
pid = os.fork()
if pid == 0:
    with h5py.File(data, "w") as f:
        f["values"] = list(range(10))
    with h5py.File(data, "r") as f:
        os.write(1, ("CHILD-OK %d\\n" % sum(f["values"][:])).encode())
    os._exit(0)
fork_seconds = time.monotonic() - started
_, status = os.waitpid(pid, 0)
print(json.dumps({{"fork_seconds": fork_seconds, "child": os.waitstatus_to_exitcode(status)}}))
sys.stdout.flush()
os._exit(0)
"""


def _h5py_version(python: str | None = None) -> tuple[int, ...]:
    out = run_python("import h5py; print(h5py.__version__)", python=python).stdout.strip()
    return tuple(int(part) for part in out.split(".")[:2])


@pytest.mark.timeout(120)
@pytest.mark.parametrize("on_orphan", ["kill", "recover"])
def test_fork_is_bounded_on_current_h5py_while_phil_is_held_for_a_minute(on_orphan, tmp_path):
    """h5py >= 3.14 waits for phil in its own before-fork hook, unboundedly;
    installed first, h5watch takes that hook over and bounds it."""
    if _h5py_version() < (3, 14):
        pytest.skip("h5py < 3.14 has no before-fork hook of its own")
    body = BOUNDED_FORK.format(path=str(tmp_path / "child.h5"))
    proc = run_python(_program(body, True, hold_seconds=60, options=f"on_orphan={on_orphan!r}"), timeout=60)
    lines = proc.stdout.splitlines()
    result = json.loads(lines[-1])
    # fork_timeout=0.5: the fork returns within fork_timeout + 1 s.
    assert result["fork_seconds"] < 1.5, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    if on_orphan == "kill":
        assert result["child"] == 70
        [orphaned] = events_named(events, "lock.orphaned")
        assert orphaned["holder"]["thread_name"] == "phil-holder"
        assert orphaned["action"] == "killed"
    else:
        assert result["child"] == 0, proc.stderr
        assert "CHILD-OK 45" in lines
        assert any(e["holder"]["thread_name"] == "phil-holder" for e in events_named(events, "lock.recovered"))


@pytest.mark.timeout(60)
def test_fork_bounded_is_reported_in_snapshot_and_install_event():
    first = run_python(
        """
import h5watch
h5watch.install(state_files=False, log_level="info")
import h5py, json
print(json.dumps(h5watch.snapshot()["forks"]["fork_bounded"]))
"""
    )
    assert json.loads(first.stdout.splitlines()[-1]) is True, first.stderr
    late = run_python(
        """
import h5py, json
import h5watch
h5watch.install(state_files=False, log_level="info")
print(json.dumps(h5watch.snapshot()["forks"]["fork_bounded"]))
"""
    )
    expected = _h5py_version() < (3, 14)
    assert json.loads(late.stdout.splitlines()[-1]) is expected, late.stderr
    installed = [json.loads(line) for line in late.stderr.splitlines() if '"h5watch.installed"' in line]
    assert installed and installed[0]["fork_bounded"] is expected
    if not expected:
        assert '"fork.unbounded"' in late.stderr


def _seed(python: str, tmp_path, *extra: str) -> dict:
    result, events, _ = run_scenario(
        python, "seed_fork.py", "--dir", str(tmp_path), "--instrument", "--rounds", "1", *extra, timeout=240
    )
    result["fork_lock_timeouts"] = len(events_named(events, "fork.lock_timeout"))
    return result


@pytest.mark.timeout(900)
def test_seed_scenario_h5py_313_twenty_times_in_a_row_kills_nobody(python313, tmp_path):
    """Nobody is stuck, so no fork waits out fork_timeout and no child is killed:
    the before-fork acquisition is served in turn, not starved by barging readers."""
    for run in range(20):
        result = _seed(python313, tmp_path)
        assert result["exit_codes"] == {"0": 10}, (run, result)
        assert result["hung"] == 0 and result["fork_lock_timeouts"] == 0, (run, result)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("which", ["current", "h5py313"])
def test_readers_holding_their_own_lock_around_h5py_never_stall_a_fork(which, tmp_path, request):
    """Readers do ``with cache: f["values"][:]`` (cache, then phil) while the
    main thread forks: the before-fork hook never holds phil while it waits
    for the cache lock, so no fork waits out fork_timeout and no child dies."""
    python = sys.executable if which == "current" else request.getfixturevalue("python313")
    for run in range(3):
        result = _seed(python, tmp_path, "--app-lock")
        assert result["exit_codes"] == {"0": 10}, (run, result)
        assert result["fork_lock_timeouts"] == 0, (run, result)
        assert max(result["fork_seconds"]) < 5, (run, result)


@pytest.mark.timeout(300)
def test_seed_scenario_hook_skipping_fork_kills_or_serves_every_child_h5watch_can_reach(tmp_path):
    """C code forks while ten threads use h5py. Bare, every child blocks on
    phil forever. With h5watch each child reads correct data or exits 70 with
    evidence, except children wedged in CPython's own GIL hand-over (the fork
    copied it mid-flight): those hang before any Python code can run, bare or
    not, and gdb says so."""
    args = ["--fork", "nohook", "--rounds", "3", "--child-deadline", "5"]
    if shutil.which("gdb"):
        args.append("--classify-hangs")
    result, events, _ = run_scenario(sys.executable, "seed_fork.py", "--dir", str(tmp_path), "--instrument", *args)
    assert result["children"] == 30
    assert result["bad_data"] == 0
    assert set(result["exit_codes"]) <= {"0", "70"}
    assert result["exit_codes"].get("70", 0) >= 1
    if shutil.which("gdb"):
        assert set(result["hung_where"]) <= {"gil"}, result
    if result["exit_codes"].get("70"):
        assert events_named(events, "lock.orphaned")


@pytest.mark.timeout(300)
def test_seed_scenario_hook_skipping_fork_hangs_without_h5watch(tmp_path):
    """The control for the test above."""
    result, _, _ = run_scenario(
        sys.executable, "seed_fork.py", "--dir", str(tmp_path), "--fork", "nohook", "--rounds", "1",
        "--child-deadline", "3",
    )
    assert result["children"] == 10
    assert result["hung"] >= 8


def test_no_cpython_after_fork_call_and_one_inert_libc_fork_handler():
    """What makes a C-level fork harmless: h5watch never calls
    PyOS_AfterFork_Child (its before-fork half would not have run), and the
    only libc fork handler (the compiled core's) bumps a number and does
    nothing else: no Python code, no CPython call, in any child."""
    import re

    sources = {path.name: path.read_text() for path in (REPO / "h5watch").rglob("*") if path.suffix in (".py", ".c")}
    assert not any("PyOS_AfterFork" in text for text in sources.values())
    registrations = [(name, line) for name, text in sources.items() for line in text.splitlines() if "pthread_atfork(" in line]
    assert registrations == [("_lockcore.c", "        pthread_atfork(NULL, NULL, count_fork_in_child);")]
    body = re.search(r"static void count_fork_in_child\(void\) \{(.*?)\}", sources["_lockcore.c"], re.S)
    assert body is not None and body.group(1).strip() == "fork_generation++;"
    assert not (REPO / "h5watch" / "_forkrepair.c").exists()


@pytest.mark.timeout(60)
def test_child_blocked_on_orphaned_phil_inside_h5py_c_code_is_killed_by_its_watchdog(tmp_path):
    """The child drops an h5py object it inherited: its deallocation takes the
    real phil in C, never through h5watch's wrapper, and would wait forever for
    a holder that did not survive the fork. The child's watchdog sees the
    blocked request through the probe and applies on_orphan=kill."""
    path = str(tmp_path / "inherited.h5")
    program = f"""
import gc, json, os, sys, threading, time
import h5watch
h5watch.install(state_files=False, fork_timeout=0.5, tick_interval=0.1)
import h5py, numpy
with h5py.File({path!r}, "w") as f:
    f["v"] = numpy.arange(3.0)
f = h5py.File({path!r}, "r")
held = threading.Event()
def hold():
    with h5py._objects.phil:
        held.set()
        time.sleep(30)
threading.Thread(target=hold, name="phil-holder", daemon=True).start()
held.wait(5)
pid = os.fork()
if pid == 0:
    del f
    gc.collect()
    os._exit(0)
_, status = os.waitpid(pid, 0)
print(json.dumps({{"child": os.waitstatus_to_exitcode(status)}}))
sys.stdout.flush()
os._exit(0)
"""
    proc = run_python(program, timeout=40)
    assert json.loads(proc.stdout.splitlines()[-1]) == {"child": 70}, proc.stderr
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    [orphaned] = events_named(events, "lock.orphaned")
    assert orphaned["seen_waiting_by"] == "probe"
    assert orphaned["holder"]["thread_name"] == "phil-holder"


def test_fork_gate_holds_back_a_newcomer_until_opened_and_a_child_gets_its_own():
    """A thread passing a fork's gate holds its lock for a moment; a child
    forked at that moment (here by C code, which skips the hooks) must still
    be able to fork: every fork raises a gate of its own."""
    result = run_python(
        """
        import ctypes, os, threading, time
        import h5watch
        h5watch.install(state_files=False, fork_timeout=2, on_orphan="recover")
        from h5watch import WatchedLock
        from h5watch.process.lock import ForkGate

        lock = WatchedLock("gated")
        gate = ForkGate(threading.get_ident())
        lock._raise_fork_gate(gate)
        got = threading.Event()
        newcomer = threading.Thread(target=lambda: (lock.acquire(), got.set(), lock.release()))
        newcomer.start()
        held_back = not got.wait(0.3)
        gate.open()
        lock._lower_fork_gate()
        passed = got.wait(5)
        newcomer.join(5)

        # A passer holds the gate's lock (and a watched lock) at the fork.
        passing, done = threading.Event(), threading.Event()
        def passer():
            with lock, gate._closed:
                passing.set()
                done.wait(30)
        threading.Thread(target=passer, daemon=True).start()
        passing.wait(5)
        pid = ctypes.PyDLL(None).fork()
        if pid == 0:
            lock.acquire(timeout=5)  # notices the fork; the orphan is recovered
            inner = os.fork()
            if inner == 0:
                os._exit(0)
            os._exit(0 if os.waitpid(inner, 0)[1] == 0 else 3)
        done.set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            finished, status = os.waitpid(pid, os.WNOHANG)
            if finished:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, 9)
            status = -1
        print(held_back, passed, status)
        """,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "True", "0"]
