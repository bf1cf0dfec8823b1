"""``install()``, ``uninstall()`` and ``snapshot()``: the process-wide switch.

Installing is idempotent and thread-safe: a second call with the same options
is a no-op; a call with different options reconfigures (timeouts, policies,
logging).

Two stages, so that an instrumented process pays for nothing it does not use
(``h5watch run`` installs h5watch in every Python process it starts).
``install()`` reads the options, sets the log level and arms an import
trigger; nothing heavy is imported. The parts (h5py's patch, the fork hooks,
the watchdog, the state file, the exporter) are imported, wired and started
by ``_activate()`` on first need:

- when ``h5py`` is imported, just before its first module runs (so the
  coverage is full, as when everything was started by ``install()``);
- when ``h5watch.WatchedLock`` (or ``LockTimeout``, ``OrphanedLockError``) is
  first looked up: a watched lock is coming;
- by ``install()`` itself, if h5py or ``h5watch.process.lock`` is loaded already.
"""

from __future__ import annotations

import _thread
import os
import sys
import time

from h5watch import logs
from h5watch.options import Options, resolve

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from h5watch.process.lock import WatchedLock

__all__ = ["install", "uninstall", "snapshot", "current_options", "is_installed", "phil_patch"]

_install_lock = _thread.RLock()
_options: Options | None = None
_log = logs.get_logger(logger="h5watch")
_extensions: list[Any] = []
# The parts, imported and wired by _build() (None until then).
lock_module: Any = None
phil_patch: Any = None
fork_guard: Any = None
watchdog: Any = None
state: Any = None
exporter: Any = None
# Started: from _activate() to uninstall(). Written under _install_lock.
_active = False
_activating = False
_warned = False


def _read_real_phil(lock: WatchedLock) -> dict[str, Any] | None:
    if lock is phil_patch.watched and phil_patch.probe is not None:
        probe_state: dict[str, Any] | None = phil_patch.probe.read()
        return probe_state
    return None


def _reset_real_phil(lock: WatchedLock) -> bool:
    if lock is phil_patch.watched and phil_patch.probe is not None:
        phil_patch.probe.reset()
        return True
    return False


def _poison_real_phil(lock: WatchedLock, alive_ident: int) -> bool:
    if lock is phil_patch.watched and phil_patch.probe is not None:
        poisoned: bool = phil_patch.probe.poison_dead_owner(alive_ident)
        return poisoned
    return False


def _build() -> None:
    """Import and wire the parts, once per process; nothing is started here.
    The caller holds ``_install_lock``."""
    global lock_module, phil_patch, fork_guard, watchdog, state, exporter
    if exporter is not None:
        return
    logs.prepare()  # events may come from at-fork hooks: nothing may be imported then
    from h5watch.process import lock
    from h5watch.process.fork import ForkGuard, add_child_callback
    from h5watch.process.h5py_hook import PhilPatch
    from h5watch.process.publisher import StateExtension
    from h5watch.process.watchdog import Watchdog

    lock_module = lock
    phil_patch = PhilPatch(_log)
    fork_guard = ForkGuard()
    watchdog = Watchdog()
    fork_guard.probe_reader = _read_real_phil
    fork_guard.probe_poisoner = _poison_real_phil
    fork_guard.probe_resetter = _reset_real_phil
    phil_patch.adopt_fork_hooks = fork_guard.adopt_h5py_hooks
    add_child_callback(_reinit_after_fork)
    register_extension(fork_guard)
    register_extension(watchdog)
    state = StateExtension(watchdog)
    register_extension(state)
    slot = _ExporterSlot()
    add_child_callback(slot.forget_after_fork)
    register_extension(slot)
    exporter = slot


def install(**options: Any) -> Options:
    """Instrument h5py's ``phil``, arm the fork hooks, start the watchdog.

    Call it before h5py is imported for full coverage. Raises
    :class:`h5watch.OptionError` on a bad option, before changing anything.
    The parts start on first need (see the module's docstring). All or
    nothing: if a later step raises, h5watch is left as the call found it
    (not installed at all, on a first call) and the error is raised.
    """
    resolved = resolve(options)
    with _install_lock:
        previous = _options
        try:
            _apply_options(resolved)
            if previous is None and logs.enabled("info"):
                _build()  # the event names parts that are otherwise loaded on first need
                _log.info(
                    "h5watch.installed",
                    service=resolved.service,
                    h5py_imported="h5py" in sys.modules,
                    coverage=phil_patch.coverage,
                    implementation=lock_module.IMPLEMENTATION,
                    implementation_reason=lock_module.IMPLEMENTATION_REASON,
                    fork_bounded=fork_guard.fork_bounded(),
                )
        except BaseException:
            _roll_back(previous)
            raise
        return resolved


