"""The registry of live watched locks: every live lock found, collected ones gone, memory bounded."""

from __future__ import annotations

import gc

from h5watch.process import lock as lock_module
from h5watch.process.lock import watched_locks


def test_every_live_lock_is_found_in_creation_order_and_collected_ones_disappear(lock_class):
    locks = [lock_class(f"registry.{i}") for i in range(3000)]
    mine = [found for found in watched_locks() if found.name.startswith("registry.")]
    assert mine == locks
    del mine, locks[::2]
    gc.collect()
    mine = [found for found in watched_locks() if found.name.startswith("registry.")]
    assert [found.name for found in mine] == [f"registry.{i}" for i in range(1, 3000, 2)]
    del locks, mine
    gc.collect()
    assert not [found for found in watched_locks() if found.name.startswith("registry.")]


def test_short_lived_locks_do_not_pile_up(lock_class):
    keep = [lock_class(f"kept.{i}") for i in range(100)]
    for i in range(10_000):
        lock_class(f"churn.{i}")
    gc.collect()
    # Bounded by the locks alive at a time (garbage included), not by the 10,000 made.
    assert len(lock_module._registry) < 2_000
    assert [found for found in watched_locks() if found.name.startswith("kept.")] == keep


def test_phil_is_listed_first_whenever_it_was_made(lock_class):
    before = lock_class("registry.before")
    phil = lock_class(lock_module.PHIL_NAME)
    after = lock_class("registry.after")
    names = [found.name for found in watched_locks()]
    assert names[0] == lock_module.PHIL_NAME
    mine = [found for found in watched_locks() if found in (before, phil, after)]
    assert mine == [phil, before, after]
