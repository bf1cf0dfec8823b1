"""h5watch: lock-timeout monitoring for h5py's global lock and your own.

``import h5watch; h5watch.install()`` before h5py is imported instruments
h5py's ``phil``; ``h5watch.WatchedLock`` instruments any other lock.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .lock import LockTimeout, OrphanedLockError, WatchedLock
from .options import OptionError, Options
from .runtime import install, is_installed, snapshot, uninstall

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
