"""``install()`` succeeds whole or changes nothing: never half installed.

The failing step is real: the in-process exporter's dependency cannot be
imported (``sys.modules[name] = None`` is how Python marks a module that
must not be imported), so the last part ``install()`` starts raises after
the fork hooks, the watchdog and h5py's patch are already in place.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_python

PROLOGUE = """
import json, os, sys, threading
import h5watch
from h5watch.process import runtime
STATE_DIR = sys.argv[1]

def state():
    import h5py
    from h5watch.process.lock import wiring
    return {
        "installed": h5watch.is_installed(),
        "options": None if runtime.current_options() is None else runtime.current_options().tick_interval,
        "threads": sorted(t.name for t in threading.enumerate()),
        "phil": type(h5py._objects.phil).__name__,
        "dataset_phil": type(sys.modules["h5py._hl.dataset"].phil).__name__,
        "finders": [type(f).__name__ for f in sys.meta_path if type(f).__module__.startswith("h5watch")],
        "raise_after_ns": wiring.raise_after_ns,
        "lock_events": wiring.events is not None,
    }

def usable():
    # h5py works and a fork's child can use it.
    import h5py
    path = os.path.join(STATE_DIR, "data.h5")
    with h5py.File(path, "w") as f:
        f["values"] = list(range(10))
    pid = os.fork()
    if pid == 0:
        with h5py.File(path, "r") as f:
            os._exit(0 if sum(f["values"][:]) == 45 else 3)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
"""

UNTOUCHED = {
    "installed": False,
    "options": None,
    "threads": ["MainThread"],
    "phil": "FastRLock",
    "dataset_phil": "FastRLock",
    "finders": [],
    "raise_after_ns": None,
    "lock_events": False,
}


def _run(body: str, tmp_path) -> dict:
    result = run_python(PROLOGUE + body, args=[str(tmp_path)], timeout=60)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(90)
def test_a_first_install_that_fails_late_leaves_nothing_installed(tmp_path):
    """h5py imported first: install() starts every part at once, the exporter last."""
    report = _run(
        """
import h5py
sys.modules["prometheus_client"] = None
try:
    h5watch.install(state_dir=STATE_DIR, metrics_port=0, on_timeout="raise", wait_timeout=5, tick_interval=0.05)
    raised = None
except ImportError:
    raised = "ImportError"
after_failure = state()
child = usable()
del sys.modules["prometheus_client"]
h5watch.install(state_dir=STATE_DIR, tick_interval=0.05)  # a later install works as usual
print(json.dumps({"raised": raised, "after_failure": after_failure, "child": child, "after_retry": state()}))
""",
        tmp_path,
    )
    assert report["raised"] == "ImportError"
    assert report["after_failure"] == UNTOUCHED
    assert report["child"] == 0
    retry = report["after_retry"]
    assert retry["installed"] is True and "h5watch-watchdog" in retry["threads"]
    assert retry["phil"].endswith("WatchedLock") and retry["dataset_phil"].endswith("WatchedLock")


@pytest.mark.timeout(90)
def test_a_reconfigure_that_fails_late_keeps_the_previous_options(tmp_path):
    report = _run(
        """
import h5py
h5watch.install(state_dir=STATE_DIR, tick_interval=0.05)
before = state()
sys.modules["prometheus_client"] = None
try:
    h5watch.install(state_dir=STATE_DIR, tick_interval=0.07, metrics_port=0)
    raised = None
except ImportError:
    raised = "ImportError"
print(json.dumps({"raised": raised, "before": before, "after": state(), "child": usable()}))
""",
        tmp_path,
    )
    assert report["raised"] == "ImportError"
    assert report["before"]["installed"] is True and report["before"]["options"] == 0.05
    assert report["after"] == report["before"]
    assert report["child"] == 0


@pytest.mark.timeout(90)
def test_an_activation_that_fails_at_h5py_import_is_logged_and_leaves_h5py_untouched(tmp_path):
    """install() before h5py only arms a trigger; the parts start at ``import h5py``,
    where a failure must not break the program's import."""
    result = run_python(
        PROLOGUE
        + """
sys.modules["prometheus_client"] = None
h5watch.install(state_dir=STATE_DIR, metrics_port=0, tick_interval=0.05)
import h5py
report = state()
report["child"] = usable()
print(json.dumps(report))
""",
        args=[str(tmp_path)],
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("child") == 0
    # Still installed (the options stand, for a later retry), nothing started.
    assert report == {**UNTOUCHED, "installed": True, "options": 0.05, "finders": ["_ImportTrigger"]}
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    [unavailable] = [event for event in events if event["event"] == "h5watch.unavailable"]
    assert "prometheus_client" in unavailable["error"]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "option, value",
    [("tick_interval", 1e300), ("wait_timeout", 1e300), ("fork_timeout", 1e308), ("hold_timeout", float("inf"))],
)
def test_values_that_used_to_fail_later_are_refused_before_anything_changes(tmp_path, option, value):
    report = _run(
        f"""
import h5py
try:
    h5watch.install(state_dir=STATE_DIR, on_timeout="raise", {option}={value!r})
    raised = None
except h5watch.OptionError as exc:
    raised = str(exc)
print(json.dumps({{"raised": raised, "after": state()}}))
""".replace("inf)", "float('inf'))"),
        tmp_path,
    )
    assert report["raised"].startswith(f"{option}: expected seconds between ")
    assert report["after"] == UNTOUCHED
