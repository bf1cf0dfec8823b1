"""The ``watch_locks`` option: a service's own locks, watched with no code change.

Each ``module:attribute`` path (``myapp.cache:_lock``, ``logging:_lock``,
``myapp.db:Pool.lock``) names a ``threading.Lock`` or ``threading.RLock``
that is replaced, where the path names it, by a :class:`WatchedLock`
wrapping it and named by the path. A module imported already is changed at
once; any other right after its body first runs, by a meta-path finder that
wraps the loader it finds and leaves ``sys.meta_path`` once no path waits.

The wrapper keeps what it wraps: a ``threading.Lock`` stays non-reentrant
(a second acquisition by its holder waits, as it would, but as a visible
waiter), an RLock re-entrant; both take ``threading.Condition`` and the
at-fork re-initialisation ``logging`` does. Code that took a reference to the
lock before it was replaced (``from myapp.cache import _lock``) keeps the
original, unwatched. A path that cannot be watched (no such attribute, not a
lock) is logged as ``lock.watch_failed`` and the program runs on.
"""

from __future__ import annotations

import _thread
import os
import sys
import threading
from typing import TYPE_CHECKING, Any, cast

from h5watch import logs
from h5watch.process import lock as lock_module
from h5watch.records import Record

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.abc import Loader
    from importlib.machinery import ModuleSpec
    from types import ModuleType

__all__ = ["watch", "restore_all", "watched_paths", "pending_paths"]

_log = logs.get_logger(logger="h5watch")
_get_ident = threading.get_ident
_PLAIN_LOCK_TYPE = type(_thread.allocate_lock())
_RLOCK_TYPES: tuple[type, ...] = tuple({type(threading.RLock()), threading._PyRLock})  # type: ignore[attr-defined]


class _Replaced(Record):
    owner: Any
    attribute: str
    original: Any
    wrapper: Any


# Guards the tables below. The finder runs on whichever thread imports.
_state_lock = _thread.RLock()
# path -> what it replaced (the lock it holds, where it was)
_replaced: dict[str, _Replaced] = {}
# paths whose module is not imported yet, by module name
_pending: dict[str, list[str]] = {}


# Events logged while _state_lock was held, logged once it is let go: logging
# may import (structlog, at the first event), and an import on another
# thread may be waiting for _state_lock while it holds that module's lock.
_unlogged: list[Callable[[], object]] = []


class _Changing:
    """``with _changing:`` holds ``_state_lock``, then logs what was noted."""

    def __enter__(self) -> None:
        _state_lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        lock = _state_lock
        lock.release()
        if not lock._is_owned():  # type: ignore[attr-defined]
            while _unlogged:
                _unlogged.pop(0)()


_changing = _Changing()


def _reinit_after_fork() -> None:
    global _state_lock
    _state_lock = _thread.RLock()  # a thread that held it did not survive the fork


os.register_at_fork(after_in_child=_reinit_after_fork)


# -- the wrappers ----------------------------------------------------------------------


# The base class's hot path, called without super()'s cost.
_acquire = lock_module.WatchedLock.acquire
_acquire_for = lock_module.WatchedLock.acquire_for
_release = lock_module.WatchedLock.release


class WatchedRLock(lock_module.WatchedLock):
    """A watched ``threading.RLock`` (or any lock when re-entrant is right)."""

    __slots__ = ()

    def release(self) -> None:
        if self._owner != _get_ident() and self._inner._is_owned():
            # Taken through the original before the replacement (logging's
            # _acquireLock, then _releaseLock): given back to the original.
            self._inner.release()
            return
        _release(self)

    def _at_fork_reinit(self) -> None:
        # Called in a forked child by code that took the lock in a before-fork
        # hook (logging does, for its module lock). h5watch's own before-fork
        # hook holds every watched lock too and gives it back next, so this
        # gives back one level (the caller's) instead of forgetting every
        # level. Held by a thread that did not survive, or free: free as new
        # (the inner lock too, which code holding the original may have taken).
        if self._owner == _get_ident():
            self.release()
        elif self._reinit_inner():
            self._force_reset()