def _apply_options(resolved: Options) -> None:
    """Install or reconfigure; the caller holds ``_install_lock``."""
    global _options
    logs.configure(resolved.log_format, level=resolved.log_level)
    if _options == resolved:
        if _active:
            phil_patch.install()
        else:
            _activate_if_due()
        return
    _options = resolved
    if _active:
        _start_parts(resolved)
    else:
        _arm()
        _activate_if_due()


def _roll_back(previous: Options | None) -> None:
    """A step of ``install()`` failed: leave h5watch as the call found it,
    else uninstalled; never half installed. The caller holds ``_install_lock``."""
    global _options, _active
    if previous is not None:
        logs.configure(previous.log_format, level=previous.log_level)
        _options = previous
        if not _active:
            return  # _activate() stopped what it had started; still armed
        try:
            _start_parts(previous)
            return
        except Exception as exc:
            _log.error("h5watch.unavailable", error=repr(exc), reason="the previous options could not be restored")
    _disarm()
    if _active:
        _stop_parts()
        _active = False
    _options = None


def _start_parts(options: Options) -> None:
    _apply_policy(options)
    phil_patch.install()
    for extension in _extensions:
        extension.start(options)


def _stop_parts() -> None:
    """Stop every part, whichever started; each stop is safe on a part never started."""
    for extension in reversed(_extensions):
        extension.stop()
    if phil_patch is not None:
        phil_patch.uninstall()
    if lock_module is not None:
        lock_module.policy.raise_after_ns = None
        lock_module.policy.on_wait_started = None


def _warn_at_first_activation() -> None:
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


def _activate() -> None:
    """Start the parts with the current options; the caller holds ``_install_lock``."""
    global _active, _activating, _warned
    if _active or _activating or _options is None:
        return
    _activating = True
    try:
        _build()
        try:
            _start_parts(_options)
        except BaseException:
            _stop_parts()
            raise
        _active = True
    finally:
        _activating = False
    if not _warned:
        _warned = True
        _warn_at_first_activation()


def _activate_if_due() -> None:
    if "h5py" in sys.modules or "h5watch.process.lock" in sys.modules:
        _activate()


class _ImportTrigger:
    """A meta-path finder that finds nothing: it activates h5watch just before
    ``h5py`` is imported (before h5py's first module runs: full coverage)."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname == "h5py" and not _active and _options is not None:
            _activate_quietly()
        return None

    def invalidate_caches(self) -> None:
        pass


def _activate_quietly() -> None:
    """Activate from an import (h5py's, or of h5watch's lock API): a failure
    is logged, never raised into the program's import."""
    try:
        with _install_lock:
            _activate()
    except Exception as exc:
        _log.error("h5watch.unavailable", error=repr(exc))


def activate_for_locks() -> None:
    """``h5watch.WatchedLock`` (or another name of the lock API) was looked up:
    a watched lock is coming, so the fork hooks and the watchdog are needed."""
    if not _active and _options is not None:
        _activate_quietly()


_trigger = _ImportTrigger()


def _arm() -> None:
    if _trigger not in sys.meta_path:
        sys.meta_path.insert(0, _trigger)


def _disarm() -> None:
    try:
        sys.meta_path.remove(_trigger)
    except ValueError:
        pass


def uninstall() -> None:
    """Undo ``install()``: stop the watchdog, disarm hooks, restore h5py's names."""
    global _options, _active
    with _install_lock:
        if _options is None:
            return
        _disarm()
        if _active:
            _stop_parts()
            _active = False
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
    _install_lock = _thread.RLock()


# Also before the parts are built (fork's child callbacks then reach the
# children of forks that skipped Python's hooks too).
os.register_at_fork(after_in_child=_reinit_after_fork)


def snapshot() -> dict[str, Any]:
    """Every watched lock's statistics, holder and waiters, as plain data."""
    if exporter is None:
        with _install_lock:
            _build()
    from h5watch.process.h5py_hook import PHIL_LOCK_NAME

    now_ns = time.monotonic_ns()
    locks = {}
    for watched in lock_module.watched_locks():
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


class _ExporterSlot:
    """The ``metrics_port`` exporter, imported (with numpy and the Prometheus
    client) only by a process that serves ``/metrics``."""

    snapshot_key = "exporter"

    def __init__(self) -> None:
        self.exporter: Any = None

    def start(self, options: Options) -> None:
        if self.exporter is None:
            if options.metrics_port is None:
                return
            from h5watch.process.exporter import InProcessExporter

            self.exporter = InProcessExporter(snapshot)
        self.exporter.start(options)

    def stop(self) -> None:
        if self.exporter is not None:
            self.exporter.stop()

    def forget_after_fork(self) -> None:
        if self.exporter is not None:
            self.exporter.forget_after_fork()

    def snapshot(self) -> dict[str, Any]:
        return self.exporter.snapshot() if self.exporter is not None else {"port": None}


def _named_extensions() -> list[tuple[str, Any]]:
    return [(ext.snapshot_key, ext) for ext in _extensions if getattr(ext, "snapshot_key", None)]
