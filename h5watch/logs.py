"""Structured logging: configured once, here; events are data.

Events are built where they happen (``log.warning("lock.hold_timeout",
**fields)``) and rendered here, as one JSON object a line on stderr or, for
people, structlog's console renderer.

The sink writes with ``os.write`` on the stderr file descriptor and takes no
lock of its own, so a freshly forked child can log before anything else is
re-initialised: a lock held by a thread that did not survive the fork cannot
block it (logging in a fresh child is itself a fork hazard).

Every event starts with ``event``, ``level``, ``timestamp`` and ``workload``
(the ``service`` option; an event about another process names that
process's workload in its own fields), then the rest; ``pid`` is always the
emitting process. A JSON line is always under :data:`MAX_LINE_BYTES`: a
final guard (:func:`bounded`) trims the largest field first (a long string
to its head and tail, a list to its first half) and marks the event
``truncated``. The console format
prints every multi-line string (stacks) as an indented block under the
event's line.

Events below the configured level (``log_level``; ``install()`` sets it,
default ``warning``) are dropped before anything is rendered. What renders
is loaded by :func:`prepare` (h5watch calls it when it starts watching), not
by the first event: that event may come from an at-fork hook, and an import
there can leave a child with a module lock held by a thread that did not
survive the fork. JSON lines are rendered here exactly as structlog's chain
below would render them (``add_log_level``, ``TimeStamper(fmt="iso",
utc=True)``, ``format_exc_info``, the head keys and the pid first, the guard,
``JSONRenderer(default=repr)``),
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

__all__ = ["bounded", "configure", "enabled", "get_logger", "prepare", "set_level", "FdWriter", "LEVELS", "MAX_LINE_BYTES"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}

# The longest JSON line h5watch writes, newline included: under the 16 KiB
# at which Docker and containerd split a line (journald splits at 48 KiB).
MAX_LINE_BYTES = 16 * 1024 - 1
HEAD_KEYS = ("event", "level", "timestamp", "workload")
# A string the guard shortens keeps this much of it at least; it shortens
# only longer strings than _LONG_STRING (a shortened one, its mark included,
# is never shortened again).
_MIN_KEPT_CHARS = 120
_LONG_STRING = _MIN_KEPT_CHARS + 64

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


def _shape(workload: str, bound: bool) -> Callable[[Any, str, dict[str, Any]], dict[str, Any]]:
    """A structlog processor: the head keys first, ``pid`` the emitting
    process, and (``bound``) the JSON guard."""

    dumps = _json_dumps()

    def shape(logger: Any, method_name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict = ordered(event_dict, workload)
        return bounded(event_dict, dumps) if bound else event_dict

    return shape


def ordered(event_dict: dict[str, Any], workload: str) -> dict[str, Any]:
    """``event_dict`` with ``event``, ``level``, ``timestamp``, ``workload``
    first (``workload`` defaulting to ``workload``) and ``pid`` this process."""
    head = {key: event_dict.get(key) for key in HEAD_KEYS}
    if head["workload"] is None:
        head["workload"] = workload
    rest = {key: value for key, value in event_dict.items() if key not in head and key != "pid"}
    return {**head, "pid": os.getpid(), **rest}


def bounded(event_dict: dict[str, Any], dumps: Callable[[Any], str], limit: int = MAX_LINE_BYTES) -> dict[str, Any]:
    """``event_dict`` itself if its JSON line fits in ``limit`` bytes, else a
    trimmed copy marked ``truncated``. The largest field goes first, a step
    at a time: its longest string is halved when that string is most of it
    (a string keeps its head and tail: a stack's innermost frames are at one
    end or the other, as the dump prints them), else a list loses its last
    half (a count of what went in its place), else the field is set to null
    and named in ``dropped_fields``. The head keys stay."""
    if len(dumps(event_dict)) < limit:
        return event_dict
    trimmed: dict[str, Any] = _plain_copy(event_dict)
    trimmed["truncated"] = True
    sizes = {key: len(dumps(value)) for key, value in trimmed.items() if key not in HEAD_KEYS and key != "truncated"}
    size = len(dumps(trimmed))
    while size >= limit:
        candidates = {key: n for key, n in sizes.items() if n > 8}
        if not candidates:
            break
        largest = max(candidates, key=lambda key: candidates[key])
        value = trimmed[largest]
        items = _real_items(value) if isinstance(value, list) else []
        longest = _longest_string(trimmed, largest)
        if longest is not None and (len(longest[2]) * 4 > sizes[largest] or len(items) < 2):
            parent, key, text = longest
            parent[key] = _shorten(text, max(_MIN_KEPT_CHARS, len(text) - (size - limit) - 64, len(text) // 2))
        elif len(items) > 1:
            kept = items[: len(items) // 2]
            dropped = _items_dropped(value) + len(items) - len(kept)
            trimmed[largest] = [*kept, f"[... {dropped} items dropped ...]"]
        else:
            trimmed[largest] = None
            trimmed["dropped_fields"] = [*trimmed.get("dropped_fields", []), largest]
            del sizes[largest]
            size = len(dumps(trimmed))
            continue
        # Only this field changed: the line changed by as much as its JSON.
        old, sizes[largest] = sizes[largest], len(dumps(trimmed[largest]))
        size += sizes[largest] - old
    if size >= limit:  # only the head keys are left, and they are too long
        for key in HEAD_KEYS:
            if isinstance(trimmed.get(key), str):
                trimmed[key] = _shorten(trimmed[key], 256)
    return trimmed


def _plain_copy(value: Any) -> Any:
    """A copy of nested dicts and lists (tuples become lists) that the guard may change."""
    if isinstance(value, dict):
        return {key: _plain_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_copy(item) for item in value]
    return value


def _items_dropped(value: list[Any]) -> int:
    """The count an earlier halving left at the end of a list, or 0."""
    last = value[-1] if value else None
    if isinstance(last, str) and last.startswith("[... ") and last.endswith(" items dropped ...]"):
        return int(last[5:-len(" items dropped ...]")])
    return 0


def _real_items(value: list[Any]) -> list[Any]:
    """A list's items without the count an earlier halving left at its end."""
    return value[:-1] if _items_dropped(value) else value


