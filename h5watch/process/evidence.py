"""Stacks of this process's threads, as text, for incident log events.

Every stack is trimmed to what explains the incident: h5watch's own frames
(the wait inside ``WatchedLock``, its wrappers of h5py's functions, the
watchdog asking; not those of the demo's programs) are left out, and only the innermost :data:`MAX_FRAMES` frames are kept, with a
first line saying how many outer frames were dropped. A lock's waiters are
capped: the oldest :data:`WAITERS_IN_FULL` in full, then how many more
(``waiters_more``) and their distinct stacks, each once with how many
threads share it (``waiters_more_stacks``).

All of this runs when an incident is reported, never on a lock's hot path.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import FrameType
from typing import Any

__all__ = ["current_stack", "holder_operation", "lock_evidence", "thread_stack", "MAX_FRAMES", "WAITERS_IN_FULL"]

MAX_FRAMES = 30
WAITERS_IN_FULL = 5
# At most this many distinct stacks of the waiters not shown in full.
MAX_DISTINCT_STACKS = 10

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
# The programs ``h5watch demo`` runs stand for a user's code: their frames stay.
_DEMO_DIR = _PACKAGE_DIR + "demo" + os.sep


def _is_ours(frame: FrameType) -> bool:
    path = os.path.abspath(frame.f_code.co_filename)
    return path.startswith(_PACKAGE_DIR) and not path.startswith(_DEMO_DIR)


def format_frames(frame: FrameType | None) -> str:
    """The stack ending at ``frame`` (innermost last, as tracebacks print),
    without h5watch's frames (its lock and wrappers: plumbing, not the
    program), capped at the innermost ``MAX_FRAMES``."""
    frames: list[FrameType] = []
    depth = 0
    walker = frame
    while walker is not None:
        if not _is_ours(walker):
            depth += 1
            if len(frames) < MAX_FRAMES:
                frames.append(walker)
        walker = walker.f_back
    if not frames:  # nothing but h5watch: show it as it is
        return "".join(traceback.format_stack(frame, limit=MAX_FRAMES)) if frame is not None else ""
    summary = traceback.StackSummary.extract(((f, f.f_lineno) for f in reversed(frames)), limit=None)
    text = "".join(summary.format())
    dropped = depth - len(frames)
    return f"[{dropped} outer frames dropped]\n{text}" if dropped > 0 else text


def thread_stack(ident: int | None) -> str | None:
    """The Python stack of a live thread of this process, or None if it is gone."""
    if ident is None:
        return None
    frame = sys._current_frames().get(ident)
    if frame is None:
        return None
    return format_frames(frame)


def current_stack(skip: int = 1) -> str:
    return format_frames(sys._getframe(skip))


def holder_operation(ident: int | None) -> str | None:
    """The h5py call a thread is in, named from its stack: the h5py function
    it entered last from outside h5py (``h5py._hl.files.File.__init__`` for
    a slow file-like object read while a file opens), or None. For holds
    taken by a plain ``with phil:``, which name no operation."""
    if ident is None:
        return None
    frame = sys._current_frames().get(ident)
    entry: FrameType | None = None
    while frame is not None:
        if _is_ours(frame):
            pass  # h5watch's wrappers sit between h5py's frames
        elif _in_h5py(frame):
            entry = frame
        elif entry is not None:
            break  # the innermost run of h5py frames ends here
        frame = frame.f_back
    return None if entry is None else _qualified_name(entry)


def _in_h5py(frame: FrameType) -> bool:
    module = frame.f_globals.get("__name__")
    return isinstance(module, str) and (module == "h5py" or module.startswith("h5py."))


def _qualified_name(frame: FrameType) -> str:
    code = frame.f_code
    qualname: str | None = getattr(code, "co_qualname", None)  # Python 3.11+
    if qualname is None:
        qualname = code.co_name
        owner = frame.f_locals.get("self")
        for cls in type(owner).__mro__ if owner is not None else ():
            if getattr(cls.__dict__.get(code.co_name), "__code__", None) is code:
                qualname = f"{cls.__qualname__}.{code.co_name}"
                break
    return f"{frame.f_globals.get('__name__')}.{qualname}"


def lock_evidence(lock: Any, with_stacks: bool = True) -> dict[str, Any]:
    """Holder identity and waiters of ``lock``, with their current stacks:
    the oldest waiters in full, the rest counted and their stacks deduplicated."""
    evidence: dict[str, Any] = lock.evidence()
    holder = evidence.get("holder")
    if holder is not None and holder.get("operation") is None:
        operation = holder_operation(holder.get("thread_ident"))
        if operation is not None:
            holder["operation"] = operation
            holder["operation_from_stack"] = True
    waiters = evidence.get("waiters", [])
    evidence["waiters"], rest = waiters[:WAITERS_IN_FULL], waiters[WAITERS_IN_FULL:]
    evidence["waiters_more"] = len(rest)
    if with_stacks:
        if holder is not None:
            holder["stack"] = thread_stack(holder["thread_ident"])
        for waiter in evidence["waiters"]:
            waiter["stack"] = thread_stack(waiter["thread_ident"])
    if rest and with_stacks:
        evidence["waiters_more_stacks"] = distinct_stacks([thread_stack(waiter["thread_ident"]) for waiter in rest])
    return evidence


def distinct_stacks(stacks: list[str | None]) -> list[dict[str, Any]]:
    """Each distinct stack once, with how many threads share it, most shared
    first; past ``MAX_DISTINCT_STACKS``, the remaining threads as one entry
    with no stack."""
    counts: dict[str | None, int] = {}
    for stack in stacks:
        counts[stack] = counts.get(stack, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    shown = [{"threads": n, "stack": stack} for stack, n in ranked[:MAX_DISTINCT_STACKS]]
    others = sum(n for _, n in ranked[MAX_DISTINCT_STACKS:])
    if others:
        shown.append({"threads": others, "stack": None, "distinct_stacks_not_shown": len(ranked) - MAX_DISTINCT_STACKS})
    return shown
