"""Every number the two sides of h5watch share: histogram buckets, the
counter tables, and the layout of one lock's 64 counter words.

The in-process lock (both implementations), the state file and the
exporters all read these names from here; the compiled core declares its
own copy in C and exports it (``_lockcore.COUNTER_LAYOUT``, ``BOUNDS_NS``,
``DEAD_OWNER``): ``h5watch.process.implementation`` refuses a core whose
numbers differ, and a test fails if the two disagree. (h5py's FastRLock
layout is declared once, in ``h5watch.process.probe``, and checked against
the core's the same way.)

Buckets are fixed for every process and every version of the state file: a
log scale from 1 us to 60 s with a boundary at each alert threshold of
``deploy/prometheus`` (0.1 s, 1 s, 5 s, 10 s, 30 s).
"""

from __future__ import annotations

__all__ = [
    "BUCKET_BOUNDS_SECONDS",
    "BUCKET_BOUNDS_NS",
    "N_BUCKETS",
    "TIMEOUT_KINDS",
    "DEADLOCK_KINDS",
    "ORPHAN_ACTIONS",
    "N_COUNTERS",
    "COUNTERS_BYTES",
    "COUNTER_LAYOUT",
    "DEAD_OWNER",
    "counter_index",
    "OPERATION_SLOTS",
    "OPERATION_OTHER",
    "OPERATION_LAYOUT",
    "OPERATION_NAME_LAYOUT",
    "OPERATION_UNNAMED_ROW",
    "OPERATION_WORDS_BYTES",
    "OPERATION_NAME_ENTRY",
    "OPERATION_NAME_BYTES",
    "OPERATION_NAMED",
    "OPERATION_NAMES_BYTES",
    "N_OPERATION_WORDS",
    "RECORDER_ENTRIES",
    "RECORDER_THRESHOLD_SECONDS",
    "RECORDER_KINDS",
    "RECORDER_EXTRA",
    "RECORDER_VIEW_ENTRIES",
    "RECORDER_LOG_ENTRIES",
    "RECORDER_STATUS_ENTRIES",
]

BUCKET_BOUNDS_SECONDS: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6,
    1e-5, 2.5e-5, 5e-5,
    1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
)
BUCKET_BOUNDS_NS: tuple[int, ...] = tuple(round(b * 1e9) for b in BUCKET_BOUNDS_SECONDS)
# One bucket per bound plus the +Inf bucket; counts are per bucket, not cumulative.
N_BUCKETS = len(BUCKET_BOUNDS_NS) + 1

# What a lock reports as its owner once the holder did not survive a fork:
# thread idents are addresses, never -2 (written into FastRLock's _owner too).
DEAD_OWNER = -2

TIMEOUT_KINDS = ("wait", "hold", "fork")
# The kinds of deadlock the watchdog names (``lock.deadlock``'s ``kind``).
DEADLOCK_KINDS = ("lock_cycle", "gc_under_phil", "import_lock", "holder_waits_on_waiter")
ORPHAN_ACTIONS = ("killed", "recovered", "raised", "warned")


# One lock's counters, as 64 unsigned 64-bit words in this order: the same
# layout in the pure-Python LockStats, in the compiled core and in the state
# file, whose mapping holds them while the process runs.
C_ACQUISITIONS = 0
C_CONTENTIONS = 1
C_REENTRIES = 2
C_WAIT_BUCKETS = 3
C_WAIT_SUM = C_WAIT_BUCKETS + N_BUCKETS
C_WAIT_MAX = C_WAIT_SUM + 1
C_HOLD_BUCKETS = C_WAIT_MAX + 1
C_HOLD_SUM = C_HOLD_BUCKETS + N_BUCKETS
C_HOLD_MAX = C_HOLD_SUM + 1
C_TIMEOUTS = C_HOLD_MAX + 1
C_ORPHANS = C_TIMEOUTS + len(TIMEOUT_KINDS)
N_COUNTERS = C_ORPHANS + len(ORPHAN_ACTIONS)
COUNTERS_BYTES = N_COUNTERS * 8
COUNTER_LAYOUT = (N_BUCKETS, C_WAIT_BUCKETS, C_HOLD_BUCKETS, C_TIMEOUTS, C_ORPHANS, N_COUNTERS)
assert N_COUNTERS == 64


