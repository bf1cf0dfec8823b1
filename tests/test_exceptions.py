"""Exceptions through h5watch are exactly the ones without it.

Each failing (or succeeding) h5py call runs in a fresh interpreter three
ways: bare h5py, under ``h5watch.install()`` with the compiled ``with_phil``
wrapper, and with the pure-Python one. The outcome must be the same: the
exception's type, its message, the types along ``__context__`` and
``__cause__``, and the innermost frame of its traceback. (Python 3.10 once
saw ``OSError`` where h5py raises ``FileNotFoundError``, so
``h5py.File(new_path, "a")`` failed under h5watch.)

``WatchedLock.acquire`` likewise raises what ``threading.RLock.acquire``
raises for bad arguments, in the running Python's own words.
"""

from __future__ import annotations

import json
import math
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import run_python

from h5watch.process.lock import CompiledWatchedLock, PythonWatchedLock

pytestmark = pytest.mark.timeout(240)

# The child: prepares its working directory, runs one case, prints its outcome
# as one JSON line on stdout (h5watch logs on stderr).
CHILD = r'''
import json, sys

mode, case = sys.argv[1], sys.argv[2]
if mode != "bare":
    import h5watch
    h5watch.install(state_files=False)
import os
import h5py
import numpy as np

os.mkdir("adir")
with h5py.File("data.h5", "w") as f:
    f["values"] = np.arange(10.0)
    f.create_dataset("ints", (4,), dtype="i4")
    f.attrs["x"] = 1


def opened():
    return h5py.File("data.h5", "a")


def closed():
    f = opened()
    f.close()
    return f


def lowlevel_catch():
    try:
        h5py.h5f.open(b"missing.h5")
    except FileNotFoundError as exc:
        return f"caught {type(exc).__name__}"


def in_handler():
    f = opened()
    try:
        f["nope"]
    except KeyError:
        f.attrs["nope"]


def visit_raises():
    def callback(name):
        raise ValueError(f"stop at {name}") from KeyError("cause")

    opened().visit(callback)


def phil_released_behind_the_wrapper():
    @h5py._objects.with_phil
    def misbehaves():
        h5py._objects.phil.release()
        raise KeyError("original")

    misbehaves()


def append_new():
    with h5py.File("new.h5", "a") as f:
        f["v"] = [1, 2, 3]
    with h5py.File("new.h5", "r") as f:
        return f["v"][:].tolist()


CASES = {
    "open missing file r": lambda: h5py.File("missing.h5", "r"),
    "File(new, 'a') creates it": append_new,
    "File on a directory": lambda: h5py.File("adir", "r"),
    "File(existing, 'w-')": lambda: h5py.File("data.h5", "w-"),
    "missing dataset key": lambda: opened()["nope"],
    "create an existing dataset": lambda: opened().create_dataset("values", (3,), dtype="f8"),
    "create a group over a dataset": lambda: opened().create_group("values"),
    "write of a bad shape": lambda: opened()["values"].__setitem__(Ellipsis, np.zeros((3, 3))),
    "write of a bad dtype": lambda: opened()["ints"].__setitem__(0, "abc"),
    "read out of range": lambda: opened()["values"][500],
    "name of a bad type": lambda: opened().create_dataset(123, (3,), dtype="f8"),
    "missing attribute": lambda: opened().attrs["nope"],
    "closed file access": lambda: closed()["values"],
    "closed file attrs": lambda: closed().attrs["x"],
    "low-level open of a missing file": lambda: h5py.h5f.open(b"missing.h5"),
    "except FileNotFoundError around h5f.open": lowlevel_catch,
    "failure while handling another": in_handler,
    "callback raises through visit": visit_raises,
    "successful read": lambda: opened()["values"][2:4].tolist(),
    "phil released behind with_phil's back": phil_released_behind_the_wrapper,
}


def chain(exc, attribute):
    names = []
    seen = set()
    exc = getattr(exc, attribute)
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        names.append(f"{type(exc).__module__}.{type(exc).__qualname__}")
        exc = getattr(exc, attribute)
    return names


if case not in CASES:
    sys.exit(f"unknown case {case!r}")
with_phil = h5py._objects.with_phil
outcome = {
    "mode": mode,
    "instrumented": getattr(with_phil, "__h5watch__", False),
    "wrapper": type(h5py.h5f.open).__name__,
}
try:
    outcome["result"] = repr(CASES[case]())
except BaseException as exc:
    tb = exc.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    outcome.update(
        type=f"{type(exc).__module__}.{type(exc).__qualname__}",
        message=str(exc),
        context=chain(exc, "__context__"),
        cause=chain(exc, "__cause__"),
        suppress_context=exc.__suppress_context__,
        innermost=[tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name],
    )
print(json.dumps(outcome))
'''

