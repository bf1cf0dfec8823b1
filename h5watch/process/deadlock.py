"""Deadlocks, found in a wait-for graph built on every watchdog tick.

Nodes are this process's threads; an edge says "thread A waits for X, held
by thread B". The sources, all read without taking any lock the program
uses:

- every ``WatchedLock``: its holder and the threads in its waiters;
- h5py's real ``phil`` through the probe: its true owner, and its pending
  requests. A thread waiting for ``phil`` at C level (Cython's
  ``ObjectID.__dealloc__``, not through the wrapper) is not among the
  wrapper's waiters; it is found by elimination (more requests pending than
  the wrapper accounts for) and by what it is doing: a garbage collection in
  progress on it (``gc_activity.GcActivity``);
- Python's per-module import locks: the owner of each ``_ModuleLock`` and
  the threads blocked on one (``importlib._bootstrap._blocking_on``);
- a holder that is itself blocked in a non-lock wait (``Event``,
  ``Condition``, ``Queue``, ``Future``), read from its innermost frames.

Every thread blocks on one thing at a time, so each thread has at most one
edge and a cycle is found by following edges. An edge read from a non-lock
wait is *inferred*: it is drawn from a holder to a thread that waits
(directly or through others) for what the holder has, when that thread is
in garbage collection waiting for ``phil`` (``gc_under_phil``) or holds a
reference to what the holder waits on (``holder_waits_on_waiter``); such a
cycle is reported only when every other edge is certain, and says which
edge is inferred.

A cycle is reported once, when the same one (the same threads waiting for
the same things since the same moments) is seen on two ticks in a row, so
within two ticks of forming; a reading taken while the program moves on
never is. All of this runs on the watchdog's thread, never on a lock's
hot path; a tick with no thread waiting for anything reads a few fields.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from types import FrameType
from typing import TYPE_CHECKING, Any, Protocol

from h5watch import logs
from h5watch.process.evidence import format_frames, holder_operation
from h5watch.process.lock import DeadlockError, WatchedLock, interrupt_wait, thread_identity, thread_label, watched_locks
from h5watch.records import Record
from h5watch.schema import DEADLOCK_KINDS

if TYPE_CHECKING:
    from h5watch.process.flight import Recorder
    from h5watch.process.gc_activity import GcActivity

__all__ = ["DEADLOCK_KINDS", "DeadlockDetector", "RealPhil"]

_log = logs.get_logger(logger="h5watch.watchdog")


# How a thread in garbage collection waits for phil (an Edge's ``how``).
IN_GC = "garbage collection (an h5py object's deallocation takes phil at C level)"
_THREADING_FILE = threading.__file__
_QUEUE_SUFFIX = os.sep + "queue.py"
_FUTURES_SUFFIX = os.sep + os.path.join("concurrent", "futures", "_base.py")


if TYPE_CHECKING:  # interfaces for the type checker only: each Protocol class made costs start-up about 0.05 ms
    class RealPhil(Protocol):
        """h5py's ``phil`` as the detector reads it (``h5py_hook.PhilPatch``)."""

        @property
        def watched(self) -> WatchedLock | None: ...

        def real_state(self, lock: WatchedLock) -> dict[str, Any] | None: ...


class Edge(Record):
    """Thread ``waiter`` waits for ``target`` (``resource`` names it for
    comparison), held by thread ``owner``."""

    waiter: int
    target: str
    resource: str
    owner: int
    how: str
    since_ns: int
    certain: bool
    # The watched lock waited for in its acquire (the wait on_deadlock=raise can interrupt).
    lock: WatchedLock | None = None


class Held(Record):
    name: str
    since_ns: int | None
    operation: str | None


class NonLockWait(Record):
    how: str
    waited: tuple[Any, ...]
    frame_id: int


class Cycle(Record):
    kind: str
    edges: tuple[Edge, ...]

    def signature(self) -> frozenset[tuple[int, str, int, int]]:
        return frozenset((e.waiter, e.resource, e.owner, e.since_ns) for e in self.edges)

    def key(self) -> frozenset[tuple[int, str]]:
        return frozenset((e.waiter, e.resource) for e in self.edges)


