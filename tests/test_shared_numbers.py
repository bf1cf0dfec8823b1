"""Every number the compiled core shares with the Python side agrees with
``h5watch.schema`` (and h5py's FastRLock layout with ``probe``'s), and a
core that disagrees is refused rather than trusted."""

from __future__ import annotations

import ctypes

import h5py._objects
import pytest
from conftest import run_python

from h5watch import schema
from h5watch.process import implementation, probe
from h5watch.process.lock import CompiledWatchedLock, PythonWatchedLock

core = implementation.compiled_core
needs_core = pytest.mark.skipif(core is None, reason="the compiled core is not built here")


@needs_core
def test_compiled_core_declares_the_schema_numbers():
    assert implementation.shared_numbers_of(core) == implementation.shared_numbers()
    assert tuple(core.BOUNDS_NS) == schema.BUCKET_BOUNDS_NS
    assert core.DEAD_OWNER == schema.DEAD_OWNER
    assert tuple(core.COUNTER_LAYOUT) == schema.COUNTER_LAYOUT
    assert tuple(core.OPERATION_LAYOUT) == schema.OPERATION_LAYOUT


@needs_core
def test_compiled_fastrlock_struct_is_the_probe_structure():
    assert tuple(core.FASTRLOCK_LAYOUT) == probe.fastrlock_layout()


def test_probe_structure_fits_this_h5py():
    lock_type = type(h5py._objects.phil)
    if lock_type.__name__ != "FastRLock":
        pytest.skip(f"phil is a {lock_type.__name__} on this h5py")
    assert lock_type.__basicsize__ == ctypes.sizeof(probe.FastRLockFields)
    probe.validate_layout(lock_type)  # raises ProbeUnavailable on a mismatch
    specimen = lock_type()
    seen = probe.FastRLockProbe(specimen)
    with specimen:
        with specimen:
            held = seen.read()
    assert held["count"] == 2 and held["owner_ident"] is not None
    assert seen.read() == {"owner_ident": None, "count": 0, "pending_requests": 0, "is_locked": False}


@pytest.mark.parametrize("lock_type", [PythonWatchedLock, CompiledWatchedLock], ids=["python", "compiled"])
def test_dead_owner_reads_back_on_both_implementations(lock_type):
    if lock_type is None:
        pytest.skip("the compiled core is not built here")
    lock = lock_type("dead-owner")
    lock.acquire()
    lock._mark_orphaned({"lock": "dead-owner"})
    assert lock._owner == schema.DEAD_OWNER
    assert lock._orphan_evidence() == {"lock": "dead-owner"}
    assert not lock._is_owned()


def test_a_core_that_disagrees_is_refused():
    """A stale build (another version's numbers) must not be loaded."""
    code = """
import sys, types
stale = types.ModuleType("h5watch.process._lockcore")
from h5watch import schema
stale.COUNTER_LAYOUT = schema.COUNTER_LAYOUT
stale.BOUNDS_NS = schema.BUCKET_BOUNDS_NS[:-1] + (90_000_000_000,)
stale.DEAD_OWNER = schema.DEAD_OWNER
sys.modules["h5watch.process._lockcore"] = stale
from h5watch.process import implementation
print(implementation.NAME, implementation.EXTENSION_MISSING, "|", implementation.REASON)
"""
    result = run_python(code, env={"H5WATCH_IMPLEMENTATION": ""})
    assert result.returncode == 0, result.stderr
    name, missing, reason = result.stdout.replace("|", " | ").split(None, 2)
    assert (name, missing) == ("python", "True"), result.stdout
    assert "another version of h5watch" in reason
