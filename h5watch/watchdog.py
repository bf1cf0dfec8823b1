"""The per-process watchdog thread (being built)."""

from __future__ import annotations

from typing import Callable

__all__ = ["add_tick_callback"]

_tick_callbacks: list[Callable[[], None]] = []


def add_tick_callback(callback: Callable[[], None]) -> None:
    """Run ``callback()`` in the watchdog thread after every tick's checks."""
    if callback not in _tick_callbacks:
        _tick_callbacks.append(callback)