class WatchedPlainLock(WatchedRLock):
    """A watched ``threading.Lock``: never re-entrant, as the lock it wraps.

    Its holder acquiring it again waits (as on the plain lock: forever, or for
    its timeout, unless another thread releases it), listed as a waiter of
    its own lock, where the watchdog and the wait timeout see it. Another
    thread may release it, as it may release a ``threading.Lock``.
    """

    __slots__ = ()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if self._owner == _get_ident():
            return self._acquire_again(blocking, timeout)
        return _acquire(self, blocking, timeout)

    def acquire_for(self, operation: str | None = None) -> bool:
        if self._owner == _get_ident():
            return self._acquire_again(True, -1)
        return _acquire_for(self, operation)

    def __enter__(self) -> bool:  # type: ignore[override]
        if self._owner == _get_ident():
            return self._acquire_again(True, -1)
        return _acquire_for(self, None)

    def _acquire_again(self, blocking: bool, timeout: float) -> bool:
        specimen = _thread.allocate_lock()  # raises what threading.Lock raises for bad arguments
        if specimen.acquire(blocking, timeout):
            specimen.release()
        if not blocking:
            return False
        if not self._acquire_slow(_get_ident(), float(timeout)):
            return False
        # Another thread released the lock meanwhile, and this one took it:
        # recorded as the holder (an uncounted hold, as the fork's own).
        self._take_for_fork(None)  # type: ignore[arg-type]
        return True

    def release(self) -> None:
        owner = self._owner
        if owner is None and self._inner.locked():
            # Taken through the original before the replacement (or by code
            # that holds the original): given back to the original.
            self._inner.release()
            return
        if owner is not None and owner != _get_ident():
            # threading.Lock lets any thread release it: end the holder's hold.
            self._owner = _get_ident()
        _release(self)


def _wrapper_for(path: str, original: Any) -> Any:
    """A watched lock wrapping ``original``, or None if it is no lock we wrap."""
    if isinstance(original, _PLAIN_LOCK_TYPE):
        return WatchedPlainLock(path, original)
    if isinstance(original, _RLOCK_TYPES):
        return WatchedRLock(path, original)
    return None


def _refusal(original: Any) -> str:
    if isinstance(original, lock_module.PythonWatchedLock) or (
        lock_module.CompiledWatchedLock is not None and isinstance(original, lock_module.CompiledWatchedLock)
    ):
        return f"it is a watched lock already ({original.name!r})"
    if not (callable(getattr(original, "acquire", None)) and callable(getattr(original, "release", None))):
        return f"it is not a lock (a {type(original).__qualname__}, with no acquire and release)"
    return f"it is a {type(original).__qualname__}, not a threading.Lock or threading.RLock"


# -- replacing ----------------------------------------------------------------------


def watch(paths: Sequence[str]) -> bool:
    """Watch exactly ``paths`` from now on: replace each that is not replaced
    yet (now, or when its module is first imported), put back the ones no
    longer asked for. True if a lock was replaced now."""
    with _changing:
        wanted = set(paths)
        for path in [path for path in _replaced if path not in wanted]:
            _restore(path)
        for module_name in list(_pending):
            _pending[module_name] = [path for path in _pending[module_name] if path in wanted]
            if not _pending[module_name]:
                del _pending[module_name]
        replaced = False
        for path in paths:
            module_name = path.partition(":")[0]
            module = sys.modules.get(module_name)
            waiting = path in _pending.get(module_name, ())
            if module is not None and not (waiting and _initializing(module)):
                replaced = _replace(path, module) or replaced
            elif not waiting:
                _pending.setdefault(module_name, []).append(path)
        _update_finder()
        return replaced


def _initializing(module: ModuleType) -> bool:
    """Is the module's body running now (on another thread, or up the stack)?
    Its pending paths are then replaced when the body has run."""
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def restore_all() -> None:
    """Put every original lock back where it was; forget the pending paths."""
    with _changing:
        for path in list(_replaced):
            _restore(path)
        _pending.clear()
        _update_finder()


def watched_paths() -> list[str]:
    with _changing:
        return list(_replaced)


def pending_paths() -> list[str]:
    with _changing:
        return [path for paths in _pending.values() for path in paths]


