"""The record types behave as typing.NamedTuple's would (they are built
without its per-field checks, which cost every process start-up)."""

from __future__ import annotations

import pickle
import typing

import pytest

from h5watch.records import Holder, OperationRecord, ProcessStatus, Record


def test_a_record_is_the_named_tuple_typing_would_make():
    class Typed(typing.NamedTuple):
        watchdog_running: bool
        fork_since_ns: int | None
        deadlocks: tuple[int, ...] = (0, 0, 0, 0)
        order_inversions: int = 0
        threads_in_deadlock: int = 0

    ours = ProcessStatus(True, None, order_inversions=3)
    theirs = Typed(True, None, order_inversions=3)
    assert tuple(ours) == tuple(theirs)
    assert ProcessStatus._fields == Typed._fields
    assert ProcessStatus._field_defaults == Typed._field_defaults
    assert ours._asdict() == theirs._asdict()
    assert ours._replace(threads_in_deadlock=2).threads_in_deadlock == 2
    assert isinstance(ours, tuple)
    assert ProcessStatus.__module__ == "h5watch.records"
    assert ProcessStatus.__qualname__ == "ProcessStatus"
    assert set(ProcessStatus.__annotations__) == set(ProcessStatus._fields)
    assert typing.get_type_hints(Holder)["pid"] == int | None
    assert pickle.loads(pickle.dumps(ours)) == ours
    with pytest.raises(TypeError):
        ProcessStatus(True)


def test_a_records_methods_and_doc_are_kept():
    one = OperationRecord("phil", "read", 1, 10, 10, 5, 1, 2)
    two = one.plus(one)
    assert (two.holds, two.hold_sum_ns, two.hold_max_ns, two.caused_wait_sum_ns) == (2, 20, 10, 10)
    assert one.to_plain()["hold_seconds"] == 10 / 1e9
    assert "contention by operation" in (OperationRecord.__doc__ or "")


def test_a_field_without_a_default_after_one_with_a_default_is_refused():
    with pytest.raises(TypeError, match="follows one with a default"):

        class Bad(Record):
            first: int = 0
            second: int