def _frames_of_other_threads() -> dict[int, FrameType]:
    """Every thread's current frame but this one's. This thread's frame
    would hold (in its locals) the dict that holds it: a reference cycle,
    garbage only a collection frees, made at every tick that reads stacks,
    so that a program blocked behind a lock (allocating nothing) would see
    the watchdog's thread run the next collection, which the watchdog
    must not do (see ``watchdog.GC_HEADROOM``)."""
    frames = sys._current_frames()
    frames.pop(threading.get_ident(), None)
    return frames


class DeadlockDetector:
    """Builds the graph each tick (``check``), reports each cycle once and
    acts on it by ``on_deadlock``; counts reports by kind."""

    def __init__(self, real_phil: RealPhil | None, gc_activity: GcActivity, recorder: Recorder | None = None) -> None:
        self._real_phil = real_phil
        self._gc = gc_activity
        self._recorder = recorder
        self._seen_last_tick: set[frozenset[tuple[int, str, int, int]]] = set()
        self._reported: set[frozenset[tuple[int, str]]] = set()
        # When a wait the source does not date was first seen: {(thread, resource): ns}.
        self._first_seen: dict[tuple[int, str], int] = {}
        self.counts: dict[str, int] = dict.fromkeys(DEADLOCK_KINDS, 0)
        # Threads in a reported deadlock that is still there (as of the last tick).
        self.threads_in_deadlock = 0

    def after_fork_in_child(self) -> None:
        self._seen_last_tick.clear()
        self._reported.clear()
        self._first_seen.clear()
        self.counts = dict.fromkeys(DEADLOCK_KINDS, 0)
        self.threads_in_deadlock = 0

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)

    # -- the tick --------------------------------------------------------

    def check(self, options: Any, on_kill: Any) -> None:
        """One tick: find the cycles, report the ones seen on the previous
        tick too and not reported yet. ``on_kill`` runs before a kill's exit."""
        now_ns = time.monotonic_ns()
        waits: dict[int, Edge] = {}
        holds: dict[int, list[Held]] = {}
        undated: set[tuple[int, str]] = set()
        self._lock_waits(waits, holds)
        self._phil_waits_at_c_level(waits)
        self._import_waits(waits, holds, now_ns, undated)
        if not waits:
            self._seen_last_tick.clear()
            self._reported.clear()
            self._first_seen.clear()
            self.threads_in_deadlock = 0
            return
        frames: dict[int, FrameType] = {}
        cycles = _certain_cycles(waits)
        cycles += self._cycles_through_non_lock_waits(waits, frames, now_ns, undated)
        self._first_seen = {key: ns for key, ns in self._first_seen.items() if key in undated}
        seen = {cycle.signature() for cycle in cycles}
        keys = {cycle.key() for cycle in cycles}
        self._reported &= keys
        for cycle in cycles:
            if cycle.signature() in self._seen_last_tick and cycle.key() not in self._reported:
                self._reported.add(cycle.key())
                self._report(cycle, holds, frames or _frames_of_other_threads(), options, on_kill, now_ns)
        self._seen_last_tick = seen
        self.threads_in_deadlock = len({edge.waiter for cycle in cycles if cycle.key() in self._reported
                                        for edge in cycle.edges})

    # -- sources ---------------------------------------------------------

    def _lock_waits(self, waits: dict[int, Edge], holds: dict[int, list[Held]]) -> None:
        phil = self._real_phil.watched if self._real_phil is not None else None
        for lock in watched_locks():
            owner = lock._owner
            if lock is phil and self._real_phil is not None:
                real = self._real_phil.real_state(lock)
                if real is not None:
                    owner = real["owner_ident"]  # the truth, holds at C level included
            if owner is None:
                continue
            since_ns = lock._since_ns if owner == lock._owner else None
            operation = lock._operation if owner == lock._owner else None
            holds.setdefault(owner, []).append(Held(_lock_title(lock), since_ns, operation))
            for ident, wait_since_ns in lock._wait_starts():
                if ident != owner:
                    waits[ident] = Edge(ident, _lock_title(lock), f"lock:{lock._seq}", owner, "acquire",
                                        wait_since_ns, True, lock)

    def _phil_waits_at_c_level(self, waits: dict[int, Edge]) -> None:
        """A thread in garbage collection while more requests for the real
        ``phil`` are pending than the wrapper's waiters account for: that
        thread waits for ``phil`` at C level (an h5py object's deallocation)."""
        collecting = self._gc.collecting()
        if collecting is None or self._real_phil is None:
            return
        phil = self._real_phil.watched
        if phil is None:
            return
        real = self._real_phil.real_state(phil)
        if real is None:
            return
        owner = real["owner_ident"]
        ident, since_ns = collecting
        if owner is None or owner == ident or ident in waits:
            return
        through_wrapper = len(phil._waiters)
        if real["pending_requests"] <= through_wrapper:
            return
        waits[ident] = Edge(ident, _lock_title(phil), f"lock:{phil._seq}", owner, IN_GC, since_ns, True)

    def _import_waits(self, waits: dict[int, Edge], holds: dict[int, list[Held]], now_ns: int,
                      undated: set[tuple[int, str]]) -> None:
        for ident, module_lock in _blocked_on_import_locks():
            owner = getattr(module_lock, "owner", None)
            name = getattr(module_lock, "name", "?")
            if not isinstance(owner, int) or owner == ident or ident in waits:
                continue
            resource = f"import:{name}"
            since_ns = self._first_seen.setdefault((ident, resource), now_ns)
            undated.add((ident, resource))
            title = f"the import lock of module {name!r}"
            waits[ident] = Edge(ident, title, resource, owner, "import", since_ns, True)
            if all(held.name != title for held in holds.get(owner, [])):
                holds.setdefault(owner, []).append(Held(title, None, f"import {name}"))

    def _cycles_through_non_lock_waits(self, waits: dict[int, Edge], frames: dict[int, FrameType], now_ns: int,
                                       undated: set[tuple[int, str]]) -> list[Cycle]:
        """A holder blocked in a non-lock wait, and a thread that waits
        (directly or through others) for what it holds: an inferred edge
        from the holder to that thread, when something ties the two."""
        cycles: list[Cycle] = []
        holders = {edge.owner for edge in waits.values() if edge.owner not in waits}
        if not holders:
            return cycles
        frames.update(_frames_of_other_threads())
        for holder in holders:
            wait = _non_lock_wait(frames.get(holder))
            if wait is None:
                continue
            behind = _waiting_behind(holder, waits)
            chosen: Edge | None = None
            kind = "holder_waits_on_waiter"
            for edge in behind:
                if edge.how == IN_GC:
                    chosen, kind = edge, "gc_under_phil"
                    break
            if chosen is None:
                for edge in behind:
                    if _refers_to(frames.get(edge.waiter), wait.waited):
                        chosen = edge
                        break
            if chosen is None:
                continue
            resource = f"wait:{wait.frame_id}"
            since_ns = self._first_seen.setdefault((holder, resource), now_ns)
            undated.add((holder, resource))
            inferred = Edge(holder, f"thread {thread_label(chosen.waiter)!r}", resource, chosen.waiter, wait.how, since_ns, False)
            chain = [inferred]
            walker = chosen
            while True:
                chain.append(walker)
                if walker.owner == holder:
                    break
                walker = waits[walker.owner]
            cycles.append(Cycle(kind, tuple(chain)))
        return cycles

    # -- reporting ----------------------------------------------------------

    def _report(self, cycle: Cycle, holds: dict[int, list[Held]], frames: dict[int, FrameType], options: Any,
                on_kill: Any, now_ns: int) -> None:
        entries = _entries(cycle, holds, frames, now_ns)
        inferred = next((entry for entry, edge in zip(entries, cycle.edges) if not edge.certain), None)
        fields: dict[str, Any] = {
            "kind": cycle.kind,
            "summary": _summary(cycle, entries),
            "inferred": None if inferred is None else
            f"thread {inferred['thread_name']!r} waits for {inferred['waits_for']} ({inferred['waiting_in']}):"
            " read from its stack",
            "threads": len(entries),
            "cycle": entries,
        }
        if self._recorder is not None:
            for entry, edge in zip(entries, cycle.edges):
                self._recorder.record(
                    "deadlock", lock=edge.lock.name if edge.lock is not None else edge.target,
                    operation=f"{cycle.kind}: holds {entry['holds'] or 'nothing watched'}, waits in {entry['waiting_in']}",
                    duration_ns=int(entry["waiting_seconds"] * 1e9), extra=len(entries),
                    thread=(entry["native_id"], entry["thread_name"]))
            fields["recorder"] = self._recorder.tail()
        action = options.on_deadlock
        if action == "kill":
            code = options.kill_exit_code
            _log.critical("lock.deadlock", action="killed", exit_code=code, **fields)
            self._count(cycle)
            _log.critical("process.killed", reason="lock.deadlock", exit_code=code, kind=cycle.kind)
            on_kill()
            os._exit(code)
        if action == "raise":
            target = next((edge for edge in cycle.edges if edge.lock is not None), None)
            if target is not None:
                name = thread_label(target.waiter)
                error = DeadlockError(
                    f"thread {name!r} was interrupted in its wait for {target.target} to break a deadlock: "
                    + fields["summary"], {"event": "lock.deadlock", **fields})
                # Logged and counted before the waiter is woken: the program the
                # error unwinds may read its counts (or end) straight away.
                _log.critical("lock.deadlock", action="raised", interrupted_thread=name, **fields)
                self._count(cycle)
                interrupt_wait(target.waiter, target.since_ns, error)
                return
            fields["not_raised"] = "no thread of the cycle waits in a watched lock's acquire, where it could be interrupted"
        _log.critical("lock.deadlock", action="warn", **fields)
        self._count(cycle)

    def _count(self, cycle: Cycle) -> None:
        # Counted once its event is out: whoever sees the count (snapshot(),
        # the state file) can rely on the event having been logged.
        self.counts[cycle.kind] = self.counts.get(cycle.kind, 0) + 1


