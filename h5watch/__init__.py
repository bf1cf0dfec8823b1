"""h5watch: lock-timeout monitoring for h5py's global lock and your own.

``import h5watch; h5watch.install()`` before h5py is imported instruments
h5py's ``phil``; ``h5watch.WatchedLock`` instruments any other lock.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

from h5watch.options import OptionError, Options

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from h5watch.process.lock import DeadlockError, LockTimeout, OrphanedLockError, WatchedLock
    from h5watch.process.runtime import install, is_installed, snapshot, uninstall

_RUNTIME_NAMES = frozenset({"install", "is_installed", "snapshot", "uninstall"})
_LOCK_NAMES = frozenset({"DeadlockError", "LockTimeout", "OrphanedLockError", "WatchedLock"})


def __getattr__(name: str) -> Any:
    # Loaded on first use: host commands and ``h5watch --version`` never
    # import the in-process runtime, and ``install()`` alone (every process
    # under ``h5watch run``) loads neither the lock nor the rest of h5watch
    # until h5py is imported or a WatchedLock is wanted.
    if name in _RUNTIME_NAMES:
        from h5watch.process import runtime

        return getattr(runtime, name)
    if name in _LOCK_NAMES:
        from h5watch.process import lock

        value = getattr(lock, name)
        loaded_runtime = sys.modules.get("h5watch.process.runtime")
        if loaded_runtime is not None:
            loaded_runtime.activate_for_locks()  # installed before: start watching now
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DeadlockError",
    "LockTimeout",
    "OptionError",
    "Options",
    "OrphanedLockError",
    "WatchedLock",
    "__version__",
    "install",
    "is_installed",
    "snapshot",
    "uninstall",
]