def counter_index(table: str, key: str) -> int:
    if table == "timeouts":
        return C_TIMEOUTS + TIMEOUT_KINDS.index(key)
    if table == "orphans":
        return C_ORPHANS + ORPHAN_ACTIONS.index(key)
    raise KeyError(table)


# Contention by operation: per lock, a table of OPERATION_SLOTS rows of
# N_OPERATION_WORDS unsigned 64-bit words, one row per operation that held the
# lock (h5py's function for phil, acquire_for's operation, else the lock's
# name). Row 0 counts every operation past the last row, exported as
# OPERATION_OTHER; row OPERATION_UNNAMED_ROW the unnamed one (the lock's own
# name); the table never grows.
OPERATION_SLOTS = 65
OPERATION_OTHER = "other"
O_HOLDS = 0            # outermost holds
O_HOLD_SUM = 1         # their total, ns
O_HOLD_MAX = 2         # the longest, ns
O_CAUSED_WAIT_SUM = 3  # what other threads waited while this operation held the lock, ns
O_WAITS = 4            # blocked waits of this operation itself
O_WAIT_SUM = 5         # their total, ns
N_OPERATION_WORDS = 6
OPERATION_LAYOUT = (OPERATION_SLOTS, N_OPERATION_WORDS, O_HOLDS, O_HOLD_SUM, O_HOLD_MAX, O_CAUSED_WAIT_SUM, O_WAITS, O_WAIT_SUM)
OPERATION_UNNAMED_ROW = 1
# In the state file (each lock's, see h5watch.statefile): the rows' words
# (OPERATION_WORDS_BYTES, next to the lock's counters), and a name entry per
# row (OPERATION_NAMES_BYTES; those of rows 0 and 1 are never written): a
# sequence word (0, 1 while being written, 2 once written; never written
# again), the kind (OPERATION_NAMED), 4 bytes of padding and
# OPERATION_NAME_BYTES of UTF-8 text.
OPERATION_WORDS_BYTES = OPERATION_SLOTS * N_OPERATION_WORDS * 8
OPERATION_NAME_ENTRY = 144
OPERATION_NAME_BYTES = 128
OPERATION_NAMED = 1
OPERATION_NAMES_BYTES = OPERATION_SLOTS * OPERATION_NAME_ENTRY
OPERATION_NAME_LAYOUT = (OPERATION_UNNAMED_ROW, OPERATION_NAME_ENTRY, OPERATION_NAME_BYTES, OPERATION_NAMED)

# The flight recorder (``h5watch.recorder``): a ring of this many entries in
# each process's state file, the newest overwriting the oldest.
RECORDER_ENTRIES = 256
# Holds, waits and garbage collections under phil shorter than this are not
# recorded (the ``recorder_threshold`` option's default, in seconds).
RECORDER_THRESHOLD_SECONDS = 0.005
# What an entry records, and what its extra number means for each kind.
RECORDER_KINDS = (
    "wait",            # a blocked wait for a watched lock, at least the threshold long
    "hold",            # a hold of a watched lock, at least the threshold long
    "fork",            # a fork's before-hook: its wait for the watched locks
    "forked",          # this process began, as a fork's child (the first entry of a child)
    "wait_timeout",    # a wait past wait_timeout
    "hold_timeout",    # a hold past hold_timeout
    "fork_timeout",    # a lock a fork could not take within fork_timeout
    "fork_stalled",    # a fork stuck in another before-fork hook
    "orphan",          # a lock held by a thread that did not survive the fork, and what was done
    "deadlock",        # one thread of a deadlock (lock.deadlock)
    "gc_under_phil",   # a garbage collection that ran while h5py's phil was held, at least the threshold long
)
RECORDER_EXTRA = {
    "wait": "waiters", "hold": "waiters", "fork": "locks_missing", "forked": "parent_pid",
    "wait_timeout": "waiters", "hold_timeout": "waiters", "fork_timeout": "waiters", "fork_stalled": "locks_held",
    "orphan": "parent_pid", "deadlock": "threads", "gc_under_phil": "generation",
}
# The newest entries an outside view (h5watch dump, an incident file) shows;
# a log event (an incident, a kill's evidence); h5watch status --json, per process.
RECORDER_VIEW_ENTRIES = 50
RECORDER_LOG_ENTRIES = 10
RECORDER_STATUS_ENTRIES = 5
assert set(RECORDER_EXTRA) == set(RECORDER_KINDS)
