"""No everyday cost: what every process under ``h5watch run`` pays when it
has nothing to report, and what forking programs see.

Real interpreters in the environment ``h5watch run`` gives its command
(``h5watch.cli.run.instrumented_environ``). Speed is measured in
``benchmarks/run.py``; these tests pin what can be seen: modules loaded,
threads, files, bytes on stderr, warnings.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_python

from h5watch.cli.run import instrumented_environ

pytestmark = pytest.mark.timeout(180)

HEAVY = ("numpy", "h5py", "structlog", "prometheus_client")
DEFERRED = ("h5watch.process.lock", "h5watch.process.fork", "h5watch.process.h5py_hook", "h5watch.process.watchdog", "h5watch.process.publisher",
            "h5watch.statefile", "h5watch.export.metrics", "h5watch.process.probe")
FORK_WARNS = sys.version_info >= (3, 12)
MULTI_THREADED = "is multi-threaded, use of fork()"


def under_run(state_dir: Path, **flags: str) -> dict[str, str]:
    """The environment of a command run by ``h5watch run --state-dir ...``."""
    return instrumented_environ({"state_dir": str(state_dir), **flags}, environ={})


def children_files(state_dir: Path, parent: int) -> list[str]:
    if not state_dir.exists():
        return []
    files = state_dir / str(os.geteuid())  # this user's subdirectory of the state dir
    return sorted(name for name in os.listdir(files) if not name.startswith(f"{parent}-")) if files.exists() else []


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


# -- start-up ---------------------------------------------------------------------


def test_python_c_pass_loads_nothing_heavy_starts_nothing_and_leaves_nothing(tmp_path):
    state_dir = tmp_path / "state"
    result = run_python(
        f"""
        import json, os, sys
        import h5watch
        print(json.dumps({{
            "installed": h5watch.is_installed(),
            "loaded": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m in {DEFERRED!r}),
            "threads": len(os.listdir("/proc/self/task")),
            "meta_path": [type(f).__name__ for f in sys.meta_path],
        }}))
        """,
        env=under_run(state_dir),
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = last_json(result.stdout)
    assert report["installed"] is True
    assert report["loaded"] == []
    assert report["threads"] == 1
    assert "_ImportTrigger" in report["meta_path"]  # armed for h5py
    assert children_files(state_dir, -1) == []


def test_import_h5py_instruments_it_fully_without_structlog_or_exporter(tmp_path):
    state_dir = tmp_path / "state"
    result = run_python(
        f"""
        import json, sys
        import h5py, numpy
        import h5watch
        with h5py.File({str(tmp_path / "x.h5")!r}, "w") as f:
            f["v"] = numpy.arange(5)
        snap = h5watch.snapshot()
        print(json.dumps({{
            "coverage": snap["h5py"]["coverage"],
            "acquisitions": snap["locks"]["h5py.phil"]["stats"]["acquisitions"],
            "watchdog": snap["watchdog"]["running"],
            "loaded": sorted(m for m in ("structlog", "prometheus_client", "h5watch.export.metrics") if m in sys.modules),
        }}))
        """,
        env=under_run(state_dir),
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = last_json(result.stdout)
    assert report["coverage"] == "full" and report["acquisitions"] > 0
    assert report["watchdog"] is True
    assert report["loaded"] == []


def test_a_watched_lock_alone_starts_h5watch_without_numpy(tmp_path):
    """No h5py: looking up h5watch.WatchedLock starts the fork hooks, the
    watchdog and (at its first tick) the state file, all without numpy."""
    state_dir = tmp_path / "state"
    result = run_python(
        """
        import json, os, sys, time
        import h5watch
        lock = h5watch.WatchedLock("app.alone")
        with lock:
            pass
        time.sleep(0.3)
        snap = h5watch.snapshot()
        print(json.dumps({"watchdog": snap["watchdog"]["running"], "state": snap["state"]["path"],
                          "numpy": "numpy" in sys.modules, "pid": os.getpid()}))
        """,
        env=under_run(state_dir, tick_interval="0.05"),
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = last_json(result.stdout)
    assert report["watchdog"] is True and report["numpy"] is False
    assert report["state"] and os.path.basename(report["state"]).startswith(f"{report['pid']}-")


# -- silence ----------------------------------------------------------------------

POOL_WORKER = '''
import h5py


def read(path):
    with h5py.File(path, "r") as f:
        return int(f["v"][:].sum())
'''

POOL = """
import multiprocessing, sys
import h5py, numpy
import pool_worker

