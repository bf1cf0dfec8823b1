"""Forks never break a lock's books: after any number of forks, in parent
and child, every lock's hold count equals its acquisitions, and a hold is
recorded only for an acquisition that was counted in the same process.

Each case runs in a fresh interpreter, on each implementation, for
``os.fork()`` (Python's at-fork hooks run) and for libc's ``fork()`` called
through ctypes (they do not), each process with its state file. The parent
holds an application lock (re-entered) and ``phil`` across three forks; each
child releases what it inherited, works, forks a grandchild while holding
the locks again, and every process reports its counters.
"""

from __future__ import annotations

import json

import pytest
from conftest import run_python

from h5watch.process.lock import CompiledWatchedLock

SCENARIO = r"""
import ctypes, json, os, sys
import h5watch
h5watch.install(service="accounting", state_dir=os.environ["ACCOUNTING_STATE_DIR"])
import h5py
import numpy as np
from h5py._objects import phil
from h5watch.process.lock import watched_locks

PATH = sys.argv[1]
HOOKED = sys.argv[2] == "os"
libc = ctypes.PyDLL(None)  # keeps the GIL across the fork, as C code that forks may
app = h5watch.WatchedLock("app")
WORK = 5


def fork():
    sys.stdout.flush()
    return os.fork() if HOOKED else libc.fork()


def work():
    # WORK outermost acquisitions of app, and some of phil through h5py.
    for _ in range(WORK):
        with app:
            with app:
                pass
    with h5py.File(PATH, "r") as f:
        f["values"][:3]


def report(role, expected_app):
    locks = {lock.name: lock.snapshot() for lock in watched_locks()}
    # What the process's own state file says (no child ever wrote in it).
    from h5watch.statefile import read_state_file
    state = read_state_file(h5watch.snapshot()["state"]["path"])
    in_file = {name: [sum(lock["acquisitions"] for lock in state.locks() if lock["lock"] == name),
                      sum(row.holds for row in state.operation_records() if row.lock == name)] for name in locks}
    print(json.dumps({
        "role": role,
        "expected_app": expected_app,
        "locks": {name: [s["stats"]["acquisitions"], s["stats"]["hold"]["count"], sum(row["holds"] for row in s["operations"])]
                  for name, s in locks.items()},
        "file": in_file,
    }), flush=True)


def reap(pid):
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status


def child(generation):
    # Inherited: app twice and phil once, counted in the parent.
    phil.release()
    app.release()
    app.release()
    work()
    if generation < 2:
        app.acquire()
        app.acquire()
        phil.acquire()
        pid = fork()
        if pid == 0:
            child(generation + 1)
        phil.release()
        app.release()
        app.release()
        reap(pid)
        # The held-across-fork acquisition counts here. (The child of a
        # hook-skipping fork counts on from its parent's numbers until it
        # notices the fork: exact figures only for os.fork.)
        report(f"child{generation}", WORK + 1 if HOOKED else None)
    else:
        report(f"child{generation}", WORK if HOOKED else None)
    os._exit(0)


with h5py.File(PATH, "w") as f:
    f["values"] = np.arange(10)
work()
app.acquire()
app.acquire()
phil.acquire()
for _ in range(3):
    pid = fork()
    if pid == 0:
        child(1)
    reap(pid)
phil.release()
app.release()
app.release()
work()
report("parent", 2 * WORK + 1)
"""

# The pure-Python mirror has no libc fork handler: in the child of a fork
# that skipped Python's hooks it keeps counting in its parent's state file
# until its first wait for a lock notices the new pid (the compiled core's
# handler moves the child's counters out at once).
PYTHON_UNHOOKED = pytest.mark.xfail(
    strict=True, reason="pure-Python mirror: a hook-skipping fork's child counts in its parent's file until it waits"
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "implementation, fork_kind",
    [("compiled", "os"), ("compiled", "libc"), ("python", "os"), pytest.param("python", "libc", marks=PYTHON_UNHOOKED)],
)
def test_hold_count_equals_acquisitions_after_forks(implementation, fork_kind, tmp_path):
    if implementation == "compiled" and CompiledWatchedLock is None:
        pytest.skip("the compiled core is not built here")
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    env = {"H5WATCH_IMPLEMENTATION": implementation, "H5WATCH_LOG_LEVEL": "error", "ACCOUNTING_STATE_DIR": str(state_dir)}
    result = run_python(SCENARIO, env=env, args=[str(tmp_path / "data.h5"), fork_kind], timeout=90)
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    roles = sorted(r["role"] for r in reports)
    # Three children, each with a grandchild that forks no further.
    assert roles == ["child1"] * 3 + ["child2"] * 3 + ["parent"], roles
    for r in reports:
        for name, (acquisitions, holds, operation_holds) in r["locks"].items():
            assert holds == acquisitions == operation_holds, (r["role"], name, r["locks"])
            if fork_kind == "os" or r["role"] == "parent":  # the child of a libc fork has no file of its own yet
                assert r["file"][name] == [acquisitions, acquisitions], (r["role"], name, r["file"], r["locks"])
        assert r["locks"]["h5py.phil"][0] > 0, r
        if r["expected_app"] is not None:
            assert r["locks"]["app"][0] == r["expected_app"], r
