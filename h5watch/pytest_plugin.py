"""``pytest --h5watch``: a test suite run under h5watch, its lock incidents named per test.

pytest loads this module through the package's ``pytest11`` entry point, so
it is there before any conftest file, test module or ini-driven setting
imports h5py. It does nothing unless asked: with ``--h5watch`` (or
``h5watch = true`` in the ini file, or ``H5WATCH_PYTEST=1``) it installs
h5watch as the suite's configuration starts, with the options of the
``H5WATCH_*`` environment variables, and keeps a copy of h5watch's log
events (the run's forked children included). Each incident (a wait, hold or
fork timeout, an orphaned lock, a kill, a deadlock, a lock-order inversion) is charged to the test
that was running when it was logged, and the terminal summary lists them per
test with their evidence. ``--h5watch-log PATH`` keeps every event of the
run there as JSON lines. ``-p no:h5watch`` disables the plugin altogether.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from typing import Any

import pytest

__all__ = ["INCIDENT_EVENTS"]

# The log events that are incidents in a test run.
INCIDENT_EVENTS = frozenset({
    "lock.wait_timeout", "lock.hold_timeout", "lock.orphaned", "lock.recovered", "lock.deadlock",
    "fork.lock_timeout", "process.killed", "lock.order_inversion",
})
_BETWEEN_TESTS = "(outside any test)"
_STACK_LINES = 8


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("h5watch", "h5watch lock monitoring")
    group.addoption("--h5watch", action="store_true", default=False, help=(
        "run the suite under h5watch (installed before conftest files import h5py) and list each test's lock "
        "incidents in the summary; options from H5WATCH_* variables"
    ))
    group.addoption("--h5watch-log", metavar="PATH", default=None, help=(
        "with --h5watch, also keep every h5watch log event of the run in PATH, one JSON line each"
    ))
    parser.addini("h5watch", type="bool", default=False, help="run the suite under h5watch, as --h5watch")


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> None:
    namespace = early_config.known_args_namespace
    if not (namespace.h5watch or early_config.getini("h5watch") or os.environ.get("H5WATCH_PYTEST") == "1"):
        return
    early_config.pluginmanager.register(IncidentRecorder(namespace.h5watch_log), "h5watch-recorder")


class IncidentRecorder:
    """Installs h5watch, then charges each incident event to its test."""

    def __init__(self, log_path: str | None) -> None:
        import h5watch
        from h5watch import logs

        self.h5py_imported_first = "h5py" in sys.modules
        self.keep_log = log_path is not None
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="h5watch-pytest-", suffix=".jsonl")
            os.close(fd)
        self.log_path = log_path
        # O_APPEND: forked children write to the same file through their copy.
        self._fd = os.open(log_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self._read_offset = 0
        self._pending = b""
        self.incidents: dict[str, list[dict[str, Any]]] = {}
        self.tests = 0
        self._current = _BETWEEN_TESTS
        logs.copy_events_to(self._fd)
        h5watch.install()

    def pytest_runtest_logstart(self, nodeid: str, location: Any) -> None:
        self._collect()
        self._current = nodeid
        self.tests += 1

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        self._collect()
        self._current = _BETWEEN_TESTS

    def _collect(self) -> None:
        data = os.pread(self._fd, 1 << 20, self._read_offset)
        while data:
            self._read_offset += len(data)
            self._pending += data
            data = os.pread(self._fd, 1 << 20, self._read_offset)
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("event") in INCIDENT_EVENTS:
                self.incidents.setdefault(self._current, []).append(event)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        import h5watch

        self._collect()
        write = terminalreporter.write_line
        terminalreporter.section("h5watch lock incidents")
        coverage = h5watch.snapshot()["h5py"]["coverage"] if "h5py" in sys.modules else "h5py not imported"
        if self.h5py_imported_first:
            write("h5py was imported before h5watch could install (by a plugin loaded earlier): "
                  f"h5py coverage {coverage}")
        count = sum(len(events) for events in self.incidents.values())
        if not count:
            write(f"none in {self.tests} tests (h5py coverage: {coverage})")
        for nodeid, events in self.incidents.items():
            write(f"{nodeid}: {len(events)} incident{'s' if len(events) > 1 else ''}")
            for event in events:
                for line in describe(event):
                    write("    " + line)
        if self.keep_log:
            write(f"every h5watch event of the run: {self.log_path}")

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        from h5watch import logs

        logs.copy_events_to(None)
        os.close(self._fd)
        if not self.keep_log:
            try:
                os.unlink(self.log_path)
            except OSError:
                pass


def describe(event: dict[str, Any]) -> list[str]:
    """A few lines for one incident event: what, which lock, who held it
    doing what, who waited, and the innermost frames of the holder's stack."""
    head = f"{event['event']} pid {event.get('pid')}"
    if event.get("lock"):
        head += f" lock {event['lock']}"
    if isinstance(event.get("timeout"), (int, float)):
        head += f" (timeout {event['timeout']:g} s)"
    lines = [head]
    holder = event.get("holder")
    if isinstance(holder, dict):
        age = holder.get("hold_age_seconds")
        lines.append(f"held by thread {holder.get('thread_name')!r} (native id {holder.get('native_id')}) "
                     f"in {holder.get('operation') or 'an unnamed operation'}"
                     + (f" for {age:.3f} s" if isinstance(age, (int, float)) else ""))
        stack = holder.get("stack")
        if isinstance(stack, str):
            lines.extend("  " + line for line in stack.rstrip("\n").splitlines()[-_STACK_LINES:])
    waiters = event.get("waiters")
    if isinstance(waiters, list) and waiters:
        names = ", ".join(repr(w.get("thread_name")) for w in waiters if isinstance(w, dict))
        more = event.get("waiters_more")
        lines.append(f"waited for by {names}" + (f" and {more} more" if more else ""))
    for key in ("reason", "action", "hint"):
        if isinstance(event.get(key), str):
            lines.append(f"{key}: {event[key]}")
    return lines