if __name__ == "__main__":
    paths = []
    for i in range(4):
        path = f"{directory}/f{{i}}.h5"
        with h5py.File(path, "w") as f:
            f["v"] = numpy.arange(10) * i
        paths.append(path)
    with multiprocessing.get_context(sys.argv[1]).Pool(2) as pool:
        print(pool.map(pool_worker.read, paths))
"""


@pytest.mark.parametrize(
    "case",
    ["pass", "h5py", "spawn pool", "fork pool"],
)
def test_an_instrumented_process_prints_nothing(tmp_path, case):
    state_dir = tmp_path / "state"
    (tmp_path / "pool_worker.py").write_text(POOL_WORKER)
    if case == "pass":
        code, args = "pass", []
    elif case == "h5py":
        code = f"""
        import h5py, numpy
        with h5py.File({str(tmp_path / "x.h5")!r}, "w") as f:
            f["v"] = numpy.arange(5)
        with h5py.File({str(tmp_path / "x.h5")!r}, "r") as f:
            assert f["v"][:].sum() == 10
        """
        args = []
    else:
        (tmp_path / "pool_main.py").write_text(POOL.format(directory=tmp_path))
        code = f"import runpy, sys; sys.path.insert(0, {str(tmp_path)!r}); runpy.run_path({str(tmp_path / 'pool_main.py')!r}, run_name='__main__')"
        args = [case.split()[0]]
    result = run_python(code, env=under_run(state_dir), cwd=tmp_path, args=args, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    if case.endswith("pool"):
        assert result.stdout.strip().splitlines()[-1] == "[0, 45, 90, 135]"


def test_info_events_show_at_log_level_info_and_warnings_always(tmp_path):
    code = """
        import h5py
        import h5watch
        h5watch.install(state_files=False)
        """
    late_default = run_python(code)
    assert late_default.returncode == 0, late_default.stderr
    warnings = [json.loads(line) for line in late_default.stderr.splitlines() if line.startswith("{")]
    assert {e["event"] for e in warnings} >= {"h5py.instrumented"} and all(e["level"] == "warning" for e in warnings)

    early = "import h5watch\nh5watch.install(state_files=False)\nimport h5py\n"
    quiet = run_python(early)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    loud = run_python(early, env={"H5WATCH_LOG_LEVEL": "info"})
    events = {json.loads(line)["event"]: json.loads(line) for line in loud.stderr.splitlines() if line.startswith("{")}
    assert events["h5watch.installed"]["level"] == "info"
    assert events["h5py.instrumented"]["coverage"] == "full"


def test_events_render_as_structlog_did_and_import_nothing_once_watching():
    """The JSON line is the one structlog's chain rendered (without loading
    structlog; the head keys ordered first), and logging imports nothing once h5watch watches: an event
    may come from an at-fork hook, where an import is a hazard."""
    result = run_python(
        """
        import json, os, re, sys
        import h5watch
        h5watch.install(state_files=False, log_level="debug")
        import h5py
        from h5watch import logs

        r, w = os.pipe()
        logs.configure("json", fd=w, level="debug")
        before = set(sys.modules)
        fields = dict(holder={"thread_name": "t", "since": 1.5, 3: None}, waiters=[1, (2, "x")], stack=None, obj=object(),
                      text=chr(233) + chr(9) + chr(34) + "q", ratio=float("nan"), big=10**30, flag=True, neg=-0.0, inf=float("inf"))
        logs.get_logger(logger="h5watch.test").error("lock.hold_timeout", **fields)
        imported = sorted(set(sys.modules) - before)
        import structlog
        chain = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True),
                 structlog.processors.format_exc_info,
                 # the head first, then pid (always this process), then the rest
                 lambda _l, _m, d: {**{k: d.pop(k) for k in ("event", "level", "timestamp")},
                                    "workload": h5watch.snapshot()["service"], "pid": os.getpid(), **d},
                 structlog.processors.JSONRenderer(default=repr)]
        class Sink:
            def msg(self, line):
                os.write(w, (line + "\\n").encode())
            error = msg
        structlog.wrap_logger(Sink(), processors=chain).error("lock.hold_timeout", logger="h5watch.test", **fields)
        os.close(w)
        ours, theirs = os.read(r, 1 << 16).decode().splitlines()
        same = re.sub(r'"timestamp": "[^"]+"', "", ours) == re.sub(r'"timestamp": "[^"]+"', "", theirs)
        print(json.dumps({"imported": imported, "same": same, "ours": ours, "theirs": theirs}))
        """,
    )
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["imported"] == []
    assert report["same"], (report["ours"], report["theirs"])
    assert json.loads(report["ours"])["timestamp"].endswith("Z")


def test_log_level_is_a_checked_option_and_a_flag_of_run():
    from h5watch.options import OptionError, resolve

    assert resolve({}, {}).log_level == "warning"
    assert resolve({}, {"H5WATCH_LOG_LEVEL": "ERROR"}).log_level == "error"
    with pytest.raises(OptionError) as error:
        resolve({"log_level": "verbose"}, {})
    assert str(error.value) == "log_level: expected one of debug, info, warning, error, critical, got 'verbose'"
    result = run_python(
        "import sys; from h5watch.cli import main; sys.exit(main(['run', '--log-level', 'chatty', '--', 'true']))"
    )
    assert result.returncode == 2
    assert "H5WATCH_LOG_LEVEL: expected one of debug, info, warning, error, critical, got 'chatty'" in result.stderr \
        or "log_level: expected one of debug, info, warning, error, critical, got 'chatty'" in result.stderr


# -- forks --------------------------------------------------------------------------


def test_preexec_fn_children_leave_no_file_and_print_nothing(tmp_path):
    state_dir = tmp_path / "state"
    result = run_python(
        f"""
        import json, os, subprocess
        import h5py, numpy
        import h5watch
        with h5py.File({str(tmp_path / "x.h5")!r}, "w") as f:
            f["v"] = numpy.arange(5)
        for _ in range(5):
            subprocess.run(["true"], preexec_fn=lambda: None, check=True)
            subprocess.run(["true"], preexec_fn=os.setsid, check=True)
        print(json.dumps({{"pid": os.getpid(), "watchdog": h5watch.snapshot()["watchdog"]["running"]}}))
        """,
        env=under_run(state_dir, tick_interval="0.05"),
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    report = last_json(result.stdout)
    assert children_files(state_dir, report["pid"]) == []
    assert report["watchdog"] is True  # a pre-exec fork does not warn: nothing to stop for


def test_a_preexec_fn_child_that_finds_an_orphan_leaves_its_evidence_and_count(tmp_path):
    """subprocess's child makes nothing of its own, except when preexec_fn
    finds an orphaned lock (the fork could not take it within fork_timeout):
    then its file holds the orphan, the kill's count and its recorder entries."""
    state_dir = tmp_path / "state"
    result = run_python(
        f"""
        import json, os, subprocess, threading, time
        import h5watch
        h5watch.install(state_dir={str(state_dir)!r}, fork_timeout=0.2, service="orphan")
        lock = h5watch.WatchedLock("app.stuck")
        held = threading.Event()
        def holder():
            with lock:
                held.set()
                time.sleep(60)
        threading.Thread(target=holder, name="stuck-holder", daemon=True).start()
        held.wait()
        result = subprocess.run(["true"], preexec_fn=lock.acquire)
        print(json.dumps({{"pid": os.getpid(), "returncode": result.returncode}}), flush=True)
        os._exit(0)
        """,
    )
    report = last_json(result.stdout)
    assert report["returncode"] == 70, result.stderr
    [child] = children_files(state_dir, report["pid"])[::2]  # its .h5w, then its .stacks
    from h5watch.statefile import read_recorder, read_state_file

    state = read_state_file(str(state_dir / str(os.geteuid()) / child), accept_torn=True)
    [record] = [r for r in state.records if bytes(r["name"]).rstrip(b"\0") == b"app.stuck"]
    assert bool(record["orphaned"]) and int(record["orphans"][0]) == 1  # killed, counted once
    kinds = [entry["kind"] for entry in read_recorder(state)]
    assert kinds[:2] == ["forked", "orphan"], kinds


