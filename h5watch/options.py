"""The one typed configuration object, read from keywords, then ``H5WATCH_*``.

Every option has a parser that turns text (from the environment or a CLI
flag) or a Python value (from ``install(**options)``) into the typed value,
or raises :class:`OptionError` with one line naming the option and what it
accepts. Nothing else in h5watch reads the environment for options.
"""

from __future__ import annotations

import operator
import os

from h5watch.schema import RECORDER_THRESHOLD_SECONDS

# Every instrumented process reads its options at start-up: no import here
# may cost more than a fraction of a millisecond (typing and dataclasses do).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping
    from typing import Any

__all__ = [
    "ENV_PREFIX",
    "OptionError",
    "Options",
    "OPTION_HELP",
    "default_service",
    "default_state_dir",
    "METRICS_PORT_OWNER",
    "resolve",
    "unknown_variable_text",
    "unknown_variables",
]

ENV_PREFIX = "H5WATCH_"
ON_TIMEOUT_CHOICES = ("warn", "raise", "kill")
ON_DEADLOCK_CHOICES = ("warn", "raise", "kill")
ON_ORPHAN_CHOICES = ("kill", "recover", "raise", "warn")
LOG_FORMAT_CHOICES = ("json", "console")
LOG_LEVEL_CHOICES = ("debug", "info", "warning", "error", "critical")


class OptionError(ValueError):
    """A bad option value; its message is one line naming what to fix."""


SHARED_STATE_DIR = "/run/h5watch"


def default_state_dir() -> str:
    """The shared ``/run/h5watch`` when it exists (everybody writes in their
    own ``<uid>`` subdirectory); else ``$XDG_RUNTIME_DIR/h5watch`` for a user
    who has one; else ``/run/h5watch`` for root (made then). Never a
    predictable name in ``/tmp``, which another user could make first: for
    anyone else there is no default ("", refused with a one-line error)."""
    if os.path.isdir(SHARED_STATE_DIR):
        return SHARED_STATE_DIR
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if os.geteuid() != 0 and runtime_dir and os.path.isabs(runtime_dir):
        return os.path.join(runtime_dir, "h5watch")
    return SHARED_STATE_DIR if os.geteuid() == 0 else ""


_DEFAULTS: dict[str, Any] = {
    "state_dir": "",
    "service": "",
    "wait_timeout": None,
    "hold_timeout": None,
    "fork_timeout": 10.0,
    "on_timeout": "warn",
    "on_orphan": "kill",
    "on_deadlock": "warn",
    "kill_exit_code": 70,
    "metrics_port": None,
    "metrics_addr": "127.0.0.1",
    "log_format": "json",
    "log_level": "warning",
    "tick_interval": 0.5,
    "state_files": True,
    "watch_locks": (),
    "recorder_threshold": RECORDER_THRESHOLD_SECONDS,
}

OPTION_NAMES = tuple(_DEFAULTS)


class Options:
    """Every option, typed and immutable; ``replace(**changes)`` makes a new one.

    A plain class rather than a dataclass: every instrumented process builds
    one at start-up, and importing ``dataclasses`` would cost more than the
    rest of ``install()``.
    """

    __slots__ = OPTION_NAMES

    state_dir: str
    service: str
    wait_timeout: float | None
    hold_timeout: float | None
    fork_timeout: float | None
    on_timeout: str
    on_orphan: str
    on_deadlock: str
    kill_exit_code: int
    metrics_port: int | tuple[int, int] | None
    metrics_addr: str
    log_format: str
    log_level: str
    tick_interval: float
    state_files: bool
    watch_locks: tuple[str, ...]
    recorder_threshold: float | None

    def __init__(self, **values: Any) -> None:
        unknown = sorted(set(values) - set(OPTION_NAMES))
        if unknown:
            raise TypeError(f"Options: unknown field {unknown[0]!r}")
        for name in OPTION_NAMES:
            object.__setattr__(self, name, values.get(name, _DEFAULTS[name]))

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"Options are immutable: use options.replace({name}=...)")

    def __delattr__(self, name: str) -> None:
        raise AttributeError("Options are immutable")

    def replace(self, **changes: Any) -> Options:
        return Options(**{**self.as_dict(), **changes})

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in OPTION_NAMES}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Options):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __hash__(self) -> int:
        return hash(tuple(getattr(self, name) for name in OPTION_NAMES))

    def __repr__(self) -> str:
        return "Options(" + ", ".join(f"{name}={getattr(self, name)!r}" for name in OPTION_NAMES) + ")"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_options_from, (self.as_dict(),))


def _options_from(values: dict[str, Any]) -> Options:
    return Options(**values)


def _source(name: str, value: Any) -> str:
    return f"{name}={value!r}"