def _longest_string(event_dict: dict[str, Any], field: str) -> tuple[Any, Any, str] | None:
    """The longest string in ``event_dict[field]`` that the guard may still
    shorten, as (container, key, text)."""
    best: tuple[Any, Any, str] | None = None
    if isinstance(event_dict[field], str):
        best = (event_dict, field, event_dict[field])
    stack: list[Any] = [event_dict[field]] if isinstance(event_dict[field], (dict, list)) else []
    while stack:
        container = stack.pop()
        items = container.items() if isinstance(container, dict) else enumerate(container)
        for key, item in items:
            if isinstance(item, str):
                if best is None or len(item) > len(best[2]):
                    best = (container, key, item)
            elif isinstance(item, (dict, list)):
                stack.append(item)
    return best if best is not None and len(best[2]) > _LONG_STRING else None


def _shorten(text: str, keep: int) -> str:
    """``text`` cut to about ``keep`` characters: its head and its (longer) tail, and how much was cut."""
    head = keep // 3
    tail = keep - head
    return f"{text[:head]}\n[... {len(text) - head - tail} characters dropped ...]\n{text[len(text) - tail:]}"


def configure(log_format: str = "json", fd: int | None = None, level: str | None = None,
              workload: str | None = None) -> None:
    """Set the format (and, given ``level``, the least severe event shown;
    given ``workload``, the workload every event names unless its fields
    name another) of h5watch's loggers. Cheap until :func:`prepare` has run."""
    global _config, _configured_format
    if level is not None:
        set_level(level)
    if workload is None:
        workload = _config.get("workload")
    # A new dict, not an update: another thread may be rendering with the old one.
    config: dict[str, Any] = {"format": log_format, "fd": fd, "workload": workload}
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


def copy_events_to(fd: int | None) -> None:
    """Also write every event shown, as one JSON line whatever the format, to
    ``fd`` (None: stop); kept across :func:`configure` (the pytest plugin
    reads the copy to tell each test its incidents)."""
    global _config, _copy_fd
    _copy_fd = fd
    # A new dict, not an update: another thread may be rendering with the old one.
    _config = {key: _config[key] for key in ("format", "fd", "workload") if key in _config}