FORKING = """
import json, multiprocessing, os, subprocess, sys, time
import h5py, numpy
import h5watch

path = sys.argv[1]
with h5py.File(path, "w") as f:
    f["v"] = numpy.arange(5)
time.sleep(0.3)  # a few watchdog ticks: the state file exists
before = h5watch.snapshot()["watchdog"]["running"]


def read_in_child():
    with h5py.File(path, "r") as f:
        assert f["v"][:].sum() == 10


pid = os.fork()
if pid == 0:
    read_in_child()
    grandchild = os.fork()  # the child forks too
    if grandchild == 0:
        read_in_child()
        os._exit(0)
    os._exit(os.waitstatus_to_exitcode(os.waitpid(grandchild, 0)[1]))
assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
process = multiprocessing.get_context("fork").Process(target=read_in_child)
process.start()
process.join()
assert process.exitcode == 0
subprocess.run(["true"], preexec_fn=lambda: None, check=True)
read_in_child()
print(json.dumps({"pid": os.getpid(), "before": before, "after": h5watch.snapshot()["watchdog"]["running"]}))
"""


@pytest.mark.parametrize("warnings", ["error", "default", "always::DeprecationWarning"])
def test_a_forking_h5py_program_gets_no_new_warning(tmp_path, warnings):
    """-W error turns any warning into an exception (and a ResourceWarning in a
    finaliser into an "Exception ignored" line); -W default shows every
    ResourceWarning; always::DeprecationWarning shows Python 3.12+'s
    multi-threaded-fork warning wherever it is raised."""
    state_dir = tmp_path / "state"
    env = under_run(state_dir, tick_interval="0.05")
    env["PYTHONWARNINGS"] = warnings
    result = run_python(FORKING, env=env, args=[str(tmp_path / "x.h5")])
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = last_json(result.stdout)
    assert report["before"] is True
    # 3.12+: stopped for the first fork (the program has no thread of its own);
    # 3.10 and 3.11 do not warn, and keep it.
    assert report["after"] is (not FORK_WARNS)


