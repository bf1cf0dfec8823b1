"""Stacks of this process's threads, as text, for incident log events."""

from __future__ import annotations

import sys
import traceback
from typing import Any

__all__ = ["thread_stack", "current_stack", "lock_evidence"]

_MAX_FRAMES = 40


def thread_stack(ident: int | None) -> str | None:
    """The Python stack of a live thread of this process, or None if it is gone."""
    if ident is None:
        return None
    frame = sys._current_frames().get(ident)
    if frame is None:
        return None
    return "".join(traceback.format_stack(frame, limit=_MAX_FRAMES))


def current_stack(skip: int = 1) -> str:
    frame = sys._getframe(skip)
    return "".join(traceback.format_stack(frame, limit=_MAX_FRAMES))


def lock_evidence(lock: Any, with_stacks: bool = True) -> dict[str, Any]:
    """Holder identity and waiters of ``lock``, with their current stacks."""
    evidence: dict[str, Any] = lock.evidence()
    if with_stacks:
        holder = evidence.get("holder")
        if holder is not None:
            holder["stack"] = thread_stack(holder["thread_ident"])
        for waiter in evidence.get("waiters", []):
            waiter["stack"] = thread_stack(waiter["thread_ident"])
    return evidence