CASES = [
    "open missing file r",
    "File(new, 'a') creates it",
    "File on a directory",
    "File(existing, 'w-')",
    "missing dataset key",
    "create an existing dataset",
    "create a group over a dataset",
    "write of a bad shape",
    "write of a bad dtype",
    "read out of range",
    "name of a bad type",
    "missing attribute",
    "closed file access",
    "closed file attrs",
    "low-level open of a missing file",
    "except FileNotFoundError around h5f.open",
    "failure while handling another",
    "callback raises through visit",
    "successful read",
    "phil released behind with_phil's back",
]

# mode -> H5WATCH_IMPLEMENTATION of the child ("" lets h5watch choose: compiled).
MODES = {"bare": "", "python": "python"}
if CompiledWatchedLock is not None:
    MODES["compiled"] = ""


def run_case(mode: str, case: str, workdir: Path) -> dict:
    """One case in a fresh interpreter, in its own empty directory (file names
    are relative, so messages naming them are the same for every mode)."""
    workdir.mkdir()
    result = run_python(CHILD, args=[mode, case], cwd=workdir, timeout=60,
                        env={"H5WATCH_IMPLEMENTATION": MODES[mode]})
    assert result.returncode == 0, f"{mode}: {result.stderr[-3000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


# Cases where the lock itself raises (the release of a lock this thread no longer
# holds): the innermost frame is then the lock's own code, h5watch's or FastRLock's.
RAISED_BY_THE_LOCK = {"phil released behind with_phil's back"}


def comparable(outcome: dict, case: str) -> dict:
    """What must agree between modes: the outcome without the mode's own keys.
    Some libhdf5 messages carry the wall-clock time, a buffer address and a
    file descriptor number; those parts may differ between any two runs."""
    own = ("mode", "instrumented", "wrapper", *(("innermost",) if case in RAISED_BY_THE_LOCK else ()))
    kept = {key: value for key, value in outcome.items() if key not in own}
    if "message" in kept:
        message = re.sub(r"time = [^,]*,", "time = <time>,", kept["message"])
        message = re.sub(r"0x[0-9a-fA-F]+", "0x<address>", message)
        kept["message"] = re.sub(r"file descriptor = \d+", "file descriptor = <fd>", message)
    return kept


@pytest.mark.parametrize("case", CASES)
def test_outcome_is_the_same_with_and_without_h5watch(case, tmp_path):
    with ThreadPoolExecutor(len(MODES)) as pool:
        futures = {mode: pool.submit(run_case, mode, case, tmp_path / mode) for mode in MODES}
        outcomes = {mode: future.result() for mode, future in futures.items()}
    assert outcomes["bare"]["instrumented"] is False
    for mode in MODES:
        if mode == "bare":
            continue
        assert outcomes[mode]["instrumented"] is True, outcomes[mode]
        assert (outcomes[mode]["wrapper"] == "PhilCall") is (mode == "compiled"), outcomes[mode]
        assert comparable(outcomes[mode], case) == comparable(outcomes["bare"], case), mode


def test_h5py_file_append_creates_a_new_file_under_h5watch(tmp_path):
    """The regression itself, spelled out: 3.10 raised FileNotFoundError here."""
    for mode in MODES:
        if mode != "bare":
            outcome = run_case(mode, "File(new, 'a') creates it", tmp_path / mode)
            assert outcome.get("result") == "[1, 2, 3]", outcome



# -- what h5py's functions say about themselves ---------------------------------

