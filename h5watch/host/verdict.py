"""One verdict on a live process, for the daemon and ``h5watch status`` alike.

:func:`judge` reads one state file as of ``now`` against the
:class:`Thresholds` (``--stuck-after``, ``--kill-after``) and says ``ok`` or
``stuck``, why, and which lock to blame; the daemon's
``h5watch_processes{state}``, its kills and their ``reason`` label, and the
table of ``h5watch status`` all come from it. A process that set its own
``hold_timeout`` or ``wait_timeout`` (its state file says so) is stuck once
a hold or a wait outlives that, if it is lower than ``--stuck-after``; kills
wait for ``--kill-after`` alone. At each threshold the reason is the first
that applies:

1. ``orphaned_lock``: a lock whose holder thread is gone (the process forked
   without it) has waiters, and its hold or its oldest wait is older;
2. ``hold`` or ``wait``: a lock's hold is older (``hold``: its waiters wait
   for it, however long they have waited), else its oldest wait is
   (``wait``); of several locks, the oldest such age names the reason;
3. ``heartbeat``: the watchdog runs but has not beaten for longer (and for
   at least 3 ticks). A process whose watchdog is not running has no
   heartbeat: it is judged by its records alone, its holds as of its last
   write.

A process marked exited is not judged (its last threads may still be in its
file until it is gone), nor one that exec'd a program without h5watch
(:func:`judge_live`: its file is as it left it).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple, overload

from h5watch.errors import UsageError
from h5watch.host import reaper
from h5watch.statefile import ProcessState

__all__ = [
    "DEFAULT_STUCK_AFTER",
    "KILL_REASONS",
    "OK",
    "Culprit",
    "Finding",
    "Reason",
    "Thresholds",
    "Verdict",
    "judge",
    "judge_live",
    "lock_age_seconds",
    "lock_is_stuck",
    "parse_seconds",
]

Reason = Literal["orphaned_lock", "wait", "hold", "heartbeat"]
# The values of h5watch_worker_kills_total's reason label.
KILL_REASONS: tuple[Reason, ...] = ("orphaned_lock", "wait", "hold", "heartbeat")
DEFAULT_STUCK_AFTER = 30.0
# The watchdog's tick when the file does not say (as the writer's default).
_DEFAULT_TICK = 0.5


@overload
def parse_seconds(flag: str, text: str | None, allow_none: Literal[False] = False) -> float: ...
@overload
def parse_seconds(flag: str, text: str | None, allow_none: bool) -> float | None: ...
def parse_seconds(flag: str, text: str | None, allow_none: bool = False) -> float | None:
    """A command's seconds option: > 0, or :class:`UsageError` naming ``flag``."""
    if text is None and allow_none:
        return None
    try:
        value = float(text)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{flag}: expected a number of seconds > 0, got {text!r}") from None
    if not 0 < value < 1e9:
        raise UsageError(f"{flag}: expected a number of seconds > 0, got {text!r}")
    return value


@dataclass(frozen=True)
class Thresholds:
    """When a process counts as stuck, and when a daemon kills it (None: never)."""

    stuck_after: float = DEFAULT_STUCK_AFTER
    kill_after: float | None = None

    @classmethod
    def parse(cls, stuck_after: str | None, kill_after: str | None) -> Thresholds:
        """From ``--stuck-after`` and ``--kill-after`` as given (None: not
        given); ``stuck_after`` defaults to ``kill_after``, else 30 s."""
        kill = parse_seconds("--kill-after", kill_after, allow_none=True)
        stuck = parse_seconds("--stuck-after", stuck_after, allow_none=True)
        return cls(stuck or kill or DEFAULT_STUCK_AFTER, kill)

    @property
    def lowest(self) -> float:
        return self.stuck_after if self.kill_after is None else min(self.stuck_after, self.kill_after)

    def to_json(self) -> dict[str, float | None]:
        return {"stuck_after": self.stuck_after, "kill_after": self.kill_after}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Thresholds | None:
        """Thresholds as :meth:`to_json` wrote them; None unless well formed."""
        stuck, kill = data.get("stuck_after"), data.get("kill_after")
        if not isinstance(stuck, (int, float)) or not _valid_seconds(stuck) or not (kill is None or _valid_seconds(kill)):
            return None
        return cls(float(stuck), None if kill is None else float(kill))

    def stuck_limits(self, state: ProcessState) -> tuple[float, float]:
        """(hold, wait) ages past which ``state``'s process is stuck: the
        lower of ``stuck_after`` and its own ``hold_timeout``/``wait_timeout``."""
        return min(self.stuck_after, state.hold_timeout or self.stuck_after), min(self.stuck_after, state.wait_timeout or self.stuck_after)


def _valid_seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e9


class Culprit(NamedTuple):
    """The lock a finding blames, as the state file showed it (the holder
    and the waiters as plain data: they go to logs and JSON as they are)."""

    lock: str
    orphaned: bool
    holder: dict[str, Any] | None
    waiting_threads: list[dict[str, Any]]
    oldest_wait_seconds: float

    @classmethod
    def of(cls, lock: dict[str, Any]) -> Culprit:
        return cls(lock["lock"], lock["orphaned"], lock["holder"], lock["waiting_threads"], lock["oldest_wait_seconds"])


