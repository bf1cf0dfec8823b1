"""Lock-order checking, as Linux's lockdep does it: inversions found before
they deadlock.

Each thread keeps the watched locks it holds (outermost holds only). When it
takes another one while holding some, every (held -> acquired) pair is an
edge of the order graph; the first sighting of an edge records the
acquiring thread and its stack, and searches the graph for a path back from
the acquired lock to the held one. Such a path closes a cycle: two threads
following it at the same time would deadlock. It is logged once per pair
of locks as ``lock.order_inversion``, with every edge's first stack, in a
program that never actually deadlocks.

Locks are grouped by name (lockdep's "lock classes"): every
``WatchedLock("app.file")`` is one node, so one report covers every pair of
instances, and nested holds of two locks of the same name are not checked.

Hot path: an acquisition with no watched lock held, and a re-entry, cost one
thread-local read. A nested acquisition looks its edges up in ``edges``;
only a first sighting runs :func:`first_sighting` (stack, cycle search,
report). The compiled core (``check_order`` and the held-lock stack in
``_lockcore.c``) and the pure-Python lock (:func:`check`, :data:`held`) do
the same steps.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from h5watch import logs
from h5watch.records import Record

__all__ = [
    "MAX_HELD",
    "Edge",
    "OrderedLock",
    "check",
    "class_of",
    "edge_key",
    "edges",
    "first_sighting",
    "held",
    "inversions",
    "pop",
    "push",
    "is_checking",
    "set_checking",
    "snapshot",
]

# A thread's held-lock stack keeps at most this many locks (the compiled
# core's fixed array); holds beyond it are not checked.
MAX_HELD = 32
_CLASS_BITS = 32

_log = logs.get_logger(logger="h5watch.lock_order")


if TYPE_CHECKING:  # interfaces for the type checker only: each Protocol class made costs start-up about 0.05 ms
    class OrderedLock(Protocol):
        """What the checker reads of a watched lock."""

        name: str
        _order_class: int
        # The last class found to have an edge to this lock's (edges are never
        # forgotten: a one-entry cache that spares the lookup of the usual nesting).
        _order_seen_from: int


class Edge(Record):
    """The first sighting of "held ``held`` while taking ``acquired``"."""

    held: str
    acquired: str
    thread_name: str | None
    thread_ident: int
    native_id: int | None
    pid: int
    seen_unix: float
    stack: str


# Lock name -> class id (1, 2, ...; 0 means "not checked"). Every name gets
# its id once, from a counter whose next() is atomic under the GIL.
_class_ids: dict[str, int] = {}
_class_names: dict[int, str] = {}
_next_class = itertools.count(1)
# Edge key -> first sighting. dict.setdefault makes the first sighting of
# an edge happen once, with no lock (a lock here could be inherited held by
# a forked child). The compiled core looks keys up in this same dict.
edges: dict[int, Edge] = {}
# Class id -> class ids taken while holding it.
_successors: dict[int, list[int]] = {}
# Pairs of class ids already reported (the value: whichever report claimed it).
_reported: dict[tuple[int, int], object] = {}
# (pid, inversions reported by that pid): a forked child counts from zero.
_inversions: list[int] = [os.getpid(), 0]
_checking = True


class _ThreadHeld(threading.local):
    """This thread's held-lock stack for the pure-Python lock: (id, class id)
    of each outermost hold, in order. A forked child keeps the forking
    thread's (the locks it still holds); other threads' go with them."""

    def __init__(self) -> None:
        self.locks: list[tuple[int, int]] = []
        self.reporting = False


held = _ThreadHeld()


def class_of(name: str) -> int:
    """The lock class of locks named ``name``."""
    found = _class_ids.get(name)
    if found is None:
        found = _class_ids.setdefault(name, next(_next_class))
        _class_names[found] = name
    return found


def edge_key(held_class: int, acquired_class: int) -> int:
    return (held_class << _CLASS_BITS) | acquired_class


def is_checking() -> bool:
    return _checking


def set_checking(on: bool) -> None:
    """Turn the checker on or off (``lock_order=check|off``). Holds taken
    while it was on are still taken off their thread's stack on release."""
    global _checking
    _checking = on
    from h5watch.process import implementation

    core = implementation.compiled_core
    if core is not None:
        core.set_lock_order(edges, first_sighting, on)


def check(locks: list[tuple[int, int]], lock: OrderedLock) -> None:
    """About to take ``lock`` while holding ``locks`` (check_order in
    _lockcore.c): a first sighting of any of these edges is examined."""
    if not _checking:
        return
    acquired = lock._order_class
    for _ident, held_class in locks:
        if held_class == lock._order_seen_from or held_class == acquired:
            continue
        if edge_key(held_class, acquired) in edges:
            lock._order_seen_from = held_class
        else:
            first_sighting(held_class, lock)


