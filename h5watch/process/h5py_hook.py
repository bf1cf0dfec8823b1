"""Route h5py's ``phil`` and ``with_phil`` through one ``WatchedLock``.

Every h5py module does ``from ._objects import phil, with_phil`` at its own
import and decorates with ``@with_phil`` at definition time. So replacing both
names in ``h5py._objects`` right after that module executes, before anything
else imports it, covers every Python-visible use (a meta-path hook on
``h5py._objects``). The wrapper holds the real ``FastRLock`` underneath: the
C-level users of ``_phil`` inside ``_objects`` (ObjectID dealloc, close,
hash) stay mutually exclusive with everyone.

If h5py was imported first, the names are rebound in every loaded h5py
module and the Python-level functions decorated with the original
``with_phil`` are re-wrapped; methods of Cython extension types cannot be
replaced and keep using the real lock directly (still correct, not seen).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.machinery
import os
import sys
import threading
import types
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, cast

from h5watch.process import lock as lock_module
from h5watch.process.lock import WatchedLock
from h5watch.process.probe import FastRLockProbe, ProbeUnavailable

if TYPE_CHECKING:
    import importlib.abc

__all__ = ["PhilPatch", "PHIL_LOCK_NAME"]

PHIL_LOCK_NAME = lock_module.PHIL_NAME
_OBJECTS = "h5py._objects"


def make_with_phil(lock: WatchedLock) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    acquire_for = lock.acquire_for
    release = lock.release
    core = lock_module._lockcore
    compiled = core if core is not None and isinstance(lock, core.LockCore) else None

    def with_phil(func: Callable[..., Any]) -> Callable[..., Any]:
        """Locking decorator (h5watch): holds h5py's phil, naming ``func``."""
        operation = f"{getattr(func, '__module__', None) or 'h5py'}.{getattr(func, '__qualname__', repr(func))}"
        if compiled is not None:
            # A compiled callable that binds as a method like a function does,
            # and reads what update_wrapper would copy through to func.
            return compiled.PhilCall(func, lock, operation)  # type: ignore[no-any-return]

        def wrapper(*args: Any, **kwds: Any) -> Any:
            acquire_for(operation)
            try:
                return func(*args, **kwds)
            finally:
                release()

        functools.update_wrapper(wrapper, func)
        wrapper.__h5watch_operation__ = operation  # type: ignore[attr-defined]
        return wrapper

    with_phil.__h5watch__ = True  # type: ignore[attr-defined]
    return with_phil


_AdoptForkHooks = Callable[[Callable[[], Any], Any, Any], bool]


@contextlib.contextmanager
def _fork_hooks_adopted(adopt: _AdoptForkHooks | None) -> Iterator[None]:
    """While ``h5py._objects`` executes, hand its at-fork registration to ``adopt``.

    h5py >= 3.14 runs ``os.register_at_fork(before=_phil_before_fork, ...)``
    from that module's body, looking ``os.register_at_fork`` up at call time;
    its before-hook is a ``phil.acquire()`` with no timeout. Any other
    registration made meanwhile (another thread's) goes through unchanged.
    """
    if adopt is None:
        yield
        return
    register = os.register_at_fork

    def register_at_fork(*, before: Any = None, after_in_parent: Any = None, after_in_child: Any = None) -> None:
        if (
            getattr(before, "__module__", None) == _OBJECTS
            and getattr(before, "__name__", None) == "_phil_before_fork"
            and adopt(before, after_in_parent, after_in_child)
        ):
            return
        kwargs = {name: hook for name, hook in (("before", before), ("after_in_parent", after_in_parent),
                                                ("after_in_child", after_in_child)) if hook is not None}
        register(**kwargs)

    os.register_at_fork = register_at_fork
    try:
        yield
    finally:
        os.register_at_fork = register