def test_bare_python_really_warns_for_a_thread_at_fork(tmp_path):
    """The control: the warning the tests above look for exists, and is shown
    by the same settings, for a program with a thread of its own."""
    if not FORK_WARNS:
        pytest.skip("Python < 3.12 does not warn at fork")
    result = run_python(
        """
        import os, threading, time
        threading.Thread(target=time.sleep, args=(2,), daemon=True).start()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        """,
        env={"PYTHONWARNINGS": "always::DeprecationWarning"},
    )
    assert MULTI_THREADED in result.stderr


def test_hold_timeout_keeps_the_watchdog_through_forks_as_documented(tmp_path):
    state_dir = tmp_path / "state"
    env = under_run(state_dir, hold_timeout="60")
    env["PYTHONWARNINGS"] = "always::DeprecationWarning"
    result = run_python(FORKING, env=env, args=[str(tmp_path / "x.h5")])
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["before"] is True and report["after"] is True
    if FORK_WARNS:
        assert MULTI_THREADED in result.stderr  # the documented consequence


def test_a_threaded_program_keeps_its_watchdog_and_a_wait_restarts_a_stopped_one(tmp_path):
    state_dir = tmp_path / "state"
    result = run_python(
        """
        import json, os, threading, time
        import h5py
        import h5watch
        report = {}
        stop = threading.Event()
        helper = threading.Thread(target=stop.wait, name="app-thread")
        helper.start()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        report["with_a_thread"] = h5watch.snapshot()["watchdog"]["running"]
        stop.set()
        helper.join()
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        report["alone"] = h5watch.snapshot()["watchdog"]["running"]
        lock = h5watch.WatchedLock("app.wait")
        held = threading.Event()
        def holder():
            with lock:
                held.set()
                time.sleep(0.3)
        thread = threading.Thread(target=holder)
        thread.start()
        held.wait()
        with lock:
            pass
        thread.join()
        report["after_a_wait"] = h5watch.snapshot()["watchdog"]["running"]
        print(json.dumps(report))
        """,
        env=under_run(state_dir),
    )
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["with_a_thread"] is True
    assert report["alone"] is (not FORK_WARNS)
    assert report["after_a_wait"] is True


def test_a_stopped_watchdog_is_marked_in_the_state_file(tmp_path):
    if not FORK_WARNS:
        pytest.skip("the watchdog stops for a fork only where Python warns (3.12+)")
    state_dir = tmp_path / "state"
    result = run_python(
        """
        import json, os, time
        import h5py
        import h5watch
        from h5watch.statefile import read_state_file
        time.sleep(0.3)
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
        time.sleep(0.5)
        state = read_state_file(h5watch.snapshot()["state"]["path"])
        print(json.dumps({"running": state.watchdog_running, "age": time.time() - state.heartbeat_unix}))
        """,
        env=under_run(state_dir, tick_interval="0.05"),
    )
    assert result.returncode == 0, result.stderr
    report = last_json(result.stdout)
    assert report["running"] is False and report["age"] >= 0.4  # no heartbeat since the fork


