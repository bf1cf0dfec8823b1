"""Options: keywords, then H5WATCH_* variables, then defaults; every bad value named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import run_python

from h5watch.options import (
    OPTION_NAMES,
    OptionError,
    Options,
    env_name,
    resolve,
    unknown_variable_text,
    unknown_variables,
)


def test_precedence_keywords_environment_defaults():
    environ = {"H5WATCH_WAIT_TIMEOUT": "2.5", "H5WATCH_ON_ORPHAN": "recover", "H5WATCH_SERVICE": "from-env"}
    options = resolve({"on_orphan": "raise"}, environ)
    assert options.on_orphan == "raise"  # keyword wins
    assert options.wait_timeout == 2.5  # then the environment
    assert options.service == "from-env"
    assert options.hold_timeout is None and options.fork_timeout == 10.0 and options.kill_exit_code == 70
    assert options.on_timeout == "warn" and options.log_format == "json"


def test_defaults_are_safe_and_state_dir_is_never_in_tmp(monkeypatch):
    import os

    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    options = resolve({}, {})
    assert options.wait_timeout is None and options.hold_timeout is None  # never kill a healthy service
    assert options.metrics_port is None
    shared = os.path.isdir("/run/h5watch")
    if shared or os.geteuid() == 0:
        assert options.state_dir == "/run/h5watch"
    else:
        assert options.state_dir == ""  # no safe default: refused with one line when used
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    if not shared and os.geteuid() != 0:
        assert resolve({}, {}).state_dir == "/run/user/1234/h5watch"
    assert not resolve({}, {}).state_dir.startswith("/tmp")


def test_relative_state_dir_and_empty_metrics_addr_are_refused():
    with pytest.raises(OptionError, match="absolute"):
        resolve({"state_dir": "state"}, {})
    with pytest.raises(OptionError, match="METRICS_ADDR"):
        resolve({}, {"H5WATCH_METRICS_ADDR": ""})


def test_every_option_has_a_variable():
    assert set(OPTION_NAMES) == set(Options.__slots__) == set(Options().as_dict())
    for name in OPTION_NAMES:
        assert env_name(name) == "H5WATCH_" + name.upper()


@pytest.mark.parametrize(
    "name, value, accepted",
    [
        ("wait_timeout", "-1", "seconds between 0.001 and 86400, or off"),
        ("wait_timeout", "soon", "seconds between 0.001 and 86400, or off"),
        ("hold_timeout", "nan", "seconds between 0.001 and 86400, or off"),
        ("fork_timeout", "0", "seconds between 0.001 and 86400, or off"),
        ("tick_interval", "off", "seconds between 0.01 and 86400"),
        ("on_timeout", "explode", "warn, raise, kill"),
        ("on_orphan", "ignore", "kill, recover, raise, warn"),
        ("kill_exit_code", "0", "1 to 255"),
        ("kill_exit_code", "256", "1 to 255"),
        ("metrics_port", "70000", "0 to 65535"),
        ("log_format", "xml", "json, console"),
        ("log_level", "loud", "debug, info, warning, error, critical"),
        ("state_files", "maybe", "true or false"),
        ("service", "a\nb", "one line"),
    ],
)
def test_bad_values_name_the_option_and_what_it_accepts(name, value, accepted):
    with pytest.raises(OptionError) as keyword_error:
        resolve({name: value}, {})
    assert str(keyword_error.value).startswith(f"{name}:") and accepted in str(keyword_error.value)
    assert "\n" not in str(keyword_error.value)
    with pytest.raises(OptionError) as env_error:
        resolve({}, {env_name(name): value})
    assert str(env_error.value).startswith(f"{env_name(name)}:") and accepted in str(env_error.value)


def test_unknown_option():
    with pytest.raises(OptionError, match="unknown option 'hold_timout'"):
        resolve({"hold_timout": 3}, {})


def test_off_and_typed_values():
    options = resolve({"wait_timeout": "off", "fork_timeout": 1, "metrics_port": "0", "state_files": "false"}, {})
    assert options.wait_timeout is None and options.fork_timeout == 1.0
    assert options.metrics_port == 0 and options.state_files is False


SECONDS_OPTIONS = ("wait_timeout", "hold_timeout", "fork_timeout", "tick_interval")
# Each used to pass and break later (a watchdog tick, install(), a fork), or
# raise something other than OptionError; some are what float() takes but a
# person would not write.
OUT_OF_RANGE_SECONDS = [
    "1e300", "1e12", "86400.5", "1e308", "1e999", "-0", "0", "-1", "nan", "inf", "-inf", "Infinity", "1_000",
    "0x10", "1e", ".", "5 s", "1e-320",
]
OUT_OF_RANGE_SECONDS_VALUES = [1e300, 1e308, float("nan"), float("inf"), -0.0, 0, 10**400, 86401, True, False, "", [5]]


@pytest.mark.parametrize("name", SECONDS_OPTIONS)
@pytest.mark.parametrize("text", OUT_OF_RANGE_SECONDS)
def test_seconds_out_of_range_are_refused_from_the_environment(name, text):
    low = "0.01" if name == "tick_interval" else "0.001"
    with pytest.raises(OptionError) as error:
        resolve({}, {env_name(name): text})
    message = str(error.value)
    assert message.startswith(f"{env_name(name)}: expected seconds between {low} and 86400")
    assert message.endswith(f"got {text!r}") and "\n" not in message


@pytest.mark.parametrize("name", SECONDS_OPTIONS)
@pytest.mark.parametrize("value", OUT_OF_RANGE_SECONDS_VALUES, ids=repr)
def test_seconds_out_of_range_are_refused_as_keywords(name, value):
    if value == "" and name != "tick_interval":
        assert getattr(resolve({name: value}, {}), name) is None  # '' means off
        return
    with pytest.raises(OptionError, match=rf"^{name}: expected seconds between "):
        resolve({name: value}, {})


@pytest.mark.parametrize(
    "value, seconds",
    [(" 5 ", 5.0), ("1e3", 1000.0), ("0.25", 0.25), (".5", 0.5), ("86400", 86400.0), (2, 2.0), (0.05, 0.05)],
)
def test_seconds_in_range_are_read_as_written(value, seconds):
    assert resolve({"wait_timeout": value}, {}).wait_timeout == seconds
    assert resolve({}, {"H5WATCH_FORK_TIMEOUT": str(value)}).fork_timeout == seconds
    assert resolve({"tick_interval": value}, {}).tick_interval == seconds


def test_numpy_numbers_are_numbers():
    np = pytest.importorskip("numpy")
    options = resolve({"hold_timeout": np.float64(2.5), "kill_exit_code": np.int64(71), "metrics_port": np.uint16(0)}, {})
    assert (options.hold_timeout, options.kill_exit_code, options.metrics_port) == (2.5, 71, 0)
    assert type(options.kill_exit_code) is int and type(options.metrics_port) is int


@pytest.mark.parametrize(
    "name, value",
    [
        ("kill_exit_code", v) for v in ("1_0", "-1", "+70", "70.0", "7e1", "", "0x46", 70.0, True, 10**400, "9" * 5000, 0, 256)
    ]
    + [("metrics_port", v) for v in ("-0", "+80", "8_0", "80.0", "65536", 65536, -1, 10**30, 80.0, True, "1e3")],
    ids=repr,
)
def test_integers_out_of_range_or_not_integers_are_refused(name, value):
    accepted = "1 to 255" if name == "kill_exit_code" else "0 to 65535"
    with pytest.raises(OptionError) as error:
        resolve({name: value}, {})
    assert str(error.value).startswith(f"{name}: expected") and accepted in str(error.value)
    assert "\n" not in str(error.value) and len(str(error.value)) < 200
    if isinstance(value, str):
        with pytest.raises(OptionError, match=accepted):
            resolve({}, {env_name(name): value})


def test_integers_in_range():
    options = resolve({}, {"H5WATCH_KILL_EXIT_CODE": " 71 ", "H5WATCH_METRICS_PORT": "65535"})
    assert options.kill_exit_code == 71 and options.metrics_port == 65535
    assert resolve({"kill_exit_code": 255, "metrics_port": 0}, {}).metrics_port == 0


@pytest.mark.timeout(60)
def test_the_largest_and_smallest_accepted_values_work_where_they_are_used(tmp_path):
    """Every bound is a value that works: a watchdog tick, a wait that may
    raise, a fork that takes phil, a state file, each at the extremes."""
    result = run_python(
        """
