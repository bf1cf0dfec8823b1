"""``h5watch dump PID`` against real workers: the outside view, and one-line refusals."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from daemon_support import H5WATCH, kill_group, read_json_line, start_worker

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def worker(state_dir):
    proc = start_worker(state_dir, "stuck", "-", service="dumped")
    pid = read_json_line(proc)["pid"]
    yield pid
    kill_group(proc)


def dump(state_dir, *args, user: str | None = None) -> subprocess.CompletedProcess:
    command = [*H5WATCH, "dump", "--state-dir", str(state_dir), *args]
    if user is not None:
        command = ["runuser", "-u", user, "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO)


def test_dump_shows_a_live_worker_with_its_faulthandler_stacks(state_dir, worker):
    out = dump(state_dir, str(worker))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["process"]["pid"] == worker and report["process"]["workload"] == "dumped"
    assert report["stacks_source"] == "faulthandler" and "hold_forever" in report["faulthandler"]
    [app] = [lock for lock in report["state_file"]["locks"] if lock["lock"] == "app.x"]
    assert app["holder"]["thread_name"] == "stuck-holder"
    assert report["recorder"]["reason"] is None and isinstance(report["recorder"]["entries"], list)
    os.kill(worker, 0)  # still alive
    text = dump(state_dir, str(worker), "--format", "text")
    assert text.returncode == 0 and "held by stuck-holder" in text.stdout and "hold_forever" in text.stdout


def test_dump_native_reads_every_thread_with_pystack(state_dir, worker):
    pytest.importorskip("pystack")
    out = dump(state_dir, str(worker), "--native")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["stacks_source"] == "pystack"
    [holder] = [t for t in report["threads"] if t["thread_name"] == "stuck-holder"]
    assert holder["python_frames"][-1]["function"] == "hold_forever" and holder["native_frames"]
    os.kill(worker, 0)


@pytest.mark.parametrize("pid, message", [
    ("abc", "expected a process id"), ("0", "expected a process id"), ("99999999", "expected a process id"),
    ("1", "pid 1"), ("self", "expected a process id"),
])
def test_dump_refuses_bad_pids_in_one_line(state_dir, pid, message):
    out = dump(state_dir, pid)
    assert out.returncode == 2 and out.stdout == ""
    assert len(out.stderr.splitlines()) == 1 and message in out.stderr, out.stderr


def test_dump_of_a_process_that_is_not_instrumented_is_one_line(state_dir, tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        out = dump(state_dir, str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1 and "not an instrumented process" in out.stderr


def test_dump_of_another_users_process_is_refused_unless_root(state_dir, worker, tmp_path):
    if os.geteuid() != 0 or not shutil.which("useradd") or not shutil.which("runuser"):
        pytest.skip("needs root, useradd and runuser")
    user = "h5wdump"
    made = subprocess.run(["useradd", "--no-create-home", user], capture_output=True, timeout=30)
    if made.returncode not in (0, 9):  # 9: it exists already
        pytest.skip(f"useradd failed: {made.stderr!r}")
    probe = subprocess.run(["runuser", "-u", user, "--", sys.executable, "-c", "import h5watch.host.dump"], capture_output=True,
                           timeout=30, cwd=REPO)
    if probe.returncode != 0:
        pytest.skip(f"user {user} cannot run this interpreter with h5watch: {probe.stderr.strip()[-200:]}")
    out = dump("/tmp", str(worker), user=user)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
    assert "only root may inspect another user's process" in out.stderr


def test_dump_by_a_non_root_user_of_a_root_process_is_one_line_and_exit_2(state_dir, worker):
    # The same refusal without needing the other user to run this interpreter:
    # a fork of this process drops to that user and runs the command in place.
    if os.geteuid() != 0 or not shutil.which("useradd"):
        pytest.skip("needs root and useradd")
    import pwd
    import select

    made = subprocess.run(["useradd", "--no-create-home", "h5wdump"], capture_output=True, timeout=30)
    if made.returncode not in (0, 9):  # 9: it exists already
        pytest.skip(f"useradd failed: {made.stderr!r}")
    user = pwd.getpwnam("h5wdump")
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        code = 99
        try:
            sys.stderr = open(write_end, "w", buffering=1)  # pytest's capture replaced sys.stderr
            sys.stdout = open(os.devnull, "w")
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            from h5watch.cli import main

            code = main(["dump", "--state-dir", str(state_dir), str(worker)])
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write_end)
    try:
        assert select.select([read_end], [], [], 30)[0], "no answer within 30 s"
        stderr = b""
        while chunk := os.read(read_end, 65536):
            stderr += chunk
    finally:
        os.close(read_end)
        _, status = os.waitpid(child, 0)
    lines = stderr.decode().splitlines()
    assert os.waitstatus_to_exitcode(status) == 2, stderr
    assert len(lines) == 1 and "only root may inspect another user's process" in lines[0], lines