def _replace(path: str, module: ModuleType, *, body_ran: bool = False) -> bool:
    """Replace the lock ``path`` names in ``module``; the caller holds ``_state_lock``.
    ``body_ran``: the module's body has just run (its spec still says initializing)."""
    owner: Any = module
    *parents, attribute = path.partition(":")[2].split(".")
    for parent in parents:
        owner = getattr(owner, parent, _MISSING)
        if owner is _MISSING:
            return _failed(path, f"module {module.__name__!r} has no attribute {path.partition(':')[2]!r}")
    original = getattr(owner, attribute, _MISSING)
    if original is _MISSING and not body_ran and _initializing(module):
        return _failed(path, f"module {module.__name__!r} has no attribute {path.partition(':')[2]!r} yet: its body"
                       " is still running (install() called from it?)")
    if original is _MISSING:
        return _failed(path, f"module {module.__name__!r} has no attribute {path.partition(':')[2]!r}")
    previous = _replaced.get(path)
    if previous is not None and original is previous.wrapper:
        return False  # replaced already: never wrap a lock twice
    wrapper = _wrapper_for(path, original)
    if wrapper is None:
        return _failed(path, _refusal(original))
    try:
        setattr(owner, attribute, wrapper)
    except (AttributeError, TypeError) as exc:
        return _failed(path, f"its owner refuses the replacement ({exc})")
    _replaced[path] = _Replaced(owner, attribute, original, wrapper)
    inner = type(original).__qualname__
    _unlogged.append(lambda: _log.info("lock.watched", lock=path, inner=inner))
    return True


def _restore(path: str) -> None:
    """Put ``path``'s original back, unless something replaced our wrapper since
    (a reload ran the module's body again: what it made stays)."""
    replaced = _replaced.pop(path)
    if getattr(replaced.owner, replaced.attribute, None) is replaced.wrapper:
        setattr(replaced.owner, replaced.attribute, replaced.original)


def _failed(path: str, reason: str) -> bool:
    _unlogged.append(lambda: _log.warning("lock.watch_failed", lock=path, reason=reason))
    return False


_MISSING = object()


# -- modules not imported yet ------------------------------------------------------------


class _PendingImportFinder:
    """A meta-path finder that finds through the others, then has the loader
    they found replace the pending locks right after the module's body runs."""

    def __init__(self) -> None:
        self._finding: set[tuple[int, str]] = set()

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> ModuleSpec | None:
        key = (_get_ident(), fullname)
        if fullname not in _pending or key in self._finding:
            return None
        self._finding.add(key)  # another finder may look this name up through sys.meta_path
        try:
            spec = _find_with_the_other_finders(self, fullname, path, target)
        finally:
            self._finding.discard(key)
        if spec is None:
            return None
        loader = spec.loader
        reason = None
        if loader is None or type(loader).__name__ in ("NamespaceLoader", "_NamespaceLoader"):
            reason = f"module {fullname!r} is a namespace package: it has no attributes of its own to replace"
        elif not hasattr(loader, "exec_module"):
            reason = f"the loader of module {fullname!r} ({type(loader).__qualname__}) has no exec_module to replace after"
        if reason is not None:
            with _changing:
                for lock_path in _pending.pop(fullname, ()):
                    _failed(lock_path, reason)
                _update_finder()
            return spec
        spec.loader = cast("Loader", _ReplacingLoader(loader))
        return spec

    def invalidate_caches(self) -> None:
        pass


def _find_with_the_other_finders(me: Any, fullname: str, path: Any, target: Any) -> ModuleSpec | None:
    for finder in list(sys.meta_path):
        if finder is me:
            continue
        find_spec = getattr(finder, "find_spec", None)
        if find_spec is None:
            continue
        spec: ModuleSpec | None = find_spec(fullname, path, target)
        if spec is not None:
            return spec
    return None


class _ReplacingLoader:
    """Stands in for the found loader while the module is created; gives the
    module its real loader back before its body runs, then replaces its
    pending locks (if the body raised, they stay pending)."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        create: Any = getattr(self._loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        self._loader.exec_module(module)
        _module_ran(module)


def _module_ran(module: ModuleType) -> None:
    replaced = False
    with _changing:
        for path in _pending.pop(module.__name__, ()):
            replaced = _replace(path, module, body_ran=True) or replaced
        _update_finder()
    if replaced:
        from h5watch.process import runtime

        runtime.activate_for_locks()


_finder = _PendingImportFinder()


def _update_finder() -> None:
    """In ``sys.meta_path`` exactly while a path waits for its module."""
    present = _finder in sys.meta_path
    if _pending and not present:
        sys.meta_path.insert(0, _finder)
    elif not _pending and present:
        sys.meta_path.remove(_finder)

