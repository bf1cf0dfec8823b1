"""Structured logging: configured once, here; events are data.

Events are built where they happen (``log.warning("lock.hold_timeout",
**fields)``) and rendered here, as one JSON object a line on stderr or, for
people, structlog's console renderer.

The sink writes with ``os.write`` on the stderr file descriptor and takes no
lock of its own, so a freshly forked child can log before anything else is
re-initialised: a lock held by a thread that did not survive the fork cannot
block it (DESIGN.md: logging in a fresh child is itself a fork hazard).

Events below the configured level (``log_level``; ``install()`` sets it,
default ``warning``) are dropped before anything is rendered. What renders
is loaded by :func:`prepare` (h5watch calls it when it starts watching), not
by the first event: that event may come from an at-fork hook, and an import
there can leave a child with a module lock held by a thread that did not
survive the fork. JSON lines are rendered here exactly as structlog's chain
below would render them (``add_log_level``, ``TimeStamper(fmt="iso",
utc=True)``, the pid, ``format_exc_info``, ``JSONRenderer(default=repr)``),
so the ``json`` format loads neither structlog nor the ``json`` package (see
``_json_dumps``); ``console`` uses structlog.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

__all__ = ["configure", "enabled", "get_logger", "prepare", "set_level", "FdWriter", "LEVELS"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

_configured_format: str | None = None
# Until install() says otherwise, every event is shown: host commands (the
# daemon, status, the demo) log their info events.
_threshold = LEVELS["info"]
# Once prepare() ran, every configuration is made ready when it is set.
_prepared = False


class FdWriter:
    """A lock-free, fork-safe line sink on a file descriptor."""

    def __init__(self, fd: int | None = None) -> None:
        self._fd = fd

    def _target(self) -> int:
        if self._fd is not None:
            return self._fd
        try:
            return sys.stderr.fileno()
        except (AttributeError, OSError, ValueError):
            return 2

    def msg(self, message: str) -> None:
        data = (message + "\n").encode("utf-8", "replace")
        fd = self._target()
        try:
            while data:
                written = os.write(fd, data)
                data = data[written:]
        except OSError:
            pass

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


class _FdWriterFactory:
    def __init__(self, writer: FdWriter) -> None:
        self._writer = writer

    def __call__(self, *args: Any) -> FdWriter:
        return self._writer


def _add_pid(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict.setdefault("pid", os.getpid())
    return event_dict


def configure(log_format: str = "json", fd: int | None = None, level: str | None = None) -> None:
    """Set the format (and, given ``level``, the least severe event shown) of
    h5watch's loggers. Cheap until :func:`prepare` has run."""
    global _config, _configured_format
    if level is not None:
        set_level(level)
    # A new dict, not an update: another thread may be rendering with the old one.
    config: dict[str, Any] = {"format": log_format, "fd": fd}
    if _prepared:
        _build_pipeline(config)
    _config = config
    _configured_format = log_format


def prepare() -> None:
    """Load what renders events now, so that no event ever imports anything."""
    global _prepared
    _prepared = True
    _build_pipeline(_config)


def set_level(level: str) -> None:
    global _threshold
    _threshold = LEVELS[level]


def enabled(level: str) -> bool:
    """Would an event of ``level`` be shown? (Spares building its fields.)"""
    return LEVELS[level] >= _threshold


def _build_pipeline(config: dict[str, Any]) -> dict[str, Any]:
    """The renderer and sink for ``config``'s format, built once per config."""
    if "render" in config:
        return config
    writer = FdWriter(config.get("fd"))
    if config.get("format", "json") == "console":
        render = _structlog_renderer(writer, console=True)
    else:
        render = _json_renderer(writer)
    config["render"] = render
    return config


def _json_renderer(writer: FdWriter) -> Callable[[str, str, dict[str, Any], dict[str, Any]], None]:
    import datetime

    utc = datetime.timezone.utc
    now = datetime.datetime.now
    dumps = _json_dumps()

    def render(level: str, event: str, initial: dict[str, Any], fields: dict[str, Any]) -> None:
        if "exc_info" in fields:  # structlog's format_exc_info knows how
            _structlog_renderer(writer, console=False)(level, event, initial, fields)
            return
        event_dict = {**initial, **fields}
        event_dict["event"] = event
        event_dict["level"] = level
        event_dict["timestamp"] = now(tz=utc).isoformat().replace("+00:00", "Z")
        event_dict.setdefault("pid", os.getpid())
        writer.msg(dumps(event_dict))

    return render


def _json_dumps() -> Callable[[Any], str]:
    """``json.dumps(obj, default=repr)``, byte for byte, from the json module's
    own C string encoder: the ``json`` package costs an instrumented process
    more than all of this module."""
    try:
        from _json import encode_basestring_ascii as quote
    except ImportError:  # not CPython's build: the real thing
        import json

        return lambda obj: json.dumps(obj, default=repr)

    def number(value: float) -> str:
        if value != value:
            return "NaN"
        if value == float("inf"):
            return "Infinity"
        if value == float("-inf"):
            return "-Infinity"
        return float.__repr__(value)

    def key(value: Any) -> str:
        if isinstance(value, str):
            return quote(value)
        if isinstance(value, float):
            return quote(number(value))
        if value is True or value is False or value is None:
            return quote(encode(value))
        if isinstance(value, int):
            return quote(int.__repr__(value))
        raise TypeError(f"keys must be str, int, float, bool or None, not {type(value).__name__}")

    def encode(value: Any) -> str:
        # The order of json.encoder's checks (a bool is an int, a str subclass is a str).
        if isinstance(value, str):
            return quote(value)
        if value is None:
            return "null"
        if value is True:
            return "true"
        if value is False:
            return "false"
        if isinstance(value, int):
            return int.__repr__(value)
        if isinstance(value, float):
            return number(value)
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(encode(item) for item in value) + "]"
        if isinstance(value, dict):
            return "{" + ", ".join(key(k) + ": " + encode(v) for k, v in value.items()) + "}"
        return encode(repr(value))

    return encode


def _structlog_renderer(writer: FdWriter, console: bool) -> Callable[[str, str, dict[str, Any], dict[str, Any]], None]:
    import structlog

    renderer: Any
    if console:
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer(default=repr)
    processors = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_pid,
        structlog.processors.format_exc_info,
        renderer,
    ]
    factory = _FdWriterFactory(writer)

    def render(level: str, event: str, initial: dict[str, Any], fields: dict[str, Any]) -> None:
        bound = structlog.wrap_logger(factory(), processors=processors, wrapper_class=structlog.BoundLogger,
                                      cache_logger_on_first_use=False)
        getattr(bound, level)(event, **initial, **fields)

    return render


# h5watch renders with its own processors, whatever the application does
# with structlog's global configuration.
_config: dict[str, Any] = {}


def get_logger(**initial: Any) -> _BoundToConfig:
    return _BoundToConfig(initial)


class _BoundToConfig:
    """A logger that always renders with h5watch's current configuration."""

    __slots__ = ("_initial",)

    def __init__(self, initial: dict[str, Any]) -> None:
        self._initial = initial

    def _emit(self, level: str, event: str, fields: dict[str, Any]) -> None:
        if LEVELS[level] < _threshold:
            return
        _build_pipeline(_config)["render"](level, event, self._initial, fields)

    def debug(self, event: str, **fields: Any) -> None:
        self._emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._emit("error", event, fields)

    def critical(self, event: str, **fields: Any) -> None:
        self._emit("critical", event, fields)