# -- the daemon and status: a process without a watchdog ------------------------------


def _write_state(state_dir: Path, watchdog_running: bool) -> object:
    """This (live) process's state file, as a process without (or with) a
    watchdog leaves it: one record, held for 0.2 s at the last write."""
    import threading

    from h5watch.process.lock import WatchedLock
    from h5watch.process.publisher import lock_record
    from h5watch.records import ProcessStatus
    from h5watch.statefile import StateWriter, ensure_state_dir

    writer = StateWriter(ensure_state_dir(str(state_dir)), "idle", 0, 0.1)
    lock = WatchedLock(f"app.idle.{watchdog_running}", threading.Lock())
    with lock:
        time.sleep(0.2)
        writer.write_all([lock_record(lock)], ProcessStatus(watchdog_running, None))
    return writer


@pytest.mark.parametrize("watchdog_running", [False, True])
def test_status_and_daemon_judge_a_process_without_watchdog_by_its_records(tmp_path, watchdog_running):
    from h5watch.host.daemon import Daemon
    from h5watch.host.status import collect_status, render
    from h5watch.host.verdict import Thresholds

    state_dir = tmp_path / "state"
    writer = _write_state(state_dir, watchdog_running)
    try:
        time.sleep(1.6)  # the heartbeat, and the hold as recorded, age past stuck_after
        report = collect_status(str(state_dir), Thresholds(stuck_after=1.0))
        [process] = [p for p in report["processes"] if p["pid"] == os.getpid()]
        assert process["watchdog_running"] is watchdog_running
        daemon = Daemon(str(state_dir), 0.5, None, 1.0, 1.0, False)
        aggregate = daemon.scan()
        states = {state for (workload, state), n in aggregate.processes.items() if workload == "idle" and n}
        if watchdog_running:
            # A watchdog that stopped beating: stuck, by heartbeat and by hold.
            assert process["state"] == "stuck" and states == {"stuck"}
            assert aggregate.heartbeat_age["idle"] >= 1.5
        else:
            # No heartbeat to judge, and the hold was 0.2 s old at the last write.
            assert process["state"] == "ok" and states == {"ok"}, process
            assert process["locks"][0]["holder"]["hold_age_seconds"] < 1.0
            assert aggregate.heartbeat_age["idle"] == 0.0
            assert "no watchdog" in render(report)
    finally:
        writer.close(exited=False)
        for path in (state_dir / str(os.geteuid())).iterdir():
            path.unlink()


def test_orphan_in_a_child_without_watchdog_is_still_stuck(tmp_path):
    """Waits are recorded by the waiter itself and judged as of now, with or
    without a watchdog: a single-threaded child waiting on an orphaned lock
    is stuck."""
    from h5watch.host.status import collect_status
    from h5watch.host.verdict import Thresholds

    state_dir = tmp_path / "state"
    code = textwrap.dedent(
        f"""
        import ctypes, json, os, threading, time
        import h5watch
        h5watch.install(state_dir={str(state_dir)!r}, on_orphan="warn", tick_interval=0.05)
        lock = h5watch.WatchedLock("app.orphan", threading.Lock())
        forked = threading.Event()
        def holder():
            with lock:
                forked.wait(30)
        threading.Thread(target=holder, name="doomed", daemon=True).start()
        time.sleep(0.2)
        pid = ctypes.PyDLL(None).fork()
        if pid == 0:
            lock.acquire()
            os._exit(0)
        forked.set()
        print(json.dumps({{"child": pid}}), flush=True)
        time.sleep(30)
        """
    )
    import signal
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        child = json.loads(proc.stdout.readline())["child"]
        deadline = time.monotonic() + 20
        while True:
            report = collect_status(str(state_dir), Thresholds(stuck_after=0.5))
            mine = [p for p in report["processes"] if p["pid"] == child]
            if mine and mine[0]["state"] == "stuck":
                break
            assert time.monotonic() < deadline, report
            time.sleep(0.1)
        assert mine[0]["watchdog_running"] is False
        [entry] = mine[0]["locks"]
        assert entry["orphaned"] and entry["waiters"] == 1 and entry["stuck"]
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