# Every number option is bounded here, where it is read: a value that passes
# must work everywhere it is used (threading's waits, nanosecond integers,
# the state file's 32-bit float), so nothing breaks later, far from its cause.
MAX_SECONDS = 86400.0
_MIN_SECONDS = {"tick_interval": 0.01}
_MIN_TIMEOUT_SECONDS = 0.001
_DIGITS = frozenset("0123456789")


def _shown(value: Any) -> str:
    """The offending value for a one-line message, cut short if long."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _decimal(text: str) -> float | None:
    """A plain decimal number (``5``, ``0.25``, ``1e3``), else None: no
    ``inf``, ``nan``, ``0x10`` or ``1_000`` (which ``float()`` would take)."""
    mantissa, _, exponent = text.lower().partition("e")
    if mantissa[:1] in "+-":
        mantissa = mantissa[1:]
    if exponent[:1] in "+-":
        exponent = exponent[1:]
    whole, _, fraction = mantissa.partition(".")
    if not (whole or fraction) or not set(whole + fraction) <= _DIGITS:
        return None
    if "e" in text.lower() and (not exponent or not set(exponent) <= _DIGITS):
        return None
    try:
        return float(text)
    except (ValueError, OverflowError):
        return None


def _seconds(allow_off: bool) -> Callable[[str, Any], float | None]:
    def parse(name: str, value: Any) -> float | None:
        option = name[len(ENV_PREFIX):].lower() if name.startswith(ENV_PREFIX) else name
        low = _MIN_SECONDS.get(option, _MIN_TIMEOUT_SECONDS)
        off = ", or off" if allow_off else ""
        problem = f"{name}: expected seconds between {low:g} and {MAX_SECONDS:g}{off}, got {_shown(value)}"
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
            if allow_off:
                return None
            raise OptionError(problem)
        seconds = _as_seconds(value)
        # NaN fails both comparisons.
        if seconds is None or not low <= seconds <= MAX_SECONDS:
            raise OptionError(problem)
        return seconds

    return parse


def _as_seconds(value: Any) -> float | None:
    """A number of seconds as given (text or a number, never a bool), or None."""
    if isinstance(value, str):
        return _decimal(value.strip())
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, ArithmeticError):
        return None


_MIN_RECORDER_THRESHOLD = 0.0001


def _threshold(name: str, value: Any) -> float | None:
    """Seconds, or off (``off``, ``0``): the flight recorder's threshold."""
    problem = (f"{name}: expected seconds between {_MIN_RECORDER_THRESHOLD:g} and {MAX_SECONDS:g}, or 0 or off,"
               f" got {_shown(value)}")
    if value is None or (isinstance(value, str) and value.strip().lower() in ("off", "none")):
        return None
    seconds = _as_seconds(value)
    if seconds == 0:
        return None
    if seconds is None or not _MIN_RECORDER_THRESHOLD <= seconds <= MAX_SECONDS:
        raise OptionError(problem)
    return seconds


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        text = value.strip().lower() if isinstance(value, str) else None
        if text not in choices:
            raise OptionError(f"{name}: expected one of {', '.join(choices)}, got {_shown(value)}")
        return text

    return parse


def _integer(value: Any) -> int | None:
    """Digits (text), or a true integer (``int``, numpy's); never a float or a bool."""
    if isinstance(value, str):
        text = value.strip()
        return int(text) if text and len(text) <= 10 and set(text) <= _DIGITS else None
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _exit_code(name: str, value: Any) -> int:
    code = _integer(value)
    if code is None or not 1 <= code <= 255:
        raise OptionError(f"{name}: expected an exit code from 1 to 255, got {_shown(value)}")
    return code


