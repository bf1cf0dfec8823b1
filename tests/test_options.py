"""Options: keywords, then H5WATCH_* variables, then defaults; every bad value named."""

from __future__ import annotations

import pytest

from h5watch.options import OPTION_NAMES, OptionError, Options, env_name, resolve


def test_precedence_keywords_environment_defaults():
    environ = {"H5WATCH_WAIT_TIMEOUT": "2.5", "H5WATCH_ON_ORPHAN": "recover", "H5WATCH_SERVICE": "from-env"}
    options = resolve({"on_orphan": "raise"}, environ)
    assert options.on_orphan == "raise"  # keyword wins
    assert options.wait_timeout == 2.5  # then the environment
    assert options.service == "from-env"
    assert options.hold_timeout is None and options.fork_timeout == 10.0 and options.kill_exit_code == 70
    assert options.on_timeout == "warn" and options.log_format == "json"


def test_defaults_are_safe_and_state_dir_is_per_user(monkeypatch):
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    options = resolve({}, {})
    assert options.wait_timeout is None and options.hold_timeout is None  # never kill a healthy service
    assert options.metrics_port is None
    import os

    assert options.state_dir == f"/tmp/h5watch-{os.getuid()}"
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    assert resolve({}, {}).state_dir == "/run/user/1234/h5watch"


def test_every_option_has_a_variable():
    assert set(OPTION_NAMES) == set(Options.__slots__) == set(Options().as_dict())
    for name in OPTION_NAMES:
        assert env_name(name) == "H5WATCH_" + name.upper()


@pytest.mark.parametrize(
    "name, value, accepted",
    [
        ("wait_timeout", "-1", "seconds > 0"),
        ("wait_timeout", "soon", "seconds > 0"),
        ("hold_timeout", "nan", "seconds > 0"),
        ("fork_timeout", "0", "seconds > 0"),
        ("tick_interval", "off", "seconds > 0"),
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
