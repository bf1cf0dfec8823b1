"""Fork safety: the seed scenario, orphans under every policy, hook-skipping forks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

SCENARIOS = REPO / "tests" / "scenarios"


def run_scenario(python: str, script: str, *args: str, timeout: float = 120) -> tuple[dict, list[dict], str]:
    proc = subprocess.run(
        [python, str(SCENARIOS / script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    result = json.loads(lines[-1])
    events = []
    for line in proc.stderr.splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                pass
    return result, events, proc.stdout


def events_named(events: list[dict], name: str) -> list[dict]:
    return [event for event in events if event.get("event") == name]


@pytest.mark.timeout(300)
def test_seed_scenario_h5py_313_os_fork_never_hangs_with_h5watch(python313, tmp_path):
    result, events, _ = run_scenario(python313, "seed_fork.py", "--dir", str(tmp_path), "--instrument", "--rounds", "3")
    assert result["children"] == 30
    assert result["hung"] == 0
    assert result["bad_data"] == 0
    assert result["exit_codes"] == {"0": 30}


@pytest.mark.timeout(300)
def test_seed_scenario_h5py_313_os_fork_hangs_without_h5watch(python313, tmp_path):
    """The control: the same test without h5watch shows hung children."""
    result, _, _ = run_scenario(
        python313, "seed_fork.py", "--dir", str(tmp_path), "--rounds", "1", "--child-deadline", "3"
    )
    assert result["children"] == 10
    assert result["hung"] >= 1


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["phil", "app"])
def test_kill_policy_hook_skipping_fork_exits_70_with_holder_named(tmp_path, which):
    result, events, _ = run_scenario(sys.executable, "orphan_child.py", str(tmp_path), which, "nohook", "kill")
    assert result["exit_code"] == 70
    assert result["seconds"] < 2
    orphaned = events_named(events, "lock.orphaned")
    assert len(orphaned) == 1
    event = orphaned[0]
    assert event["action"] == "killed"
    assert event["lock"] == ("h5py.phil" if which == "phil" else "app.cache")
    assert event["holder"]["thread_name"] == "stuck-holder"
    assert event["holder"]["native_id"]
    assert event["fork_hooks_ran"] is False
    assert "child_stack" in event
    [killed] = events_named(events, "process.killed")
    assert killed["reason"] == "lock.orphaned" and killed["holder"]["thread_name"] == "stuck-holder"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["phil", "app"])
def test_recover_policy_child_reads_and_writes_hdf5(tmp_path, which):
    result, events, stdout = run_scenario(sys.executable, "orphan_child.py", str(tmp_path), which, "nohook", "recover")
    assert result["exit_code"] == 0, stdout
    assert "CHILD-OK 499500.0 45.0" in stdout
    recovered = events_named(events, "lock.recovered")
    assert any(event.get("holder", {}).get("thread_name") == "stuck-holder" for event in recovered)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("which", ["phil", "app"])
def test_raise_policy_gives_orphaned_lock_error(tmp_path, which):
    result, events, stdout = run_scenario(sys.executable, "orphan_child.py", str(tmp_path), which, "nohook", "raise")
    assert result["exit_code"] == 5, stdout
    assert "CHILD-RAISED stuck-holder" in stdout
    assert events_named(events, "lock.orphaned")[0]["action"] == "raised"


@pytest.mark.timeout(120)
def test_warn_policy_logs_and_keeps_waiting(tmp_path):
    result, events, stdout = run_scenario(sys.executable, "orphan_child.py", str(tmp_path), "app", "nohook", "warn")
    # The child waits for the dead holder: the scenario kills it at its deadline.
    assert result["exit_code"] is None
    assert events_named(events, "lock.orphaned")[0]["action"] == "warned"
    assert "CHILD-OK" not in stdout


@pytest.mark.timeout(120)
def test_app_lock_held_at_os_fork_is_found_orphaned_in_child(tmp_path):
    """os.fork runs the hooks: the before-hook times out on the app lock, the child finds the orphan."""
    result, events, _ = run_scenario(sys.executable, "orphan_child.py", str(tmp_path), "app", "os", "kill")
    assert result["exit_code"] == 70
    timeout_events = events_named(events, "fork.lock_timeout")
    assert timeout_events and timeout_events[0]["lock"] == "app.cache"
    assert timeout_events[0]["holder"]["thread_name"] == "stuck-holder"
    orphaned = events_named(events, "lock.orphaned")
    assert orphaned[0]["fork_hooks_ran"] is True
    assert orphaned[0]["holder"]["thread_name"] == "stuck-holder"


@pytest.mark.timeout(120)
def test_phil_held_at_os_fork_on_h5py_313_child_applies_policy(python313, tmp_path):
    result, events, _ = run_scenario(python313, "orphan_child.py", str(tmp_path), "phil", "os", "kill")
    assert result["exit_code"] == 70
    assert events_named(events, "fork.lock_timeout")[0]["holder"]["thread_name"] == "stuck-holder"
    assert events_named(events, "lock.orphaned")[0]["holder"]["thread_name"] == "stuck-holder"


@pytest.mark.timeout(120)
def test_fork_stall_current_h5py_is_bounded_and_named_with_holder_stack(tmp_path):
    """h5py >= 3.14 would keep the fork waiting for phil's holder (a slow
    file-like read) in its own unbounded before-fork hook; h5watch took that
    hook over: the fork returns after fork_timeout, the holder named, and the
    child applies the orphan policy."""
    result, events, _ = run_scenario(sys.executable, "slow_fileobj_fork.py")
    timeouts = events_named(events, "fork.lock_timeout")
    assert len(timeouts) == 1
    holder = timeouts[0]["holder"]
    assert holder["thread_name"] == "slow-fileobj-reader"
    assert "slow_readinto" in holder["stack"]
    assert timeouts[0]["fork_timeout"] == 1
    assert 1 <= result["fork_seconds"] < 2
    assert result["child_exit"] == 70
    assert events_named(events, "lock.orphaned")[0]["holder"]["thread_name"] == "slow-fileobj-reader"


@pytest.mark.timeout(120)
def test_fork_stall_h5py_313_fork_proceeds_and_child_applies_policy(python313, tmp_path):
    result, events, _ = run_scenario(python313, "slow_fileobj_fork.py")
    assert result["h5py"] == "3.13.0"
    timeouts = events_named(events, "fork.lock_timeout")
    assert timeouts and timeouts[0]["holder"]["thread_name"] == "slow-fileobj-reader"
    assert "slow_readinto" in timeouts[0]["holder"]["stack"]
    assert result["child_exit"] == 70
    assert events_named(events, "lock.orphaned")[0]["holder"]["thread_name"] == "slow-fileobj-reader"