# Every function h5py decorates with with_phil, as introspection sees it
# (help(), inspect, documentation tools): h5watch's compiled wrapper reads
# these through to the function instead of copying them into each wrapper.
INTROSPECTION = r"""
import inspect, json, pydoc, sys

if sys.argv[1] != "bare":
    import h5watch
    h5watch.install(state_files=False)
import h5py
from h5py._hl import attrs, base, dataset, datatype, dims, files, filters, group, selections, vds

seen = {}
for module in (attrs, base, dataset, datatype, dims, files, filters, group, selections, vds):
    classes = [value for value in vars(module).values() if isinstance(value, type) and value.__module__ == module.__name__]
    for cls in [module, *classes]:
        for name, value in vars(cls).items():
            if isinstance(value, type):
                continue
            func = value.fget if isinstance(value, property) else value
            func = func.__func__ if isinstance(func, (classmethod, staticmethod)) else func
            if not hasattr(func, "__wrapped__"):
                continue
            seen[f"{getattr(cls, '__qualname__', cls.__name__)}.{name}"] = [
                func.__name__, func.__qualname__, func.__module__, func.__doc__, func.__wrapped__.__qualname__,
                str(inspect.signature(func)), sorted(func.__annotations__), inspect.getdoc(func),
                len(pydoc.render_doc(func)) > 0, getattr(func, "__type_params__", None) == (),
            ]
print(json.dumps(seen))
"""


@pytest.mark.timeout(120)
def test_h5py_s_functions_describe_themselves_as_without_h5watch():
    described = {}
    for mode in MODES:
        result = run_python(INTROSPECTION, args=[mode], timeout=90, env={"H5WATCH_IMPLEMENTATION": MODES[mode]})
        assert result.returncode == 0, f"{mode}: {result.stderr[-3000:]}"
        described[mode] = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(described["bare"]) > 50  # its high-level API's
    assert described.get("compiled", described["bare"]) == described["bare"]
    # The pure-Python wrapper is a Python function, h5py's a Cython one: for
    # a method without a docstring, inspect.getdoc() then finds the one it
    # overrides (object.__repr__'s, say) where h5py's finds none.
    getdoc = 7
    assert {name: entry[:getdoc] + entry[getdoc + 1:] for name, entry in described["python"].items()} == {
        name: entry[:getdoc] + entry[getdoc + 1:] for name, entry in described["bare"].items()}


# -- WatchedLock.acquire's argument errors are threading.RLock's --------------

IMPLEMENTATIONS = {"python": PythonWatchedLock}
if CompiledWatchedLock is not None:
    IMPLEMENTATIONS["compiled"] = CompiledWatchedLock

BAD_ARGUMENTS = [
    (False, 1),
    (True, -2),
    (True, -1.5),
    (False, -2),
    (True, math.nan),
    (True, threading.TIMEOUT_MAX * 2),
    (True, threading.TIMEOUT_MAX + 1),
    (True, 1e300),
    (False, 1e300),
]


def rlock_outcome(lock, args) -> tuple:
    try:
        acquired = lock.acquire(*args)
    except Exception as exc:
        return type(exc), str(exc)
    if acquired:
        lock.release()
    return "acquired", acquired


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("args", BAD_ARGUMENTS, ids=repr)
def test_bad_acquire_arguments_raise_what_rlock_raises(impl, args):
    expected = rlock_outcome(threading.RLock(), args)
    assert expected[0] in (ValueError, OverflowError), expected
    assert rlock_outcome(IMPLEMENTATIONS[impl]("test.args"), args) == expected
    as_keywords = {"blocking": args[0], "timeout": args[1]}
    lock = IMPLEMENTATIONS[impl]("test.kwargs")
    with pytest.raises(expected[0]) as got:
        lock.acquire(**as_keywords)
    assert str(got.value) == expected[1]


@pytest.mark.parametrize("impl", sorted(IMPLEMENTATIONS))
@pytest.mark.parametrize("args", [(True, -1), (False, -1), (True, 0), (True, threading.TIMEOUT_MAX)], ids=repr)
def test_valid_acquire_arguments_still_acquire(impl, args):
    lock = IMPLEMENTATIONS[impl]("test.valid")
    assert lock.acquire(*args) is True
    lock.release()
    assert not lock.locked()