def _certain_cycles(waits: dict[int, Edge]) -> list[Cycle]:
    cycles: list[Cycle] = []
    done: set[int] = set()
    for start in waits:
        path: list[int] = []
        on_path: dict[int, int] = {}
        node: int | None = start
        while node is not None and node in waits and node not in done and node not in on_path:
            on_path[node] = len(path)
            path.append(node)
            node = waits[node].owner
        if node is not None and node in on_path:
            edges = tuple(waits[ident] for ident in path[on_path[node]:])
            if all(edge.certain for edge in edges):
                kind = "gc_under_phil" if any(e.how == IN_GC for e in edges) else (
                    "import_lock" if any(e.how == "import" for e in edges) else "lock_cycle")
                cycles.append(Cycle(kind, edges))
        done.update(path)
    return cycles


def _waiting_behind(holder: int, waits: dict[int, Edge]) -> list[Edge]:
    """The edges of threads whose chain of waits ends at ``holder``, nearest first."""
    behind: list[tuple[int, Edge]] = []
    for ident, edge in waits.items():
        steps, walker, seen = 0, edge, {ident}
        while walker.owner != holder:
            nxt = waits.get(walker.owner)
            if nxt is None or nxt.waiter in seen:
                break
            seen.add(nxt.waiter)
            walker, steps = nxt, steps + 1
        else:
            behind.append((steps, edge))
    behind.sort(key=lambda item: item[0])
    return [edge for _, edge in behind]