def push(locks: list[tuple[int, int]], lock: OrderedLock) -> bool:
    """``lock`` is now this thread's (outermost hold): onto its stack, if
    checking (order_push in _lockcore.c). True if it went on."""
    if _checking and lock._order_class and len(locks) < MAX_HELD:
        locks.append((id(lock), lock._order_class))
        return True
    return False


def pop(locks: list[tuple[int, int]], lock: OrderedLock) -> None:
    """``lock``'s outermost hold ends: off this thread's stack (order_pop)."""
    ident = id(lock)
    for index in range(len(locks) - 1, -1, -1):
        if locks[index][0] == ident:
            del locks[index]
            return


def first_sighting(held_class: int, lock: OrderedLock) -> None:
    """An edge not in ``edges`` yet, on the thread that is about to take
    ``lock`` while holding a lock of class ``held_class``. Never raises
    (an ``Exception``) into the acquisition, never blocks."""
    state = held
    if state.reporting:
        return  # a lock taken while reporting (a watched logging lock)
    state.reporting = True
    try:
        _record(held_class, lock)
    except Exception:
        pass
    finally:
        state.reporting = False


def _record(held_class: int, lock: OrderedLock) -> None:
    # Here, not at import: traceback and tokenize would cost a program that
    # only makes WatchedLocks milliseconds at start (h5py loads them anyway).
    from h5watch.process.evidence import format_frames

    acquired_class = lock._order_class
    ident = threading.get_ident()
    # Not current_thread(): that would make a _DummyThread of a thread
    # started outside threading.
    me = threading._active.get(ident)  # type: ignore[attr-defined]
    edge = Edge(
        held=_class_names.get(held_class, "?"),
        acquired=lock.name,
        thread_name=getattr(me, "name", None),
        thread_ident=ident,
        native_id=getattr(me, "native_id", None),
        pid=os.getpid(),
        seen_unix=time.time(),
        stack=format_frames(sys._getframe()),
    )
    if edges.setdefault(edge_key(held_class, acquired_class), edge) is not edge:
        return  # another thread saw it first
    _successors.setdefault(held_class, []).append(acquired_class)
    path = _path(acquired_class, held_class)
    if path is None:
        return
    pair = (min(held_class, acquired_class), max(held_class, acquired_class))
    claim = object()
    if _reported.setdefault(pair, claim) is not claim:
        return
    earlier = [edges[edge_key(a, b)] for a, b in itertools.pairwise(path)]
    _report(edge, earlier)


def _path(start: int, goal: int) -> list[int] | None:
    """Class ids from ``start`` to ``goal`` along recorded edges, or None."""
    came_from: dict[int, int] = {start: start}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        if node == goal:
            path = [node]
            while node != start:
                node = came_from[node]
                path.append(node)
            return path[::-1]
        for successor in list(_successors.get(node, ())):
            if successor not in came_from:
                came_from[successor] = node
                queue.append(successor)
    return None


def _report(edge: Edge, earlier: list[Edge]) -> None:
    pid = os.getpid()
    if _inversions[0] != pid:
        _inversions[:] = [pid, 0]
    _inversions[1] += 1
    cycle = [*earlier, edge]
    if len(earlier) == 1:
        before = earlier[0]
        message = (
            f"thread {edge.thread_name!r} takes {edge.acquired!r} while holding {edge.held!r}, and thread "
            f"{before.thread_name!r} took {before.acquired!r} while holding {before.held!r}: two threads doing "
            "so at the same time deadlock"
        )
    else:
        order = " -> ".join([c.held for c in cycle] + [cycle[0].held])
        message = (
            f"thread {edge.thread_name!r} takes {edge.acquired!r} while holding {edge.held!r}, closing the lock "
            f"order cycle {order}: threads following it at the same time deadlock"
        )
    _log.warning(
        "lock.order_inversion",
        locks=[c.held for c in cycle],
        message=message,
        cycle=[_edge_fields(c) for c in cycle],
    )


def _edge_fields(edge: Edge) -> dict[str, Any]:
    return {
        "held": edge.held,
        "acquired": edge.acquired,
        "thread_name": edge.thread_name,
        "thread_ident": edge.thread_ident,
        "native_id": edge.native_id,
        "pid": edge.pid,
        "seen_unix": edge.seen_unix,
        "stack": edge.stack,
    }


def inversions() -> int:
    """Lock-order inversions this process reported (a forked child counts
    from zero)."""
    return _inversions[1] if _inversions[0] == os.getpid() else 0


def snapshot() -> dict[str, Any]:
    """``snapshot()["lock_order"]``: whether the checker is on, how many
    inversions this process reported, and how many edges it knows."""
    return {"checking": _checking, "inversions": inversions(), "edges": len(edges)}
