"""h5py's own test suite gives the same outcome, test by test, with h5watch installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def start_suite(tmp_path: Path, name: str, instrumented: bool) -> tuple[subprocess.Popen, Path]:
    junit = tmp_path / f"{name}.xml"
    command = [
        sys.executable, "-m", "pytest", "--pyargs", "h5py", "-q", "-p", "no:cacheprovider",
        f"--junitxml={junit}", "-o", "addopts=", "--timeout=300",
    ]
    env = dict(os.environ)
    if instrumented:
        command[3:3] = ["-p", "h5watch_pytest_plugin"]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS), env.get("PYTHONPATH")]))
        env["H5WATCH_SUITE_REPORT"] = str(tmp_path / "report.json")
        env["H5WATCH_STATE_DIR"] = str(tmp_path / "state")
        env["H5WATCH_TICK_INTERVAL"] = "0.05"  # the deadlock detector looks often
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )
    return proc, junit


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"h5py's suite did not finish in {timeout} s:\n{out[-3000:]}") from None
    return out


def outcomes(junit: Path) -> dict[str, str]:
    results = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        nodeid = f"{case.get('classname')}::{case.get('name')}"
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = child.tag
        results[nodeid] = outcome
    return results


@pytest.mark.timeout(900)
def test_h5py_suite_same_outcome_with_h5watch(tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "watched").mkdir()
    bare_proc, bare_junit = start_suite(tmp_path / "bare", "bare", instrumented=False)
    watched_proc, watched_junit = start_suite(tmp_path / "watched", "watched", instrumented=True)
    bare_out = finish(bare_proc, 800)
    watched_out = finish(watched_proc, 800)
    bare = outcomes(bare_junit)
    watched = outcomes(watched_junit)
    assert len(bare) > 500, bare_out[-2000:]
    assert set(bare) == set(watched)
    differing = {test: (bare[test], watched[test]) for test in bare if bare[test] != watched[test]}
    assert differing == {}, watched_out[-3000:]
    report = json.loads((tmp_path / "watched" / "report.json").read_text())
    assert report["coverage"] == "full"
    assert report["acquisitions"] > 1000
    assert report["probe_enabled"] is True
    assert report["deadlocks"] == dict.fromkeys(report["deadlocks"], 0) and report["deadlocks"]  # none, falsely
    assert report["order_inversions"] == 0
    assert "lock.order_inversion" not in watched_out