def _non_lock_wait(frame: FrameType | None) -> NonLockWait | None:
    """The non-lock wait a thread's innermost frames show it blocked in
    (``Condition.wait`` and what called it: ``Event.wait``, ``Queue.get``,
    ``Queue.put``, ``Future.result``), or None."""
    if frame is None or frame.f_code.co_filename != _THREADING_FILE or frame.f_code.co_name != "wait":
        return None
    condition = frame.f_locals.get("self")
    how, waited, anchor = "Condition.wait", [condition], frame
    outer = frame.f_back
    if outer is not None:
        code = outer.f_code
        owner = outer.f_locals.get("self")
        if code.co_filename == _THREADING_FILE and code.co_name == "wait":
            how, anchor = "Event.wait", outer
        elif code.co_filename.endswith(_QUEUE_SUFFIX) and code.co_name in ("get", "put"):
            how, anchor = f"Queue.{code.co_name}", outer
        elif code.co_filename.endswith(_FUTURES_SUFFIX) and code.co_name == "result":
            how, anchor = "Future.result", outer
        if anchor is outer:
            waited.append(owner)
    return NonLockWait(how, tuple(w for w in waited if w is not None), id(anchor))


def _refers_to(frame: FrameType | None, targets: tuple[Any, ...]) -> bool:
    """Whether a thread's frames hold one of ``targets`` in a local, in a
    local's attributes, or in a local container's items (one level)."""
    wanted = {id(target) for target in targets}
    while frame is not None:
        for value in list(frame.f_locals.values()):
            if id(value) in wanted:
                return True
            for inner in _one_level(value):
                if id(inner) in wanted:
                    return True
        frame = frame.f_back
    return False