def _port(name: str, value: Any) -> int | tuple[int, int] | None:
    """A port (``9464``; ``0``: any free port) or a range (``9464-9470``, or a
    pair as a keyword): each process then takes the first free port of it."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "off", "none")):
        return None
    if isinstance(value, str) and "-" in value:
        first, last = (_integer(part) for part in value.split("-", 1))
    elif isinstance(value, tuple) and len(value) == 2:
        first, last = _integer(value[0]), _integer(value[1])
    else:
        port = _integer(value)
        if port is not None and 0 <= port <= 65535:
            return port
        first = last = None
    if first is None or last is None or not 1 <= first <= last <= 65535:
        raise OptionError(
            f"{name}: expected a TCP port from 0 to 65535 (0: any free port), a range such as 9464-9470, or off,"
            f" got {_shown(value)}"
        )
    return first if first == last else (first, last)


def _text(max_len: int) -> Callable[[str, Any], str]:
    def parse(name: str, value: Any) -> str:
        if not isinstance(value, str):
            raise OptionError(f"{name}: expected text, got {_shown(value)}")
        if len(value) > max_len or any(ch in value for ch in "\0\n\r"):
            raise OptionError(f"{name}: expected one line of at most {max_len} characters, got {_shown(value)}")
        return value

    return parse


def _path(name: str, value: Any) -> str:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or "\0" in value:
        raise OptionError(f"{name}: expected a directory path, got {value!r}")
    if value and not os.path.isabs(value):
        # Relative to what? Each process's working directory differs.
        raise OptionError(f"{name}: expected an absolute directory path, got {value!r}")
    return value


def _address(name: str, value: Any) -> str:
    text = _text(255)(name, value).strip()
    if not text:
        raise OptionError(f"{name}: expected an address such as 127.0.0.1 (0.0.0.0 for every interface), got {value!r}")
    return text


def _bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise OptionError(f"{name}: expected true or false, got {_shown(value)}")


# A lock's name is its path as given; the state file keeps 64 bytes of a name.
MAX_LOCK_PATH_BYTES = 64


def _lock_paths(name: str, value: Any) -> tuple[str, ...]:
    """``module:attribute`` paths: a comma-separated text, or a list of them."""
    if isinstance(value, str):
        entries = [entry.strip() for entry in value.split(",")]
        entries = [entry for entry in entries if entry]
    elif isinstance(value, (list, tuple)) and all(isinstance(entry, str) for entry in value):
        entries = [entry.strip() for entry in value]
    else:
        raise OptionError(f"{name}: expected module:attribute paths (a list, or text separated by commas), got {_shown(value)}")
    for entry in entries:
        module, colon, attribute = entry.partition(":")
        if not colon or not _dotted_name(module) or not _dotted_name(attribute):
            raise OptionError(f"{name}: expected module:attribute such as myapp.cache:_lock, got {_shown(entry)}")
        if len(entry.encode()) > MAX_LOCK_PATH_BYTES:
            raise OptionError(f"{name}: a path names its lock, at most {MAX_LOCK_PATH_BYTES} bytes, got {_shown(entry)}")
    return tuple(dict.fromkeys(entries))


def _dotted_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "state_dir": _path,
    "service": _text(64),
    "wait_timeout": _seconds(allow_off=True),
    "hold_timeout": _seconds(allow_off=True),
    "fork_timeout": _seconds(allow_off=True),
    "on_timeout": _choice(ON_TIMEOUT_CHOICES),
    "on_orphan": _choice(ON_ORPHAN_CHOICES),
    "on_deadlock": _choice(ON_DEADLOCK_CHOICES),
    "kill_exit_code": _exit_code,
    "metrics_port": _port,
    "metrics_addr": _address,
    "log_format": _choice(LOG_FORMAT_CHOICES),
    "log_level": _choice(LOG_LEVEL_CHOICES),
    "tick_interval": _seconds(allow_off=False),
    "state_files": _bool,
    "watch_locks": _lock_paths,
    "recorder_threshold": _threshold,
}

OPTION_HELP: dict[str, str] = {
    "state_dir": (
        "absolute path of the shared state directory; each user's processes write in its <uid> subdirectory (default "
        "/run/h5watch if it exists, else $XDG_RUNTIME_DIR/h5watch)"
    ),
    "service": "workload name, exported as the 'workload' label (default: the program name)",
    "wait_timeout": "seconds (0.001 to 86400) a thread may wait for a watched lock before it is an incident (default off)",
    "hold_timeout": "seconds (0.001 to 86400) a thread may hold a watched lock before it is an incident (default off)",
    "fork_timeout": "seconds (0.001 to 86400) the before-fork hook waits for each watched lock (default 10; 'off' waits forever)",
    "on_timeout": "what a wait or hold timeout does: warn, raise or kill (default warn)",
    "on_orphan": "what an orphaned lock in a forked child does: kill, recover (may crash the child: see README), raise or warn"
    " (default kill)",
    "on_deadlock": "what a deadlock (lock.deadlock) does: warn, raise (DeadlockError in the waiting thread that can be"
    " interrupted) or kill (default warn)",
    "kill_exit_code": "exit code (1 to 255) of a process h5watch kills (default 70)",
    "metrics_port": "serve /metrics on this port (0 to 65535, 0: any free port; a single port is the first"
    " instrumented process's only) or on the first free port of a range such as 9464-9470 (each process; default off)",
    "metrics_addr": "address of the in-process /metrics server (default 127.0.0.1)",
    "log_format": "json (one object a line) or console (default json)",
    "log_level": "least severe event logged: debug, info, warning, error or critical (default warning)",
    "tick_interval": "seconds (0.01 to 86400) between watchdog ticks (default 0.5)",
    "state_files": "write this process's state file for the daemon: true or false (default true)",
    "watch_locks": "module:attribute paths of locks to watch, separated by commas (myapp.cache:_lock,logging:_lock), each"
    " replaced by a WatchedLock now or when its module is imported (default none)",
    "recorder_threshold": "seconds (0.0001 to 86400) a wait, hold or garbage collection under phil must last to be an"
    f" entry of the flight recorder (default {RECORDER_THRESHOLD_SECONDS:g}; 0 or 'off': none are)",
}


# Set by the process that takes a single H5WATCH_METRICS_PORT from its
# environment, to its pid: its children inherit the variable, but the port is
# that process's alone (each child would fail to bind it). A range is shared.
METRICS_PORT_OWNER = ENV_PREFIX + "METRICS_PORT_OWNER"

# H5WATCH_* variables that are not options: h5watch's own markers, the build
# switch, the lock implementation switch, the pytest plugin's switch, and
# those of this project's tests.
NOT_OPTIONS = frozenset({
    "H5WATCH_BOOTSTRAP", METRICS_PORT_OWNER, "H5WATCH_NO_EXTENSIONS", "H5WATCH_IMPLEMENTATION",
    "H5WATCH_EXPECT_IMPLEMENTATION", "H5WATCH_EXPECT_PACKAGE_UNDER", "H5WATCH_REQUIRE_PROMTOOL",
    "H5WATCH_REQUIRE_PY313", "H5WATCH_TEST_PY313", "H5WATCH_SUITE_REPORT", "H5WATCH_SOAK_SECONDS",
    "H5WATCH_SOAK_SEED", "H5WATCH_PYTEST",
})


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """Each ``H5WATCH_*`` variable that names no option, with the option
    variable closest to it (None if none is close): a misspelt option is
    otherwise ignored without a word."""
    environ = os.environ if environ is None else environ
    known = {env_name(name) for name in OPTION_NAMES} | NOT_OPTIONS
    unknown = sorted(name for name in environ if name.startswith(ENV_PREFIX) and name not in known)
    if not unknown:
        return []
    import difflib

    def closest(name: str) -> str | None:
        # Compared without the prefix, which every name shares.
        word = name[len(ENV_PREFIX):].lower()
        if word == "workload":  # the label's name, not the option's
            return env_name("service")
        matches = difflib.get_close_matches(word, OPTION_NAMES, n=1, cutoff=0.6)
        return env_name(matches[0]) if matches else None

    return [(name, closest(name)) for name in unknown]


def unknown_variable_text(variable: str, closest: str | None) -> str:
    """One line: ``H5WATCH_HOLD_TIMOUT is not an h5watch option (did you mean ...?); ignored``."""
    hint = f"did you mean {closest}?" if closest else "see the options in 'h5watch run --help'"
    return f"{variable} is not an h5watch option ({hint}); ignored"


def env_name(option: str) -> str:
    return ENV_PREFIX + option.upper()


def resolve(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Options:
    """Keywords win over ``H5WATCH_*`` variables, which win over defaults."""
    overrides = dict(overrides or {})
    environ = os.environ if environ is None else environ
    unknown = sorted(set(overrides) - set(OPTION_NAMES))
    if unknown:
        raise OptionError(f"unknown option {unknown[0]!r}: expected one of {', '.join(OPTION_NAMES)}")
    values: dict[str, Any] = {}
    for name in OPTION_NAMES:
        if name in overrides:
            values[name] = _PARSERS[name](name, overrides[name])
        elif env_name(name) in environ:
            values[name] = _PARSERS[name](env_name(name), environ[env_name(name)])
    if "metrics_port" not in overrides and isinstance(values.get("metrics_port"), int) and values["metrics_port"]:
        owner = environ.get(METRICS_PORT_OWNER)
        if owner is not None and owner != str(os.getpid()):
            values["metrics_port"] = None  # an ancestor's port, inherited: see METRICS_PORT_OWNER
    options = Options(**values)
    if not options.state_dir:
        options = options.replace(state_dir=default_state_dir())
    if not options.service:
        options = options.replace(service=default_service())
    return options


def default_service() -> str:
    """The ``service`` option's default: the program's name."""
    import sys

    argv0 = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if argv0 in ("", "-c", "-m", "__main__.py"):
        argv0 = "python"
    if argv0.endswith(".py"):
        argv0 = argv0[:-3]
    return argv0[:64] or "python"


def as_environ(options: Mapping[str, Any]) -> dict[str, str]:
    """Options as ``H5WATCH_*`` variables, for ``h5watch run``'s children."""
    env = {}
    for name, value in options.items():
        if value is None:
            value = "off"
        elif isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)) and all(isinstance(item, str) for item in value):
            value = ",".join(value)  # watch_locks
        env[env_name(name)] = str(value)
    return env