class Finding(NamedTuple):
    """Why a process is past one threshold; ``culprit`` is None for a stale
    heartbeat with no lock held or waited for."""

    reason: Reason
    age_seconds: float
    culprit: Culprit | None


@dataclass(frozen=True)
class Verdict:
    """``stuck``: the finding at ``stuck_after`` (None: ok); ``kill``: the
    finding at ``kill_after`` (None: no kill is due, or no ``kill_after``)."""

    stuck: Finding | None = None
    kill: Finding | None = None
    # Why the process is stopped or traced now (None: it runs on its own).
    stopped: str | None = None

    @property
    def state(self) -> Literal["ok", "stuck", "stopped"]:
        if self.stopped is not None:
            return "stopped"
        return "ok" if self.stuck is None else "stuck"

    @property
    def reason(self) -> Reason | None:
        return None if self.stuck is None else self.stuck.reason

    @property
    def culprit_lock(self) -> str | None:
        return None if self.stuck is None or self.stuck.culprit is None else self.stuck.culprit.lock

    @property
    def kill_reason(self) -> Reason | None:
        return None if self.kill is None else self.kill.reason


OK = Verdict()


def lock_is_stuck(state: ProcessState, lock: dict[str, Any], thresholds: Thresholds) -> bool:
    """Whether one lock of ``state`` (one of its :meth:`ProcessState.locks`)
    is past what makes its process stuck."""
    hold_limit, wait_limit = thresholds.stuck_limits(state)
    return _hold_age(lock) > hold_limit or _wait_age(lock) > wait_limit


def lock_age_seconds(lock: dict[str, Any]) -> float:
    """What a lock (one of :meth:`ProcessState.locks`) counts against the
    thresholds: the older of its hold and its oldest wait."""
    return max(_hold_age(lock), _wait_age(lock))


def judge(state: ProcessState, now: float, thresholds: Thresholds, *, oldest_age_seconds: float | None = None) -> Verdict:
    """The verdict on ``state`` at ``now`` (unix seconds), from the file alone.

    ``oldest_age_seconds``: the process's oldest hold or wait when the caller
    already has it (the daemon computes every process's in one pass): a
    process whose oldest is within the lowest threshold and whose heartbeat
    is fresh is ``ok`` without looking at its locks one by one."""
    if int(state.header["exited"]):
        return OK
    hold_limit, wait_limit = thresholds.stuck_limits(state)
    if (oldest_age_seconds is not None and oldest_age_seconds <= min(thresholds.lowest, hold_limit, wait_limit)
            and not _beat_stale(state, now, thresholds.lowest)):
        return OK
    locks = state.locks(now)
    stuck = _finding(state, locks, now, thresholds.stuck_after, hold_limit, wait_limit)
    kill_after = thresholds.kill_after
    kill = None if kill_after is None else _finding(state, locks, now, kill_after, kill_after, kill_after)
    return OK if stuck is None and kill is None else Verdict(stuck, kill)


def judge_live(state: ProcessState, now: float, thresholds: Thresholds, *, oldest_age_seconds: float | None = None,
               state_letter: str | None = None) -> Verdict:
    """:func:`judge` for a process that is still there: one that exec'd a
    program without h5watch is not judged (its file stays as it left it);
    one stopped or traced says so (``state_letter``: its ``/proc/<pid>/stat``
    state when the caller has just read it; its tracer is looked for only
    when its file makes it stuck or due for a kill)."""
    verdict = judge(state, now, thresholds, oldest_age_seconds=oldest_age_seconds)
    if verdict is not OK and reaper.execd_away(state):
        return OK
    stopped = reaper.stopped_how(state.pid, state_letter, look_for_tracer=verdict is not OK)
    return verdict if stopped is None else replace(verdict, stopped=stopped)


def _finding(state: ProcessState, locks: list[dict[str, Any]], now: float, beat_limit: float, hold_limit: float,
             wait_limit: float) -> Finding | None:
    for lock in locks:
        age = lock_age_seconds(lock)
        if lock["orphaned"] and lock["waiters"] and age > min(hold_limit, wait_limit):
            return Finding("orphaned_lock", age, Culprit.of(lock))
    older: list[Finding] = []
    for lock in locks:
        hold, wait = _hold_age(lock), _wait_age(lock)
        if hold > hold_limit:
            older.append(Finding("hold", hold, Culprit.of(lock)))
        elif wait > wait_limit:
            older.append(Finding("wait", wait, Culprit.of(lock)))
    if older:
        return max(older, key=lambda finding: (finding.age_seconds, finding.reason == "hold"))
    if _beat_stale(state, now, beat_limit):
        held = [lock for lock in locks if lock["holder"] or lock["waiters"]]
        return Finding("heartbeat", now - state.heartbeat_unix, Culprit.of(held[0]) if held else None)
    return None


def _beat_stale(state: ProcessState, now: float, limit: float) -> bool:
    """Only a running watchdog beats, once a tick."""
    tick = float(state.header["tick_interval"]) or _DEFAULT_TICK
    return state.watchdog_running and now - state.heartbeat_unix > max(limit, 3 * tick)


def _hold_age(lock: dict[str, Any]) -> float:
    holder = lock["holder"]
    return float(holder["hold_age_seconds"] or 0.0) if holder else 0.0


def _wait_age(lock: dict[str, Any]) -> float:
    return float(lock["oldest_wait_seconds"]) if lock["waiters"] else 0.0