def _one_level(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return list(value.values())
    if isinstance(value, (list, tuple, set, frozenset)):
        return list(value)[:100]
    attributes = getattr(value, "__dict__", None)
    return list(attributes.values()) if isinstance(attributes, dict) else []


def _blocked_on_import_locks() -> list[tuple[int, Any]]:
    """(thread ident, the ``_ModuleLock`` it waits for) for every thread
    blocked in an import. 3.10 and 3.11 map a thread to one lock; 3.12+
    to a list (a thread can be set to block on more than one while it
    re-enters the import system), in a weak-value dictionary whose plain
    ``data`` dict is read here (its ``get`` would tidy it up)."""
    bootstrap = sys.modules.get("_frozen_importlib")
    blocking_on = getattr(bootstrap, "_blocking_on", None)
    if isinstance(blocking_on, dict):  # 3.10, 3.11: {ident: _ModuleLock}
        return list(blocking_on.copy().items()) if blocking_on else []
    data = getattr(blocking_on, "data", None)  # 3.12+: {ident: weakref to a list of _ModuleLock}
    if not isinstance(data, dict) or not data:
        return []
    found: list[tuple[int, Any]] = []
    for ident, ref in data.copy().items():
        blocked = ref()
        try:
            found.append((ident, blocked[-1]))
        except (IndexError, TypeError):  # not blocked (any more), or the list is gone
            pass
    return found


def _lock_title(lock: WatchedLock) -> str:
    return f"lock {lock.name!r}"


def _entries(cycle: Cycle, holds: dict[int, list[Held]], frames: dict[int, FrameType], now_ns: int) -> list[dict[str, Any]]:
    entries = []
    wall_now = time.time()
    previous = cycle.edges[-1]
    for edge in cycle.edges:
        identity = thread_identity(edge.waiter)
        held = next((h for h in holds.get(edge.waiter, []) if h.name == previous.target), None)
        held_name = previous.target if previous.certain else None
        operation = held.operation if held is not None else None
        if operation is None:
            operation = holder_operation(edge.waiter)
        frame = frames.get(edge.waiter)
        entries.append({
            "thread_name": identity["thread_name"],
            "native_id": identity["native_id"],
            "thread_ident": edge.waiter,
            "holds": held_name if held_name is not None else ", ".join(h.name for h in holds.get(edge.waiter, [])) or None,
            "operation": operation,
            "held_since_unix": None if held is None or held.since_ns is None else wall_now - (now_ns - held.since_ns) / 1e9,
            "waits_for": edge.target,
            "waiting_in": edge.how,
            "waiting_seconds": max(0, now_ns - edge.since_ns) / 1e9,
            "certain": edge.certain,
            "stack": format_frames(frame) if frame is not None else None,
        })
        previous = edge
    return entries


def _summary(cycle: Cycle, entries: list[dict[str, Any]]) -> str:
    if cycle.kind == "gc_under_phil" and not cycle.edges[0].certain:
        holder, collector = entries[0], entries[1]
        operation = f" in {holder['operation']}" if holder["operation"] else ""
        rest = "" if len(entries) == 2 else f" (through {len(entries) - 2} other threads)"
        return (
            f"Deadlock: thread {holder['thread_name']!r} holds h5py's phil{operation} and waits"
            f" ({holder['waiting_in']}) for thread {collector['thread_name']!r}{rest}; {collector['thread_name']!r}"
            " is in garbage collection freeing an h5py object and waits for phil; neither can go on."
        )
    clauses = []
    for entry in entries:
        holds = f" holds {entry['holds']} and" if entry["holds"] else ""
        how = f" ({entry['waiting_in']})" if entry["waiting_in"] != "acquire" else ""
        clauses.append(f"thread {entry['thread_name']!r}{holds} waits{how} for {entry['waits_for']}")
    ending = "neither can go on" if len(clauses) == 2 else "none of them can go on"
    return "Deadlock: " + "; ".join(clauses) + f"; {ending}."
