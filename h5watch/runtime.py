"""``install()``, ``uninstall()`` and ``snapshot()``: the process-wide switch.

One ``Runtime`` per process holds what ``install()`` started. Installing is
idempotent and thread-safe: a second call with the same options is a no-op;
a call with different options reconfigures (timeouts, policies, logging).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Any

from . import lock as lock_module
from . import logs
from .h5py_hook import PHIL_LOCK_NAME, PhilPatch
from .fork import ForkGuard, add_child_callback
from .lock import WatchedLock, watched_locks
from .watchdog import Watchdog
from .state import StateExtension
from .exporter import InProcessExporter
from .options import Options, resolve

__all__ = ["install", "uninstall", "snapshot", "current_options", "is_installed", "phil_patch"]

_install_lock = threading.RLock()
_options: Options | None = None
_log = logs.get_logger(logger="h5watch")
phil_patch = PhilPatch(_log)
_extensions: list[Any] = []
fork_guard = ForkGuard()
watchdog = Watchdog()


def _read_real_phil(lock: WatchedLock) -> dict[str, Any] | None:
    if lock is phil_patch.watched and phil_patch.probe is not None:
        return phil_patch.probe.read()
    return None


def _reset_real_phil(lock: WatchedLock) -> bool:
    if lock is phil_patch.watched and phil_patch.probe is not None:
        phil_patch.probe.reset()
        return True
    return False


def _poison_real_phil(lock: WatchedLock, alive_ident: int) -> bool:
    if lock is phil_patch.watched and phil_patch.probe is not None:
        return phil_patch.probe.poison_dead_owner(alive_ident)
    return False


fork_guard.probe_reader = _read_real_phil
fork_guard.probe_poisoner = _poison_real_phil
fork_guard.probe_resetter = _reset_real_phil
phil_patch.adopt_fork_hooks = fork_guard.adopt_h5py_hooks


def install(**options: Any) -> Options:
    """Instrument h5py's ``phil``, arm the fork hooks, start the watchdog.

    Call it before h5py is imported for full coverage. Raises
    :class:`h5watch.OptionError` on a bad option, before changing anything.
    """
    global _options
    resolved = resolve(options)
    with _install_lock:
        logs.configure(resolved.log_format)
        if _options == resolved:
            phil_patch.install()
            return resolved
        first = _options is None
        _options = resolved
        _apply_policy(resolved)
        phil_patch.install()
        for extension in _extensions:
            extension.start(resolved)
        if first:
            _log.info(
                "h5watch.installed",
                service=resolved.service,
                h5py_imported="h5py" in sys.modules,
                coverage=phil_patch.coverage,
                implementation=lock_module.IMPLEMENTATION,
                implementation_reason=lock_module.IMPLEMENTATION_REASON,
                fork_bounded=fork_guard.fork_bounded(),
            )
            if not fork_guard.fork_bounded():
                _log.warning(
                    "fork.unbounded",
                    reason="h5py was imported before h5watch.install() and registered its own before-fork hook,"
                    " which waits for phil with no timeout; install h5watch first for a bounded fork",
                )
            if lock_module.EXTENSION_MISSING:
                _log.warning(
                    "h5watch.degraded",
                    reason=lock_module.IMPLEMENTATION_REASON,
                    slower="every watched lock's hot path and h5py's with_phil run in pure Python"
                    " (about 4x a raw FastRLock per outermost acquisition, a few percent end to end)",
                    fix="install a C compiler and Python's headers, then reinstall h5watch",
                )
        return resolved


def uninstall() -> None:
    """Undo ``install()``: stop the watchdog, disarm hooks, restore h5py's names."""
    global _options
    with _install_lock:
        if _options is None:
            return
        for extension in reversed(_extensions):
            extension.stop()
        phil_patch.uninstall()
        lock_module.policy.raise_after_ns = None
        _options = None


def is_installed() -> bool:
    return _options is not None


def current_options() -> Options | None:
    return _options


def register_extension(extension: Any) -> None:
    """Parts started by ``install()`` in order (fork hooks, watchdog, state, exporter)."""
    _extensions.append(extension)


def _apply_policy(options: Options) -> None:
    policy = lock_module.policy
    if options.on_timeout == "raise" and options.wait_timeout is not None:
        policy.raise_after_ns = int(options.wait_timeout * 1e9)
    else:
        policy.raise_after_ns = None


def _reinit_after_fork() -> None:
    global _install_lock
    _install_lock = threading.RLock()


add_child_callback(_reinit_after_fork)
register_extension(fork_guard)
register_extension(watchdog)
state = StateExtension(watchdog)
register_extension(state)


def snapshot() -> dict[str, Any]:
    """Every watched lock's statistics, holder and waiters, as plain data."""
    now_ns = time.monotonic_ns()
    locks = {}
    for watched in watched_locks():
        entry = watched.snapshot(now_ns)
        if watched.name == PHIL_LOCK_NAME and watched is phil_patch.watched:
            entry["probe"] = phil_patch.probe_state()
        locks[watched.name] = entry
    return {
        "pid": os.getpid(),
        "service": _options.service if _options else None,
        "installed": _options is not None,
        "implementation": lock_module.IMPLEMENTATION,
        "h5py": {
            "coverage": phil_patch.coverage,
            "uncovered_types": list(phil_patch.uncovered),
            "probe": phil_patch.probe_state(),
        },
        "monotonic_ns": now_ns,
        "unix_time": time.time(),
        "locks": locks,
        **{name: extension.snapshot() for name, extension in _named_extensions()},
    }


exporter = InProcessExporter(lambda: snapshot())
add_child_callback(exporter.forget_after_fork)
register_extension(exporter)


def _named_extensions() -> list[tuple[str, Any]]:
    return [(ext.snapshot_key, ext) for ext in _extensions if getattr(ext, "snapshot_key", None)]
