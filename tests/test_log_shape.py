"""Every log event has a bounded, predictable shape: the head keys first,
one line under 16 KiB whatever the number of threads, capped waiters,
stacks that end in the program's own frames, and pid the process that
wrote the line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, run_python
from daemon_support import H5WATCH, read_json_line

import h5watch

HEAD = ["event", "level", "timestamp", "workload"]
MAX_LINE = 16 * 1024
PACKAGE_DIR = str(Path(h5watch.__file__).resolve().parent)
SCENARIOS = Path(__file__).parent / "scenarios"
IMPLEMENTATIONS = ["python", "compiled"]

# A thread opens an HDF5 file through a file-like object whose reads block:
# h5py's File.__init__ holds phil in a plain `with phil:` the whole time,
# 60 frames deep into the program's own recursion. 100 threads read an
# attribute of another file meanwhile: each waits for phil.
CROWD = """
    import io, sys, threading, time
    import h5watch
    h5watch.install(state_files=False, service="crowd", log_format=sys.argv[1], tick_interval=0.05)
    import h5py, numpy as np

    image = io.BytesIO()
    with h5py.File(image, "w") as f:
        f["x"] = np.arange(10)
    data = image.getvalue()
    with h5py.File(sys.argv[2], "w") as f:
        f.attrs["x"] = 1
    release = threading.Event()

    class BlockingFile(io.BytesIO):
        def readinto(self, buffer):
            release.wait(60)
            return super().readinto(buffer)

    def open_deep(depth):
        if depth:
            return open_deep(depth - 1)
        with h5py.File(BlockingFile(data), "r"):
            pass

    other = h5py.File(sys.argv[2], "r")
    holder = threading.Thread(target=open_deep, args=(60,), name="slow-open")
    holder.start()
    phil = h5py._objects.phil
    snap = lambda: h5watch.snapshot()["locks"]["h5py.phil"]
    while snap()["holder"] is None or snap()["holder"]["thread_name"] != "slow-open":
        time.sleep(0.01)
    readers = [threading.Thread(target=lambda: other.attrs["x"], name=f"reader-{i}") for i in range(100)]
    for reader in readers:
        reader.start()
    while len(snap()["waiters"]) < 100:
        time.sleep(0.01)
    # Every reader waits: now arm the timeouts.
    h5watch.install(state_files=False, service="crowd", log_format=sys.argv[1], tick_interval=0.05,
                    hold_timeout=0.2, wait_timeout=0.2)
    while snap()["stats"]["timeouts"]["hold"] < 1 or snap()["stats"]["timeouts"]["wait"] < 1:
        time.sleep(0.01)
    release.set()
    for reader in readers:
        reader.join(30)
    holder.join(30)
    print("done")
    """


def crowd(tmp_path: Path, log_format: str, implementation: str) -> str:
    if implementation == "compiled":
        from h5watch.process.lock import CompiledWatchedLock

        if CompiledWatchedLock is None:
            pytest.skip("the compiled core is not built here")
    result = run_python(CROWD, args=[log_format, str(tmp_path / "other.h5")], timeout=120,
                        env={"H5WATCH_IMPLEMENTATION": implementation})
    assert result.returncode == 0 and result.stdout.strip() == "done", result.stderr[-3000:]
    return result.stderr


def json_events(stderr: str) -> list[dict]:
    lines = stderr.splitlines()
    assert lines, "no event logged"
    events = []
    for line in lines:
        assert len(line.encode()) + 1 < MAX_LINE, f"a line of {len(line)} bytes: {line[:300]}"
        events.append(json.loads(line))  # every line is one JSON object
    return events


def stacks_in(value: object) -> list[str]:
    if isinstance(value, dict):
        return [stack for key, item in value.items()
                for stack in ([item] if key.endswith("stack") and isinstance(item, str) else stacks_in(item))]
    if isinstance(value, list):
        return [stack for item in value for stack in stacks_in(item)]
    return []


@pytest.mark.timeout(180)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_a_hundred_waiters_give_bounded_events_with_capped_waiters(tmp_path, implementation):
    events = json_events(crowd(tmp_path, "json", implementation))
    assert all(list(event)[:4] == HEAD for event in events), [list(e)[:5] for e in events]
    assert all(event["workload"] == "crowd" and event["pid"] != 0 for event in events)
    by_name = {event["event"]: event for event in events}
    hold = by_name["lock.hold_timeout"]
    assert len(hold["waiters"]) == 5 and hold["waiters_more"] == 95
    [shared] = hold["waiters_more_stacks"]  # the 95 others wait at one line: one stack, counted
    assert shared["threads"] == 95 and "in <lambda>" in shared["stack"]
    assert all(waiter["stack"] == shared["stack"] for waiter in hold["waiters"])
    assert "waiters_more" in by_name["lock.wait_timeout"]
    # The plain `with phil:` of File.__init__ is named from the holder's stack.
    assert hold["holder"]["operation"] == "h5py._hl.files.File.__init__"
    assert hold["holder"]["operation_from_stack"] is True
    # Stacks end in the program's own frames, never h5watch's, and are capped.
    stacks = [stack for event in events for stack in stacks_in(event)]
    assert stacks and not [stack for stack in stacks if PACKAGE_DIR in stack]
    holder_stack = hold["holder"]["stack"]
    assert holder_stack.startswith("[") and "outer frames dropped]" in holder_stack.splitlines()[0]
    repeated = sum(int(n) for n in re.findall(r"Previous line repeated (\d+) more times", holder_stack))
    assert holder_stack.count('  File "') + repeated == 30 and "in readinto" in holder_stack


@pytest.mark.timeout(180)
def test_console_format_prints_stacks_as_indented_blocks(tmp_path):
    stderr = crowd(tmp_path, "console", "compiled" if _compiled() else "python")
    lines = stderr.splitlines()
    [head] = [line for line in lines if "lock.hold_timeout" in line]
    assert "workload=crowd" in head and head.index("lock.hold_timeout") < head.index("workload=crowd")
    assert "\\n" not in stderr  # no stack is one escaped line
    block = lines.index("  holder.stack:", lines.index(head))
    assert lines[block + 1].startswith("    [") and lines[block + 2].startswith('      File "')
    assert "  waiters[0].stack:" in lines and "  waiters_more_stacks[0].stack:" in lines


def _compiled() -> bool:
    from h5watch.process.lock import CompiledWatchedLock

    return CompiledWatchedLock is not None


def test_the_guard_keeps_any_event_valid_json_under_16_kib():
    """Whatever a caller passes (thousands of threads, a stack dump of
    megabytes), the line written is one JSON object under 16 KiB, the head
    keys intact, marked truncated."""
    result = run_python(
        """
        import json, os
        from h5watch import logs

        r, w = os.pipe()
        logs.configure("json", fd=w, level="debug", workload="huge")
        stack = "".join(f'  File "/srv/app/mod{i}.py", line {i}, in f{i}\\n    step()\\n' for i in range(400))
        log = logs.get_logger(logger="h5watch.test")
        log.error("lock.hold_timeout", lock="h5py.phil", holder={"thread_name": "t", "stack": stack},
                  waiters=[{"thread_name": f"w{i}", "stack": stack + str(i)} for i in range(2000)],
                  stacks="x" * 3_000_000)
        log.error("worker.killed", workload="victim", worker_pid=4242, pid=4242, note="é" * 30000, ids=list(range(20000)))
        log.error("small", answer=42)
        os.close(w)
        chunks = []
        while True:
            chunk = os.read(r, 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        print(json.dumps(b"".join(chunks).decode().splitlines()))
        """,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = json.loads(result.stdout)
    assert len(lines) == 3
    assert all(len(line.encode()) + 1 < MAX_LINE for line in lines), [len(line) for line in lines]
    hold, killed, small = (json.loads(line) for line in lines)
    assert list(hold)[:4] == HEAD and hold["event"] == "lock.hold_timeout" and hold["workload"] == "huge"
    assert hold["truncated"] is True and hold["lock"] == "h5py.phil"
    # The largest parts went first: the big dump is cut, the small fields stay.
    assert "characters dropped" in hold["stacks"] or "stacks" in hold.get("dropped_fields", [])
    assert list(killed)[:4] == HEAD and killed["workload"] == "victim" and killed["worker_pid"] == 4242
    assert killed["pid"] == small["pid"] != 4242 and killed["truncated"] is True  # pid: always the writer
    assert "truncated" not in small and small["answer"] == 42


@pytest.mark.timeout(120)
def test_an_orphan_kill_from_the_compiled_core_has_the_same_head(tmp_path):
    proc = subprocess.run([sys.executable, str(SCENARIOS / "orphan_child.py"), str(tmp_path), "phil", "nohook", "kill"],
                          capture_output=True, text=True, timeout=100, start_new_session=True)
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    names = [event["event"] for event in events]
    assert "lock.orphaned" in names and "process.killed" in names, proc.stderr[-3000:]
    for event in events:
        assert list(event)[:5] == [*HEAD, "pid"] and event["workload"] == "orphan_child", event


@pytest.mark.timeout(120)
def test_the_daemons_kill_event_has_its_own_pid_and_names_the_worker(state_dir, daemons, workers):
    daemon = daemons(state_dir, "--scan-interval", "0.3", "--kill-after", "1.5", "--grace", "1")
    proc = workers(state_dir, "stuck", "-", service="wedged")
    worker_pid = read_json_line(proc)["pid"]
    deadline = time.monotonic() + 60
    while not daemon.events("worker.killed") and time.monotonic() < deadline:
        time.sleep(0.1)
    [killed] = daemon.events("worker.killed")
    assert list(killed)[:5] == [*HEAD, "pid"]
    assert killed["pid"] == daemon.proc.pid and killed["worker_pid"] == worker_pid
    assert killed["workload"] == "wedged"
    [started] = daemon.events("daemon.started")
    assert started["pid"] == daemon.proc.pid and started["workload"] == "h5watch-daemon"
    assert all(len(line.encode()) + 1 < MAX_LINE for line in daemon.log_text().splitlines())
    assert proc.wait(30) in (-signal.SIGTERM, -signal.SIGKILL)


def test_log_level_flag_of_run_sets_what_is_shown():
    code = "import h5watch, h5py"
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("H5WATCH_LOG_LEVEL", None)

    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([*H5WATCH, "run", "--state-files", "false", *flags, "--", sys.executable, "-c", code],
                              capture_output=True, text=True, timeout=60, env=env, cwd=REPO)

    loud, quiet = run("--log-level", "info"), run()
    assert loud.returncode == quiet.returncode == 0, loud.stderr + quiet.stderr
    assert "h5watch.installed" in {json.loads(line)["event"] for line in loud.stderr.splitlines()}
    assert quiet.stderr == ""
