"""The shipped pytest plugin, as a suite that uses h5py would run it: a real
pytest in a child process, found through the package's entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

# A conftest that imports h5py at once, as many projects' do.
CONFTEST = """
import h5py
import numpy
"""

SUITE = '''
import os
import threading
import time

import h5py
import h5watch
from h5py._objects import phil


def test_installed_before_the_conftest_imported_h5py():
    report = {"installed": h5watch.is_installed()}
    if report["installed"]:
        report["coverage"] = h5watch.snapshot()["h5py"]["coverage"]
    with open(os.environ["REPORT"], "w") as f:
        f.write(__import__("json").dumps(report))


def test_clean(tmp_path):
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["x"] = [1, 2, 3]


def test_slow_holder():
    def slow_reader():
        with phil:
            time.sleep(0.8)

    def waiter():
        with phil:
            pass

    holder = threading.Thread(target=slow_reader, name="slow-reader")
    holder.start()
    time.sleep(0.1)
    other = threading.Thread(target=waiter, name="blocked-reader")
    other.start()
    holder.join()
    other.join()


def test_forked_child_finds_an_orphan():
    held, release = threading.Event(), threading.Event()

    def hold():
        with phil:
            held.set()
            release.wait(10)

    thread = threading.Thread(target=hold, name="holder-at-fork")
    thread.start()
    held.wait(10)
    pid = os.fork()
    if pid == 0:
        with phil:  # its holder did not survive the fork
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    release.set()
    thread.join()
    assert os.waitstatus_to_exitcode(status) == 70
'''


def run_suite(tmp_path: Path, *args: str, ini: str = "", env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_suite.py").write_text(SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n" + ini)
    report = tmp_path / "report.json"
    environ = {key: value for key, value in os.environ.items() if not key.startswith(("H5WATCH_", "PYTEST_"))}
    environ.update({"REPORT": str(report), "H5WATCH_STATE_FILES": "off"}, **(env or {}))
    # -p no:timeout: the suite's own plugins are not those of the suite under test.
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:timeout", "-q", *args],
                            cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=150)
    return result, json.loads(report.read_text())


def summary(result: subprocess.CompletedProcess) -> str:
    marker = "h5watch lock incidents"
    assert marker in result.stdout, result.stdout + result.stderr
    return result.stdout[result.stdout.index(marker):]


def test_without_the_flag_the_plugin_changes_nothing(tmp_path):
    result, report = run_suite(tmp_path, "-k", "installed or clean")
    assert result.returncode == 0, result.stdout + result.stderr
    assert report == {"installed": False}
    assert "h5watch" not in result.stdout


@pytest.mark.parametrize("how", ["flag", "ini", "env"])
def test_opted_in_it_installs_before_any_conftest_imports_h5py(tmp_path, how):
    args, ini, env = {"flag": (("--h5watch",), "", {}), "ini": ((), "h5watch = true\n", {}),
                      "env": ((), "", {"H5WATCH_PYTEST": "1"})}[how]
    result, report = run_suite(tmp_path, "-k", "installed or clean", *args, ini=ini, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert report == {"installed": True, "coverage": "full"}
    assert "none in 2 tests (h5py coverage: full)" in summary(result)
    assert "unknown_variable" not in result.stdout + result.stderr


def test_each_incident_is_named_under_its_test_with_evidence(tmp_path):
    log = tmp_path / "events.jsonl"
    result, _ = run_suite(tmp_path, "--h5watch", "--h5watch-log", str(log),
                          env={"H5WATCH_HOLD_TIMEOUT": "0.3", "H5WATCH_TICK_INTERVAL": "0.05", "H5WATCH_FORK_TIMEOUT": "0.5"})
    assert result.returncode == 0, result.stdout + result.stderr
    text = summary(result)
    assert "test_suite.py::test_slow_holder: 1 incident" in text, text
    assert "lock.hold_timeout" in text and "lock h5py.phil" in text
    assert "held by thread 'slow-reader'" in text and "waited for by 'blocked-reader'" in text
    assert "in slow_reader" in text  # the holder's own frame
    # The bounded fork in the parent, and the orphan its child found (logged by
    # the child itself), under their test.
    fork = text[text.index("test_suite.py::test_forked_child_finds_an_orphan"):]
    assert "fork.lock_timeout" in fork and "lock.orphaned" in fork and "holder-at-fork" in fork, text
    assert "test_clean" not in text and "test_installed_before" not in text
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert {"lock.hold_timeout", "fork.lock_timeout", "lock.orphaned"} <= {event["event"] for event in events}
    assert f"every h5watch event of the run: {log}" in text


def test_the_plugin_is_an_entry_point_of_the_installed_package():
    from importlib.metadata import entry_points

    [plugin] = [ep for ep in entry_points(group="pytest11") if ep.name == "h5watch"]
    assert plugin.value == "h5watch.pytest_plugin"
    assert textwrap.dedent(plugin.load().__doc__ or "").startswith("``pytest --h5watch``")
