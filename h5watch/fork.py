"""Every at-fork action of h5watch (being built)."""

from __future__ import annotations

from typing import Any, Callable

__all__ = ["add_child_callback", "add_orphan_callback"]

_child_callbacks: list[Callable[[], None]] = []
_orphan_callbacks: list[Callable[[Any, dict], None]] = []


def add_child_callback(callback: Callable[[], None]) -> None:
    """Run ``callback()`` in every forked child once h5watch's own state is re-initialised."""
    if callback not in _child_callbacks:
        _child_callbacks.append(callback)


def add_orphan_callback(callback: Callable[[Any, dict], None]) -> None:
    """Run ``callback(lock, evidence)`` when an orphaned lock is found, before its policy applies."""
    if callback not in _orphan_callbacks:
        _orphan_callbacks.append(callback)
