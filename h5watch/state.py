"""Keeps this process's state file current, and lets outsiders dump its stacks.

Started by ``install()`` when ``state_files`` is on. Writes:

- every watchdog tick: every lock record, then the header (the heartbeat);
- at once, from a lock's slow path, when a thread starts to block on it;
- at once, when a forked child finds an orphaned lock (before its policy:
  a killed child leaves the evidence behind);
- at exit: a last write marked ``exited``.

A forked child (whether or not the fork ran Python's hooks) opens its own
file: the parent's mapping is shared memory, and the child must never write
to it. ``faulthandler`` is registered for ``DUMP_SIGNAL`` on a per-process
stacks file, so the daemon can read every thread's Python stack even when
they are all blocked in C.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import signal
from typing import Any

from . import fork, logs
from .lock import WatchedLock, policy, watched_locks
from .statefile import StateDirError, StateWriter, ensure_state_dir
from .watchdog import add_tick_callback

__all__ = ["StateExtension", "DUMP_SIGNAL"]

# A real-time signal nobody else is likely to use; written into the state file.
DUMP_SIGNAL = int(signal.SIGRTMIN) + 6 if hasattr(signal, "SIGRTMIN") else int(signal.SIGUSR2)

_log = logs.get_logger(logger="h5watch.state")


class StateExtension:
    snapshot_key = "state"

    def __init__(self, watchdog: Any) -> None:
        self.watchdog = watchdog
        self.options: Any = None
        self.writer: StateWriter | None = None
        self._stacks_file: Any = None
        self._hooks_added = False

    def start(self, options: Any) -> None:
        previous = self.options
        self.options = options
        if not options.state_files:
            self.stop()
            return
        if self.writer is not None and previous is not None and (previous.state_dir, previous.service) == (
            options.state_dir,
            options.service,
        ):
            return
        self.stop()
        self.options = options
        if not self._open():
            return
        if not self._hooks_added:
            self._hooks_added = True
            add_tick_callback(self.tick)
            fork.add_child_callback(self._in_child)
            fork.add_orphan_callback(self._on_orphan)
            atexit.register(self._at_exit)
        policy.on_wait_started = self._on_wait_started
        self.tick()

    def stop(self) -> None:
        policy.on_wait_started = None
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close(exited=True)
        self._unregister_dump()

    def snapshot(self) -> dict[str, Any]:
        writer = self.writer
        return {"path": writer.path if writer else None, "stacks_path": writer.stacks_path if writer else None,
                "dump_signal": DUMP_SIGNAL if writer else None}

    # -- writing -------------------------------------------------------------

    def tick(self) -> None:
        writer = self.writer
        if writer is None or not writer.owned_here():
            return
        running = bool(self.watchdog.snapshot()["running"])
        writer.write_all(watched_locks(), (fork.fork_stats.snapshot(), fork.fork_in_progress_since_ns()), running)

    def _on_wait_started(self, lock: WatchedLock) -> None:
        writer = self.writer
        if writer is not None:
            writer.write_one(lock)

    def _on_orphan(self, lock: WatchedLock, evidence: dict[str, Any]) -> None:
        writer = self.writer
        if writer is not None:
            writer.write_one(lock, orphan=evidence)
            self.tick()

    def _at_exit(self) -> None:
        writer = self.writer
        if writer is not None and writer.owned_here():
            self.tick()
            writer.close(exited=True)
            self.writer = None

    # -- per process -----------------------------------------------------------

    def _open(self) -> bool:
        try:
            ensure_state_dir(self.options.state_dir)
            self.writer = StateWriter(self.options.state_dir, self.options.service, DUMP_SIGNAL, self.options.tick_interval)
        except (StateDirError, OSError) as exc:
            _log.error("state.unavailable", state_dir=self.options.state_dir, error=str(exc))
            self.writer = None
            return False
        self._register_dump(self.writer.stacks_path)
        return True

    def _in_child(self) -> None:
        old = self.writer
        if old is None:
            return
        # The parent's mapping and stacks file are the parent's: drop ours, unwritten.
        old.close(exited=False)
        self.writer = None
        self._stacks_file = None
        self._open()

    def _register_dump(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            stacks_file = os.fdopen(fd, "w")
            faulthandler.register(DUMP_SIGNAL, file=stacks_file, all_threads=True, chain=False)
        except (OSError, ValueError, RuntimeError) as exc:
            _log.warning("state.no_stack_dumps", error=str(exc))
            return
        self._stacks_file = stacks_file

    def _unregister_dump(self) -> None:
        if self._stacks_file is None:
            return
        try:
            faulthandler.unregister(DUMP_SIGNAL)
        except (ValueError, RuntimeError):
            pass
        try:
            self._stacks_file.close()
        except OSError:
            pass
        self._stacks_file = None