import json, os, sys, threading, time
import h5py
import h5watch
from h5watch.process import runtime
report = {}
for extreme in ({"wait_timeout": 86400, "hold_timeout": 86400, "fork_timeout": 86400, "tick_interval": 86400},
                {"wait_timeout": 0.001, "hold_timeout": 0.001, "fork_timeout": 0.001, "tick_interval": 0.01}):
    h5watch.install(state_dir=sys.argv[1], on_timeout="raise", on_orphan="kill", log_level="critical", **extreme)
    runtime.watchdog.tick()  # raises nothing: counted in ticks
    with h5py.File(os.path.join(sys.argv[1], "data.h5"), "w") as f:
        f["values"] = list(range(10))
    pid = os.fork()
    if pid == 0:
        with h5py.File(os.path.join(sys.argv[1], "data.h5"), "r") as f:
            os._exit(0 if sum(f["values"][:]) == 45 else 3)
    child = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    ticks = runtime.watchdog.ticks
    time.sleep(0.2)
    report[str(extreme["tick_interval"])] = {"child": child, "ticked": runtime.watchdog.ticks > ticks,
                                             "watchdog": runtime.watchdog.snapshot()["running"]}
    h5watch.uninstall()
print(json.dumps(report))
""",
        args=[str(tmp_path)],
        timeout=50,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "86400": {"child": 0, "ticked": False, "watchdog": True},
        "0.01": {"child": 0, "ticked": True, "watchdog": True},
    }


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flag, value", [("--tick-interval", "1e300"), ("--wait-timeout", "1e12"), ("--kill-exit-code", "1_0")])
def test_run_refuses_out_of_range_values_in_one_line(flag, value, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "h5watch", "run", flag, value, "--", "true"],
        check=False, capture_output=True, text=True, timeout=50, env={**os.environ, "H5WATCH_STATE_DIR": str(tmp_path)},
    )
    option = flag[2:].replace("-", "_")
    assert result.returncode == 2
    assert result.stderr.startswith(f"h5watch run: error: {option}: expected ") and result.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "value, port",
    [("9464-9470", (9464, 9470)), (" 9464-9464 ", 9464), ("1-65535", (1, 65535)), ((9464, 9470), (9464, 9470))],
)
def test_a_metrics_port_range(value, port):
    assert resolve({"metrics_port": value}, {}).metrics_port == port
    if isinstance(value, str):
        assert resolve({}, {"H5WATCH_METRICS_PORT": value}).metrics_port == port


@pytest.mark.parametrize("value", ["9470-9464", "0-5", "9464-", "-9464", "9464-70000", "9464-9465-9466", "a-b", (1, 2, 3)],
                         ids=repr)
def test_a_bad_metrics_port_range_is_refused(value):
    with pytest.raises(OptionError) as error:
        resolve({"metrics_port": value}, {})
    assert str(error.value).startswith("metrics_port: expected a TCP port from 0 to 65535 (0: any free port),"
                                       " a range such as 9464-9470, or off, got ")


def test_a_single_metrics_port_inherited_from_another_process_is_off():
    mine = {"H5WATCH_METRICS_PORT": "9464", "H5WATCH_METRICS_PORT_OWNER": str(os.getpid())}
    assert resolve({}, mine).metrics_port == 9464  # this process took it (install() again, exec)
    inherited = {"H5WATCH_METRICS_PORT": "9464", "H5WATCH_METRICS_PORT_OWNER": "1"}
    assert resolve({}, inherited).metrics_port is None
    assert resolve({"metrics_port": 9464}, inherited).metrics_port == 9464  # a keyword is this process's
    assert resolve({}, {**inherited, "H5WATCH_METRICS_PORT": "9464-9470"}).metrics_port == (9464, 9470)  # shared
    assert resolve({}, {**inherited, "H5WATCH_METRICS_PORT": "0"}).metrics_port == 0  # any free port: no clash


def test_unknown_variables_name_the_closest_option():
    environ = {
        "H5WATCH_HOLD_TIMOUT": "3", "H5WATCH_STATEDIR": "/x", "H5WATCH_WORKLOAD": "ingest", "H5WATCH_FROBNICATE": "1",
        "H5WATCH_HOLD_TIMEOUT": "3", "H5WATCH_BOOTSTRAP": "1", "H5WATCH_METRICS_PORT_OWNER": "1",
        "H5WATCH_IMPLEMENTATION": "python", "H5WATCH_NO_EXTENSIONS": "1", "HOLD_TIMOUT": "3", "h5watch_service": "x",
    }
    assert unknown_variables(environ) == [
        ("H5WATCH_FROBNICATE", None),
        ("H5WATCH_HOLD_TIMOUT", "H5WATCH_HOLD_TIMEOUT"),
        ("H5WATCH_STATEDIR", "H5WATCH_STATE_DIR"),
        ("H5WATCH_WORKLOAD", "H5WATCH_SERVICE"),
    ]
    assert unknown_variables({env_name(name): "" for name in OPTION_NAMES}) == []
    assert unknown_variable_text("H5WATCH_FROBNICATE", None) == (
        "H5WATCH_FROBNICATE is not an h5watch option (see the options in 'h5watch run --help'); ignored"
    )


@pytest.mark.timeout(60)
def test_the_daemon_and_status_warn_about_an_unknown_variable(state_dir, daemons, monkeypatch):
    from daemon_support import wait_for

    monkeypatch.setenv("H5WATCH_STATEDIR", "/srv/elsewhere")  # a person meant H5WATCH_STATE_DIR
    daemon = daemons(state_dir)
    [event] = wait_for(lambda: daemon.events("options.unknown_variable"), 10, what="options.unknown_variable")
    assert (event["variable"], event["did_you_mean"], event["level"]) == ("H5WATCH_STATEDIR", "H5WATCH_STATE_DIR",
                                                                           "warning")
    status = subprocess.run([sys.executable, "-m", "h5watch", "status", "--state-dir", str(state_dir)],
                            capture_output=True, text=True, timeout=50, check=False)
    assert status.returncode == 0, status.stderr
    assert status.stderr == ("h5watch status: warning: H5WATCH_STATEDIR is not an h5watch option"
                             " (did you mean H5WATCH_STATE_DIR?); ignored\n")
