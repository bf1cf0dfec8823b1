"""The watchdog: hold and wait timeouts under warn, raise and kill, once per incident."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

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