def _build_pipeline(config: dict[str, Any]) -> dict[str, Any]:
    """The renderer and sink for ``config``'s format, built once per config."""
    if "render" in config:
        return config
    writer = FdWriter(config.get("fd"))
    workload = config.get("workload")
    if workload is None:
        from h5watch.options import default_service

        workload = default_service()
    if config.get("format", "json") == "console":
        render = _structlog_renderer(writer, workload, console=True)
    else:
        render = _json_renderer(writer, workload)
    copy_fd = _copy_fd
    if copy_fd is not None:
        show, copy = render, _json_renderer(FdWriter(copy_fd), workload)

        def render(level: str, event: str, initial: dict[str, Any], fields: dict[str, Any]) -> None:
            show(level, event, initial, fields)
            copy(level, event, initial, fields)

    config["render"] = render
    return config


def _json_renderer(writer: FdWriter, workload: str) -> Callable[[str, str, dict[str, Any], dict[str, Any]], None]:
    import datetime

    utc = datetime.timezone.utc
    now = datetime.datetime.now
    dumps = _json_dumps()

    def render(level: str, event: str, initial: dict[str, Any], fields: dict[str, Any]) -> None:
        if "exc_info" in fields:  # structlog's format_exc_info knows how
            _structlog_renderer(writer, workload, console=False)(level, event, initial, fields)
            return
        event_dict = {**initial, **fields}
        event_dict["event"] = event
        event_dict["level"] = level
        event_dict["timestamp"] = now(tz=utc).isoformat().replace("+00:00", "Z")
        shaped = ordered(event_dict, workload)
        line = dumps(shaped)
        if len(line) >= MAX_LINE_BYTES:
            line = dumps(bounded(shaped, dumps))
        writer.msg(line)

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


def _structlog_renderer(writer: FdWriter, workload: str,
                        console: bool) -> Callable[[str, str, dict[str, Any], dict[str, Any]], None]:
    import structlog

    renderer: Any
    if console:
        renderer = _ConsoleRenderer(structlog.dev.ConsoleRenderer(colors=False, sort_keys=False))
    else:
        renderer = structlog.processors.JSONRenderer(default=repr)
    processors = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _shape(workload, bound=not console),
        renderer,
    ]
    factory = _FdWriterFactory(writer)

    def render(level: str, event: str, initial: dict[str, Any], fields: dict[str, Any]) -> None:
        bound = structlog.wrap_logger(factory(), processors=processors, wrapper_class=structlog.BoundLogger,
                                      cache_logger_on_first_use=False)
        getattr(bound, level)(event, **initial, **fields)

    return render


class _ConsoleRenderer:
    """structlog's console line, with every multi-line string (a stack, a
    traceback) taken out of it and printed below as an indented block named
    by its place in the event (``holder.stack``, ``waiters[0].stack``)."""

    def __init__(self, line: Callable[[Any, str, dict[str, Any]], str]) -> None:
        self._line = line

    def __call__(self, logger: Any, method_name: str, event_dict: dict[str, Any]) -> str:
        blocks: list[tuple[str, str]] = []
        flat = _take_blocks(event_dict, "", blocks)
        text = self._line(logger, method_name, flat)
        for place, block in blocks:
            body = "\n".join("    " + line for line in block.rstrip("\n").splitlines())
            text += f"\n  {place}:\n{body}"
        return text


def _take_blocks(value: Any, place: str, blocks: list[tuple[str, str]]) -> Any:
    """``value`` with its multi-line strings replaced by where they are printed, appended to ``blocks``."""
    if isinstance(value, str) and "\n" in value.rstrip("\n"):
        blocks.append((place, value))
        return "(below)"
    if isinstance(value, dict):
        return {key: _take_blocks(item, f"{place}.{key}" if place else str(key), blocks) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_take_blocks(item, f"{place}[{index}]", blocks) for index, item in enumerate(value)]
    return value


# h5watch renders with its own processors, whatever the application does
# with structlog's global configuration.
_config: dict[str, Any] = {}
_copy_fd: int | None = None


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