class _PatchingLoader:
    """Wraps h5py._objects' own loader (a plain class: importlib.abc is costly to import)."""

    def __init__(
        self, loader: Any, on_executed: Callable[[types.ModuleType], None], adopt_fork_hooks: _AdoptForkHooks | None
    ) -> None:
        self._loader = loader
        self._on_executed = on_executed
        self._adopt_fork_hooks = adopt_fork_hooks

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        with _fork_hooks_adopted(self._adopt_fork_hooks):
            self._loader.exec_module(module)
        self._on_executed(module)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _ObjectsFinder:
    """Finds ``h5py._objects`` through the other finders and patches it once executed."""

    def __init__(self, on_executed: Callable[[types.ModuleType], None], adopt_fork_hooks: _AdoptForkHooks | None) -> None:
        self._on_executed = on_executed
        self._adopt_fork_hooks = adopt_fork_hooks

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != _OBJECTS:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = cast("importlib.abc.Loader", _PatchingLoader(spec.loader, self._on_executed, self._adopt_fork_hooks))
                return spec
        return None


class PhilPatch:
    """Owns the ``h5py.phil`` WatchedLock, the import hook and the probe."""

    def __init__(self, log: Any) -> None:
        self._log = log
        self._lock = threading.RLock()
        self._finder: _ObjectsFinder | None = None
        self.watched: WatchedLock | None = None
        self.real_phil: Any = None
        self.original_with_phil: Any = None
        self.probe: FastRLockProbe | None = None
        self.probe_error: str | None = None
        self.coverage = "none"
        self.uncovered: list[str] = []

    # -- install / uninstall ----------------------------------------------

    def install(self, adopt_fork_hooks: _AdoptForkHooks) -> None:
        """Patch h5py now if it is loaded, else when ``h5py._objects`` executes;
        ``adopt_fork_hooks`` (the fork guard's) then takes over h5py's own
        at-fork registration."""
        with self._lock:
            objects = sys.modules.get(_OBJECTS)
            if objects is not None:
                self._patch_objects(objects)
                self._patch_loaded_late()
            elif self._finder is None:
                self._finder = _ObjectsFinder(self._on_objects_executed, adopt_fork_hooks)
                sys.meta_path.insert(0, self._finder)

    def uninstall(self) -> None:
        """Stop instrumenting future imports; rebind module globals to the real lock.

        Functions already decorated keep the h5watch wrapper, which still holds
        the real lock underneath: correct, merely still counted.
        """
        with self._lock:
            if self._finder is not None and self._finder in sys.meta_path:
                sys.meta_path.remove(self._finder)
            self._finder = None
            if self.watched is None:
                return
            for module in _h5py_modules():
                namespace = vars(module)
                if namespace.get("phil") is self.watched:
                    namespace["phil"] = self.real_phil
                if getattr(namespace.get("with_phil"), "__h5watch__", False):
                    namespace["with_phil"] = self.original_with_phil

    # -- patching ----------------------------------------------------------

    def _on_objects_executed(self, module: types.ModuleType) -> None:
        with self._lock:
            self._patch_objects(module)
            self.coverage = "full"
            self._log.info("h5py.instrumented", lock=PHIL_LOCK_NAME, coverage="full", probe=self.probe_state())

    def _patch_objects(self, module: types.ModuleType) -> None:
        current = module.phil
        if isinstance(current, WatchedLock):
            return
        if self.watched is None:
            self.real_phil = current
            self.original_with_phil = module.with_phil
            self.watched = WatchedLock(PHIL_LOCK_NAME, current)
            self._start_probe(current)
        module.phil = self.watched  # type: ignore[attr-defined]  # h5py module attribute
        module.with_phil = make_with_phil(self.watched)  # type: ignore[attr-defined]  # h5py module attribute

    def _start_probe(self, real_phil: Any) -> None:
        try:
            self.probe = FastRLockProbe(real_phil)
            self.probe_error = None
        except ProbeUnavailable as exc:
            self.probe = None
            self.probe_error = str(exc)
            self._log.warning("probe.disabled", lock=PHIL_LOCK_NAME, reason=self.probe_error)

    def _patch_loaded_late(self) -> None:
        objects = sys.modules[_OBJECTS]
        watched = objects.phil
        ours = objects.with_phil
        rebound, rewrapped = 0, 0
        uncovered: dict[str, int] = {}
        for module in _h5py_modules():
            namespace = vars(module)
            if namespace.get("phil") is self.real_phil:
                namespace["phil"] = watched
                rebound += 1
            if namespace.get("with_phil") is self.original_with_phil:
                namespace["with_phil"] = ours
            for name, value in list(namespace.items()):
                replacement = self._rewrap(value, ours)
                if replacement is not None:
                    namespace[name] = replacement
                    rewrapped += 1
                elif isinstance(value, type) and value.__module__ == module.__name__:
                    r, missed = self._rewrap_class(value, ours)
                    rewrapped += r
                    if missed:
                        uncovered[f"{value.__module__}.{value.__qualname__}"] = missed
        self.uncovered = sorted(uncovered)
        self.coverage = "partial"
        self._log.warning(
            "h5py.instrumented",
            lock=PHIL_LOCK_NAME,
            coverage="partial",
            reason="h5py was imported before h5watch.install(); install h5watch first for full coverage",
            modules_rebound=rebound,
            functions_rewrapped=rewrapped,
            uncovered_methods=sum(uncovered.values()),
            uncovered_types=self.uncovered,
            probe=self.probe_state(),
        )

    def _rewrap(self, value: Any, ours: Callable[..., Any]) -> Any:
        if isinstance(value, property):
            parts = [self._rewrap(getattr(value, part), ours) for part in ("fget", "fset", "fdel")]
            if not any(parts):
                return None
            fget, fset, fdel = (new or getattr(value, part) for new, part in zip(parts, ("fget", "fset", "fdel")))
            return property(fget, fset, fdel, value.__doc__)
        if _is_original_wrapper(value):
            return ours(value.__wrapped__)
        return None

    def _rewrap_class(self, cls: type, ours: Callable[..., Any]) -> tuple[int, int]:
        rewrapped, missed = 0, 0
        for name, value in list(vars(cls).items()):
            replacement = self._rewrap(value, ours)
            if replacement is None:
                continue
            try:
                setattr(cls, name, replacement)
                rewrapped += 1
            except (TypeError, AttributeError):
                missed += 1
        return rewrapped, missed

    # -- reading -----------------------------------------------------------

    # -- the real phil, through the probe (fork.RealLocks) ------------------

    def real_state(self, lock: WatchedLock) -> dict[str, Any] | None:
        if lock is self.watched and self.probe is not None:
            state: dict[str, Any] = self.probe.read()
            return state
        return None

    def reset_real(self, lock: WatchedLock) -> bool:
        if lock is self.watched and self.probe is not None:
            self.probe.reset()
            return True
        return False

    def poison_real(self, lock: WatchedLock, alive_ident: int) -> bool:
        if lock is self.watched and self.probe is not None:
            poisoned: bool = self.probe.poison_dead_owner(alive_ident)
            return poisoned
        return False

    def probe_state(self) -> dict[str, Any]:
        if self.probe is None:
            return {"enabled": False, "reason": self.probe_error or "h5py not instrumented yet"}
        return {"enabled": True, **self.probe.read()}


def _is_original_wrapper(value: Any) -> bool:
    return (
        callable(value)
        and hasattr(value, "__wrapped__")
        and not hasattr(value, "__h5watch_operation__")
        and getattr(value, "__name__", None) is not None
        and type(value).__name__ == "cython_function_or_method"
        and getattr(value, "__code__", None) is not None
        and value.__code__.co_name == "wrapper"
    )


def _h5py_modules() -> list[types.ModuleType]:
    return [
        module
        for name, module in list(sys.modules.items())
        if module is not None and (name == "h5py" or name.startswith("h5py."))
    ]
