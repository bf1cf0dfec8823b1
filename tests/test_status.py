"""``h5watch status`` on real workers: every waiter accounted for, and an
exit status a script can act on (0 ok, 1 stuck, 2 bad input)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import REPO
from daemon_support import H5WATCH, read_json_line, wait_for

pytestmark = pytest.mark.timeout(120)


def status(state_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*H5WATCH, "status", "--state-dir", str(state_dir), *args], capture_output=True, text=True,
                          timeout=30, cwd=REPO)


def process_of(state_dir: Path, pid: int, *args: str) -> dict:
    [process] = [p for p in json.loads(status(state_dir, "--json", *args).stdout)["processes"] if p["pid"] == pid]
    return process


def test_every_waiter_is_listed_or_counted(state_dir, workers):
    pid = read_json_line(workers(state_dir, "crowd", "-", "6", service="crowd"))["pid"]

    def app_lock() -> dict | None:
        [app] = [lock for lock in process_of(state_dir, pid)["locks"] if lock["lock"] == "app.x"]
        return app if app["waiters"] == 6 else None

    app = wait_for(app_lock, 20, interval=0.2, what="six waiters in the state file")
    # The state file records the four oldest waiters; --json says how many more there are.
    assert [w["thread_name"] for w in app["waiting_threads"]] == ["waiter-0", "waiter-1", "waiter-2", "waiter-3"]
    assert app["waiters_unrecorded"] == 2
    table = status(state_dir).stdout
    assert "6 waiting (waiter-0, waiter-1, waiter-2, waiter-3, +2 more), oldest" in table, table


def test_one_waiter_has_no_more(state_dir, workers):
    pid = read_json_line(workers(state_dir, "crowd", "-", "1", service="crowd"))["pid"]
    wait_for(lambda: any(lock["waiters"] == 1 for lock in process_of(state_dir, pid)["locks"]), 20, interval=0.2,
             what="the waiter in the state file")
    [app] = [lock for lock in process_of(state_dir, pid)["locks"] if lock["lock"] == "app.x"]
    assert app["waiters_unrecorded"] == 0
    assert "1 waiting (waiter-0), oldest" in status(state_dir).stdout


def test_exit_status_is_1_while_a_process_is_stuck(state_dir, workers, tmp_path):
    read_json_line(workers(state_dir, "count", str(tmp_path), "5", service="fine"))
    assert status(state_dir).returncode == 0
    assert status(state_dir, "--json").returncode == 0
    pid = read_json_line(workers(state_dir, "stuck", "-", service="wedged"))["pid"]
    wait_for(lambda: process_of(state_dir, pid, "--stuck-after", "1")["state"] == "stuck", 20, interval=0.2,
             what="the worker stuck past 1 s")
    for args in ((), ("--json",)):
        result = status(state_dir, "--stuck-after", "1", *args)
        assert result.returncode == 1, result
        assert result.stderr == ""
    assert status(state_dir, "--stuck-after", "3600").returncode == 0  # not yet stuck at the daemon's threshold


def test_the_exit_status_is_in_the_help():
    result = subprocess.run([*H5WATCH, "status", "--help"], capture_output=True, text=True, timeout=30, cwd=REPO)
    assert result.returncode == 0
    assert "0 when no live process is stuck; 1 when one is" in " ".join(result.stdout.split())


@pytest.mark.parametrize("make", ["missing", "file", "parent_missing"])
def test_a_state_dir_that_is_no_directory_is_one_line_exit_2(tmp_path, make):
    target = tmp_path / "typo"
    if make == "file":
        target.write_text("")
    elif make == "parent_missing":
        target = target / "deep" / "dir"
    result = status(target)
    assert result.returncode == 2, result
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert str(target) in result.stderr
    assert ("is not a directory" if make == "file" else "does not exist") in result.stderr
    assert not (tmp_path / "typo").is_dir()
