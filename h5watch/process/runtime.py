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
from h5watch.options import METRICS_PORT_OWNER, Options, env_name, resolve, unknown_variables

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from h5watch.process.lock import WatchedLock

__all__ = ["install", "uninstall", "snapshot", "current_options", "is_installed", "phil_patch"]

_install_lock = _thread.RLock()
_options: Options | None = None
_log = logs.get_logger(logger="h5watch")
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
_variables_checked = False
# The workload name this process put in the environment for its children.
_service_handed_down: str | None = None


class _Parts:
    """The component graph, built once per process by ``_build()``: the one
    place where the parts are made and connected. It is what each part talks
    to where the arrow points back (``lock.LockEvents``, ``fork.ForkParts``,
    ``watchdog.Heartbeat``), and passes each call on in a fixed order."""

    def __init__(self) -> None:
        from h5watch.process.flight import FlightRecorder
        from h5watch.process.fork import ForkGuard
        from h5watch.process.gc_activity import GcActivity
        from h5watch.process.h5py_hook import PhilPatch
        from h5watch.process.publisher import StatePublisher
        from h5watch.process.watchdog import Watchdog

        self.recorder = FlightRecorder()
        self.phil_patch = PhilPatch(_log)
        self.fork_guard = ForkGuard(real_locks=self.phil_patch, parts=self, recorder=self.recorder)
        gc_activity = GcActivity(real_phil=self.phil_patch, recorder=self.recorder)
        self.watchdog = Watchdog(forks=self.fork_guard, heartbeat=self, gc_activity=gc_activity,
                                 make_deadlock_detector=lambda: _deadlock_detector(self.phil_patch, gc_activity, self.recorder),
                                 recorder=self.recorder)
        self.publisher = StatePublisher(forks=self.fork_guard, watchdog=self.watchdog, recorder=self.recorder)
        self.exporter = _ExporterSlot()
        # Started in this order, stopped in the reverse one.
        self.started: tuple[Any, ...] = (self.recorder, self.fork_guard, self.watchdog, self.publisher, self.exporter)

    # -- lock.LockEvents -----------------------------------------------------

    def pid_changed(self) -> None:
        self.fork_guard.after_fork_without_hooks()

    def orphan_wait(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        self.fork_guard.orphan_wait(lock, evidence)

    def wait_started(self, lock: WatchedLock) -> None:
        self.watchdog.wake()
        self.publisher.lock_waited(lock)

    def wait_timed_out(self, lock: WatchedLock, waited_ns: int) -> None:
        self.watchdog.wait_timed_out(lock, waited_ns)

    def lock_created(self, lock: WatchedLock) -> None:
        self.publisher.lock_created(lock)

    def long_wait(self, lock: WatchedLock, waited_ns: int, behind: str | None) -> None:
        self.recorder.long_wait(lock.name, waited_ns, behind, len(lock._waiters))

    def long_hold(self, lock: WatchedLock, held_ns: int, operation: str | None) -> None:
        self.recorder.long_hold(lock.name, held_ns, operation, len(lock._waiters))

    # -- fork.ForkParts ------------------------------------------------------

    def before_fork(self) -> None:
        self.watchdog.before_fork()

    def after_fork_in_child(self) -> None:
        """The child's steps after h5watch's own (see ``fork``), in this order:
        this module's lock, the flight recorder (a ring of the child's own,
        before anything could write into the parent's), the state file, the
        exporter, and last the watchdog, the one step that may start a thread.
        subprocess's child, which execs at once, makes its ring only if it
        records something, and sets its parent's file aside unclosed (the
        exec closes it)."""
        _reinit_after_fork()
        self.recorder.after_fork_in_child(lazily=self.fork_guard.fork_for_exec())
        self.publisher.after_fork_in_child()
        self.exporter.forget_after_fork()
        self.watchdog.after_fork_in_child()

    def orphan_acted_on(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        holder = evidence.get("holder") or {}
        self.recorder.record("orphan", lock=lock.name, operation=holder.get("operation"), extra=evidence.get("parent_pid") or 0,
                             thread=(holder.get("native_id"), holder.get("thread_name")))
        self.publisher.orphan_acted_on(lock, evidence)

    # -- watchdog.Heartbeat --------------------------------------------------

    def beat(self) -> None:
        self.publisher.beat()

    def watchdog_stopped(self) -> None:
        self.publisher.watchdog_stopped()

    # -- starting and stopping -------------------------------------------------

    def start(self, options: Options) -> None:
        self.phil_patch.install(self.fork_guard.adopt_h5py_hooks)
        for part in self.started:
            part.start(options)
        raise_after_ns = None
        if options.on_timeout == "raise" and options.wait_timeout is not None:
            raise_after_ns = int(options.wait_timeout * 1e9)
        lock_module.connect(self, raise_after_ns, interruptible=options.on_deadlock == "raise",
                            record_after_ns=self.recorder.threshold_ns)

    def stop(self) -> None:
        """Stop every part, whichever started; each stop is safe on a part never started."""
        lock_module.connect(None)
        for part in reversed(self.started):
            part.stop()
        self.phil_patch.uninstall()


if TYPE_CHECKING:
    from h5watch.process.fork import ForkParts
    from h5watch.process.lock import LockEvents
    from h5watch.process.watchdog import Heartbeat

    def _checks_the_interfaces(parts: _Parts) -> tuple[LockEvents, ForkParts, Heartbeat]:
        return parts, parts, parts


_parts: _Parts | None = None


def _deadlock_detector(real_phil: Any, gc_activity: Any, recorder: Any) -> Any:
    """The deadlock detector, made by the watchdog at its first tick."""
    from h5watch.process.deadlock import DeadlockDetector

    return DeadlockDetector(real_phil=real_phil, gc_activity=gc_activity, recorder=recorder)


def _build() -> None:
    """Import and wire the parts, once per process; nothing is started here.
    The caller holds ``_install_lock``."""
    global _parts, lock_module, phil_patch, fork_guard, watchdog, state, exporter
    if _parts is not None:
        return
    logs.prepare()  # events may come from at-fork hooks: nothing may be imported then
    from h5watch.process import lock

    lock_module = lock
    parts = _Parts()
    # For introspection (snapshot(), tests): the same objects.
    phil_patch, fork_guard, watchdog, state, exporter = (
        parts.phil_patch, parts.fork_guard, parts.watchdog, parts.publisher, parts.exporter)
    _parts = parts


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
            _watch_locks(resolved)
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
        _warn_unknown_variables()
        _hand_down_to_children(resolved, port_by_keyword="metrics_port" in options)
        return resolved


def _warn_unknown_variables() -> None:
    """Once per process; not under ``h5watch run``, which said so already."""
    global _variables_checked
    if _variables_checked:
        return
    _variables_checked = True
    if os.environ.get("H5WATCH_BOOTSTRAP") == "1":
        return
    for variable, closest in unknown_variables():
        _log.warning("options.unknown_variable", variable=variable, did_you_mean=closest, action="ignored")


def _hand_down_to_children(resolved: Options, port_by_keyword: bool) -> None:
    """What the processes this one starts read from the environment: its
    workload name (unless one is set there), so that a spawned child is
    counted with its parent; and that a single metrics port taken from the
    environment is this process's, not theirs (each would fail to bind it)."""
    global _service_handed_down
    # Set only when it changes: setenv() races with getenv() in threads
    # running C code, and install() is usually called before any start.
    variable = env_name("service")
    if os.environ.get(variable) in (None, _service_handed_down):
        os.environ[variable] = _service_handed_down = resolved.service
    port = resolved.metrics_port
    if not port_by_keyword and isinstance(port, int) and port and METRICS_PORT_OWNER not in os.environ:
        os.environ[METRICS_PORT_OWNER] = str(os.getpid())


def _apply_options(resolved: Options) -> None:
    """Install or reconfigure; the caller holds ``_install_lock``."""
    global _options
    logs.configure(resolved.log_format, level=resolved.log_level, workload=resolved.service)
    if _options == resolved:
        if _active:
            phil_patch.install(fork_guard.adopt_h5py_hooks)
        else:
            _activate_if_due()
        return
    _options = resolved
    if _active:
        _start_parts(resolved)
    else:
        _arm()
        _activate_if_due()


def _watch_locks(resolved: Options) -> None:
    """The ``watch_locks`` option: replace the named locks (now, or as their
    modules are imported); a lock replaced now is a watched lock, so the
    parts start. The caller holds ``_install_lock``."""
    if not resolved.watch_locks and "h5watch.process.watch_locks" not in sys.modules:
        return  # never used: nothing to load
    from h5watch.process import watch_locks

    if watch_locks.watch(resolved.watch_locks):
        _activate()


def _restore_locks() -> None:
    """Put back every lock ``watch_locks`` replaced. The caller holds ``_install_lock``."""
    watch_locks = sys.modules.get("h5watch.process.watch_locks")
    if watch_locks is not None:
        watch_locks.restore_all()


def _roll_back(previous: Options | None) -> None:
    """A step of ``install()`` failed: leave h5watch as the call found it,
    else uninstalled; never half installed. The caller holds ``_install_lock``."""
    global _options, _active
    if previous is not None:
        logs.configure(previous.log_format, level=previous.log_level, workload=previous.service)
        _options = previous
        try:
            _watch_locks(previous)
        except Exception as exc:
            _log.error("h5watch.unavailable", error=repr(exc), reason="the previous watch_locks could not be restored")
        if not _active:
            return  # _activate() stopped what it had started; still armed
        try:
            _start_parts(previous)
            return
        except Exception as exc:
            _log.error("h5watch.unavailable", error=repr(exc), reason="the previous options could not be restored")
    _restore_locks()
    _disarm()
    if _active:
        _stop_parts()
        _active = False
    _options = None


def _start_parts(options: Options) -> None:
    assert _parts is not None
    _parts.start(options)


def _stop_parts() -> None:
    if _parts is not None:
        _parts.stop()


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
            slower="the lock hot path runs in pure Python, a few percent slower",
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
    """Undo ``install()``: stop the watchdog, disarm hooks, restore h5py's
    names and the locks ``watch_locks`` replaced."""
    global _options, _active
    with _install_lock:
        if _options is None:
            return
        _restore_locks()
        _disarm()
        if _active:
            _stop_parts()
            _active = False
        _options = None


def is_installed() -> bool:
    return _options is not None


def current_options() -> Options | None:
    return _options


def _reinit_after_fork() -> None:
    global _install_lock
    _install_lock = _thread.RLock()


# Also before the parts are built (the parts' child steps then reach the
# children of forks that skipped Python's hooks too).
os.register_at_fork(after_in_child=_reinit_after_fork)


def snapshot() -> dict[str, Any]:
    """Every watched lock's statistics, holder and waiters, as plain data."""
    if _parts is None:
        with _install_lock:
            _build()
    from h5watch.process import lock_order
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
        "lock_order": lock_order.snapshot(),
        **{part.snapshot_key: part.snapshot() for part in (_parts.started if _parts is not None else ())},
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

