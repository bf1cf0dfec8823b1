"""h5watch: lock-timeout monitoring for h5py's global lock and your own.

``import h5watch; h5watch.install()`` before h5py is imported instruments
h5py's ``phil``; ``h5watch.WatchedLock`` instruments any other lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from .lock import LockTimeout, OrphanedLockError, WatchedLock
from .options import OptionError, Options

if TYPE_CHECKING:
    from .runtime import install, is_installed, snapshot, uninstall

_RUNTIME_NAMES = frozenset({"install", "is_installed", "snapshot", "uninstall"})


def __getattr__(name: str) -> Any:
    # The in-process runtime (logging, watchdog, state files, exporter) loads
    # on first use: host commands and ``h5watch --version`` never import it.
    if name in _RUNTIME_NAMES:
        from . import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
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
