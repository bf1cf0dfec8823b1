"""Contention by operation: which operations hold a lock, for how long, and
whose holds made the other threads wait (the waits are charged to the
operation that held the lock, as Go's mutex profile does). Real threads,
real h5py, real state files, a real daemon."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import pytest
from conftest import _lock_classes, run_python
from daemon_support import wait_for
from prometheus_client.parser import text_string_to_metric_families

from h5watch.schema import OPERATION_OTHER, OPERATION_SLOTS
from h5watch.statefile import read_state_file

pytestmark = pytest.mark.timeout(120)


def rows_of(lock) -> dict[str, dict]:
    return {row["operation"]: row for row in lock.snapshot()["operations"]}


def test_waits_are_charged_to_the_operation_that_held_the_lock(lock_class):
    lock = lock_class("app.cache")
    held = threading.Event()
    started: dict[str, float] = {}
    released_at: list[float] = []

    def rebuild() -> None:
        held.set()
        time.sleep(0.4)
        released_at.append(time.monotonic())

    def lookup(name: str) -> None:
        held.wait(10)
        started[name] = time.monotonic()
        with_op(lock, "lookup", lambda: None)

    threads = [threading.Thread(target=with_op, args=(lock, "rebuild", rebuild))]
    threads += [threading.Thread(target=lookup, args=(f"r{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    rows = rows_of(lock)
    assert set(rows) == {"rebuild", "lookup"}
    rebuild_row, lookup_row = rows["rebuild"], rows["lookup"]
    assert (rebuild_row["holds"], lookup_row["holds"]) == (1, 3)
    assert rebuild_row["hold_seconds"] >= 0.39 and rebuild_row["hold_max_seconds"] == rebuild_row["hold_seconds"]
    # The three lookups waited behind the rebuild: what they waited until
    # its release is its doing (what came after, behind each other, is not).
    assert lookup_row["waits"] == 3 and rebuild_row["waits"] == 0
    behind_rebuild = sum(released_at[0] - start for start in started.values())
    assert rebuild_row["caused_wait_seconds"] == pytest.approx(behind_rebuild, abs=0.1)
    assert lookup_row["wait_seconds"] >= rebuild_row["caused_wait_seconds"] - 0.01
    assert lookup_row["caused_wait_seconds"] < rebuild_row["caused_wait_seconds"]
    # Every hold is an acquisition, counted once.
    assert sum(row["holds"] for row in rows.values()) == lock.snapshot()["stats"]["acquisitions"]


@pytest.mark.parametrize("a_wait_times_out", [False, True], ids=["waits-only-join", "a-wait-times-out"])
def test_the_waits_charged_to_a_hold_are_those_of_the_threads_still_waiting_at_its_release(lock_class, a_wait_times_out):
    """Waits that began before the hold and during it are charged from the
    later of their start and the hold's; a wait that timed out during the
    hold is not (it is no longer waiting at the release). The compiled core
    charges the first case in constant time, the second by a pass over the
    waiters: both give the same."""
    lock = lock_class("app.charged")
    held = threading.Event()
    started: dict[str, float] = {}
    released_at: list[float] = []

    def hold() -> None:
        held.set()
        time.sleep(0.3)
        threads[1].start()  # joins the waiters during the hold
        time.sleep(0.3)
        released_at.append(time.monotonic())

    def wait(name: str, timeout: float = -1) -> None:
        started[name] = time.monotonic()
        if lock.acquire(timeout=timeout):
            lock.release()

    threads = [threading.Thread(target=wait, args=("early",)), threading.Thread(target=wait, args=("joined",))]
    if a_wait_times_out:
        threads.append(threading.Thread(target=wait, args=("gave-up", 0.15)))
    holder = threading.Thread(target=with_op, args=(lock, "hold", hold))
    holder.start()
    held.wait(10)
    threads[0].start()
    if a_wait_times_out:
        threads[2].start()
    holder.join(30)
    for thread in threads:
        thread.join(30)
    caused = rows_of(lock)["hold"]["caused_wait_seconds"]
    expected = sum(released_at[0] - started[name] for name in ("early", "joined"))
    assert caused == pytest.approx(expected, abs=0.05)


def with_op(lock, operation: str, body) -> None:
    lock.acquire_for(operation)
    try:
        body()
    finally:
        lock.release()


class UnhashableText(str):
    __hash__ = None  # type: ignore[assignment]


def test_an_operation_that_is_not_a_string_counts_as_other(lock_class):
    """``acquire_for`` names operations with a str (None: the lock's own
    name); anything else counts under other, never raises, and takes no row
    (a row's name is written into the state file as the row is given)."""
    lock = lock_class("app.odd")
    for operation in (42, ["a", "list"], UnhashableText("x"), b"bytes"):
        with_op(lock, operation, lambda: None)
    with_op(lock, "named", lambda: None)
    rows = rows_of(lock)
    assert {name: row["holds"] for name, row in rows.items()} == {OPERATION_OTHER: 4, "named": 1}
    assert lock.operations.names == [OPERATION_OTHER, None, "named"]


def test_an_unnamed_hold_is_named_after_the_lock_and_a_bounded_table_counts_the_rest_as_other(lock_class):
    lock = lock_class("app.registry")
    with lock:
        pass
    for i in range(OPERATION_SLOTS + 20):
        with_op(lock, f"op-{i}", lambda: None)
    rows = rows_of(lock)
    # OPERATION_SLOTS rows: the unnamed hold's, OPERATION_SLOTS - 2 named
    # ones, and other for the 22 operations that came after them.
    assert len(rows) == OPERATION_SLOTS
    assert rows["app.registry"]["holds"] == 1
    assert rows["op-0"]["holds"] == rows[f"op-{OPERATION_SLOTS - 3}"]["holds"] == 1
    assert f"op-{OPERATION_SLOTS - 2}" not in rows
    assert rows[OPERATION_OTHER]["holds"] == 22
    assert sum(row["holds"] for row in rows.values()) == lock.snapshot()["stats"]["acquisitions"] == OPERATION_SLOTS + 21


FORKED_PROFILE = """
import h5watch, json, os
h5watch.install(state_files=False)
lock = h5watch.WatchedLock("app.forked")
for _ in range(5):
    with lock:
        pass
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    lock.acquire_for("in-child")
    lock.release()
    os.write(write, json.dumps(lock.snapshot()["operations"]).encode())
    os._exit(0)
os.close(write)
child = json.loads(os.read(read, 65536).decode())
os.waitpid(pid, 0)
print(json.dumps({"child": child, "parent": lock.snapshot()["operations"]}))
"""


@pytest.mark.parametrize("implementation", ["compiled", "python"])
def test_a_forked_child_profiles_from_zero_and_the_parent_keeps_its_own(implementation):
    result = run_python(FORKED_PROFILE, env={"H5WATCH_IMPLEMENTATION": implementation}, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert [(row["operation"], row["holds"]) for row in out["child"]] == [("in-child", 1)]
    assert [(row["operation"], row["holds"]) for row in out["parent"]] == [("app.forked", 5)]


H5PY_OPERATIONS = """
import h5watch
h5watch.install(state_files=False)
import io, json, sys, threading, time
import h5py, numpy as np

bio = io.BytesIO()
with h5py.File(bio, "w") as f:
    f["big"] = np.random.rand(1500, 1000)
    f["medium"] = np.zeros((400, 400))
f = h5py.File(bio, "r+")
big, medium, values = f["big"], f["medium"], np.random.rand(400, 400)
work = {
    "h5py._hl.dataset.Dataset.__getitem__": lambda: big[...],
    "h5py._hl.dataset.Dataset.__setitem__": lambda: medium.__setitem__(Ellipsis, values),
    "h5py._hl.group.Group.__contains__": lambda: "big" in f,
}

# The true order, one operation at a time with nobody else waiting (after
# a first call of each, which pays one-time costs).
for call in work.values():
    call()
alone = {}
for name, call in work.items():
    start = time.perf_counter()
    for _ in range(10):
        call()
    alone[name] = time.perf_counter() - start

# Then all together. The threads start at once and switch often: left to
# the default switch interval they could run one after another and never
# wait (as one CI run on 3.12 found).
sys.setswitchinterval(0.0005)
together = threading.Barrier(4)

def mixed():
    together.wait()
    for _ in range(10):
        for call in work.values():
            call()

threads = [threading.Thread(target=mixed) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
phil = h5watch.snapshot()["locks"]["h5py.phil"]
print(json.dumps({"alone": alone, "operations": phil["operations"], "wait_sum_ns": phil["stats"]["wait"]["sum_ns"]}))
"""


def test_h5py_operations_are_ranked_by_their_true_hold_time_and_charged_the_waits_they_caused():
    result = run_python(H5PY_OPERATIONS, timeout=90)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    rows = {row["operation"]: row for row in out["operations"]}
    truth = sorted(out["alone"], key=out["alone"].get, reverse=True)
    assert out["alone"][truth[0]] > 2 * out["alone"][truth[1]] > 4 * out["alone"][truth[2]], out["alone"]
    ranked = [row["operation"] for row in out["operations"] if row["operation"] in out["alone"]]
    assert ranked == truth
    assert [rows[name]["holds"] for name in truth] == [51, 51, 51]  # 1 + 10 alone, 40 mixed
    # The threads waited mostly behind the heaviest operation, and what they
    # waited is charged once, to whichever operation held phil meanwhile.
    caused = {name: rows[name]["caused_wait_seconds"] for name in truth}
    assert caused[truth[0]] > caused[truth[1]] and caused[truth[0]] > caused[truth[2]], caused
    total_caused = sum(row["caused_wait_seconds"] for row in out["operations"])
    assert total_caused <= out["wait_sum_ns"] / 1e9 * 1.05 + 0.01


PROFILED_WORKER = """
import h5watch, json, sys, threading, time
h5watch.install(state_dir=sys.argv[1], service="profiled")
lock = h5watch.WatchedLock("app.table")

def hammer(operation, hold):
    for _ in range(20):
        lock.acquire_for(operation)
        time.sleep(hold)
        lock.release()

threads = [threading.Thread(target=hammer, args=(op, hold)) for op, hold in (("scan", 0.005), ("get", 0.0), ("get", 0.0))]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(lock.snapshot()["operations"]))
"""


def operation_samples(port: int, workload: str = "profiled") -> dict[tuple[str, str], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("h5watch_lock_operation_"):
            for sample in family.samples:
                if sample.labels.get("workload") == workload:
                    out[(sample.name, sample.labels["operation"])] = sample.value
    return out


def test_the_daemon_exports_each_operation_and_keeps_its_counts_after_the_process_exits(state_dir, daemons):
    result = run_python(PROFILED_WORKER, args=[str(state_dir)], timeout=60)
    assert result.returncode == 0, result.stderr
    own = {row["operation"]: row for row in json.loads(result.stdout.splitlines()[-1])}
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    samples = wait_for(lambda: operation_samples(daemon.port) or None, 20, what="operation series")
    for operation, row in own.items():
        assert samples[("h5watch_lock_operation_holds_total", operation)] == row["holds"]
        assert samples[("h5watch_lock_operation_hold_seconds_total", operation)] == pytest.approx(row["hold_seconds"])
        assert samples[("h5watch_lock_operation_caused_wait_seconds_total", operation)] == pytest.approx(row["caused_wait_seconds"])
        assert samples[("h5watch_lock_operation_waits_total", operation)] == row["waits"]
        assert samples[("h5watch_lock_operation_wait_seconds_total", operation)] == pytest.approx(row["wait_seconds"])
    assert own["scan"]["holds"] == 20 and own["get"]["holds"] == 40
    # The exited process's file is folded into the daemon's totals and
    # removed; a restarted daemon still exports the same counts.
    wait_for(lambda: not list(state_dir.glob("*/*.h5w")), 20, what="the exited process's file to be folded")
    daemon.stop()
    again = daemons(state_dir, "--scan-interval", "0.2")
    assert wait_for(lambda: operation_samples(again.port) or None, 20, what="operation series") == samples


def folded_operation_samples(state_dir, daemons, workload: str, body: str) -> dict[tuple[str, str], float]:
    """A process of ``workload`` counts in its state file (``body``: code
    that has ``writer`` and ``attached(name)``, a new watched lock that
    counts in the file) and is SIGKILLed before any tick; a daemon then
    folds its file: the operation series it exports."""
    code = f"""
import os, signal
from h5watch.process.lock import WatchedLock
from h5watch.process.publisher import lock_record
from h5watch.statefile import StateWriter, ensure_state_dir
directory = ensure_state_dir({str(state_dir)!r})
writer = StateWriter(directory, {workload!r}, 0, 60)

def attached(name):
    lock = WatchedLock(name)
    writer.attach_locks([lock_record(lock)])
    return lock

{body}
os.kill(os.getpid(), signal.SIGKILL)
"""
    result = run_python(code, timeout=60)
    assert result.returncode == -9, result.stderr
    daemon = daemons(state_dir, "--scan-interval", "0.2")
    wait_for(lambda: not list(state_dir.glob("*/*.h5w")), 20, what="the dead process's file to be folded")
    return wait_for(lambda: operation_samples(daemon.port, workload) or None, 20, what="operation series")


@pytest.mark.parametrize("implementation", ["compiled", "python"])
def test_a_process_killed_before_any_tick_keeps_every_operation(state_dir, daemons, implementation, monkeypatch):
    """Operations count in the state file itself, as the locks' counters
    do: a process SIGKILLed before it ever wrote its locks' records again
    (no tick, no exit) keeps every hold by operation, of a live lock and of
    one collected and merged into its name's retired record."""
    if implementation == "compiled" and "compiled" not in _lock_classes():
        pytest.skip("the compiled core is not built here")
    monkeypatch.setenv("H5WATCH_IMPLEMENTATION", implementation)
    samples = folded_operation_samples(state_dir, daemons, "cut-short", """
import gc
from h5watch.records import ProcessStatus
cache = attached("app.cache")
for name, times in (("old", 3), ("new", 7)):
    for _ in range(times):
        cache.acquire_for(name)
        cache.release()
for _ in range(2):  # two instances of one name, collected: merged by the next write
    gone = attached("app.gone")
    for name, times in (("shared", 4), (None, 1)):
        for _ in range(times):
            gone.acquire_for(name)
            gone.release()
del gone
gc.collect()
writer.write_all([lock_record(cache)], ProcessStatus(True, None))
for _ in range(5):  # after the last write
    cache.acquire_for("late")
    cache.release()
""")
    assert samples[("h5watch_lock_operation_holds_total", "old")] == 3
    assert samples[("h5watch_lock_operation_holds_total", "new")] == 7
    assert samples[("h5watch_lock_operation_holds_total", "late")] == 5
    assert samples[("h5watch_lock_operation_holds_total", "shared")] == 8
    assert samples[("h5watch_lock_operation_holds_total", "app.gone")] == 2  # unnamed: the lock's own name


def test_operation_names_that_read_alike_are_one_series_and_absurd_counters_read_as_zero(state_dir, daemons):
    """A forged or damaged file: two operations whose names differ only in
    control characters (each reads as ``?``) are one series, their counts
    added; a counter no real count reaches is read as 0, never summed."""
    samples = folded_operation_samples(state_dir, daemons, "forged", """
from h5watch.schema import N_OPERATION_WORDS, O_HOLD_SUM, O_WAITS
cache = attached("app.cache")
for name, times in (("read\x1bone", 3), ("read\x07one", 4)):
    for _ in range(times):
        cache.acquire_for(name)
        cache.release()
words, _ = writer._live[cache._seq].table  # rows 2 and 3: the two names
words[2 * N_OPERATION_WORDS + O_HOLD_SUM] = 3_000_000
words[3 * N_OPERATION_WORDS + O_HOLD_SUM] = 2**63 + 5
words[2 * N_OPERATION_WORDS + O_WAITS] = 1
words[3 * N_OPERATION_WORDS + O_WAITS] = 2
""")
    assert {operation for _, operation in samples} == {"read?one"}
    assert samples[("h5watch_lock_operation_holds_total", "read?one")] == 7
    assert samples[("h5watch_lock_operation_hold_seconds_total", "read?one")] == pytest.approx(0.003)
    assert samples[("h5watch_lock_operation_waits_total", "read?one")] == 3


MULTIPROCESSING_WORKERS = """
import json, multiprocessing, os, signal, sys
import h5watch
h5watch.install(state_dir=sys.argv[1], service="mp-profiled", tick_interval=60)  # no tick in a worker's life
import h5py, numpy as np

path, how = sys.argv[2], sys.argv[3]

def work(_=None):
    with h5py.File(path, "r") as f:
        for _ in range(50):
            f["x"][:]
    return multiprocessing.current_process().pid

def work_then_die():
    work()
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(100)
    context = multiprocessing.get_context("fork")
    if how == "process":
        worker = context.Process(target=work)
        worker.start()
        worker.join(60)
        pids, exitcodes = [worker.pid], [worker.exitcode]
    elif how == "killed":
        worker = context.Process(target=work_then_die)
        worker.start()
        worker.join(60)
        pids, exitcodes = [worker.pid], [worker.exitcode]
    elif how == "terminated":
        with context.Pool(2) as pool:  # leaving the block: terminate(), SIGTERM to each worker still there
            pids = sorted(set(pool.map(work, range(6), chunksize=1)))
        exitcodes = [0]
    elif how == "pool":
        pool = context.Pool(2)
        pids = sorted(set(pool.map(work, range(6), chunksize=1)))
        pool.close()  # the workers end as Process children do: _bootstrap, then os._exit
        pool.join()
        exitcodes = [0]
    else:
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(2, mp_context=context) as executor:
            pids = sorted(set(executor.map(work, range(6))))
        exitcodes = [0]
    print(json.dumps({"pids": pids, "exitcodes": exitcodes}))
"""


@pytest.mark.parametrize("how", ["process", "pool", "executor", "killed", "terminated"])
@pytest.mark.parametrize("implementation", ["compiled", "python"])
def test_a_multiprocessing_worker_keeps_its_operations_however_it_ends(state_dir, tmp_path, implementation, how):
    """A multiprocessing child ends with os._exit (no exit handlers; on 3.13
    its atexit list is cleared too), by SIGKILL, or by the SIGTERM of
    ``Pool.terminate()``, before any tick: what it counted by operation is
    in its file all the same, hold for hold with its locks' own counters."""
    if implementation == "compiled" and "compiled" not in _lock_classes():
        pytest.skip("the compiled core is not built here")
    result = run_python(MULTIPROCESSING_WORKERS, args=[str(state_dir), str(tmp_path / "data.h5"), how],
                        env={"H5WATCH_IMPLEMENTATION": implementation}, timeout=90)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.splitlines()[-1])
    assert out["exitcodes"] == [-9 if how == "killed" else 0]
    total_holds = 0
    for pid in out["pids"]:
        [path] = list(state_dir.rglob(f"{pid}-*.h5w"))
        state = read_state_file(str(path), accept_torn=True)  # its writer is dead
        acquisitions = sum(lock["acquisitions"] for lock in state.locks() if lock["lock"] == "h5py.phil")
        holds = sum(row.holds for row in state.operation_records() if row.lock == "h5py.phil")
        assert acquisitions > 0 and holds == acquisitions, (pid, acquisitions, state.operation_records())
        total_holds += holds
    assert total_holds >= 50 * (1 if how in ("process", "killed") else 6)  # each task opens the file once and reads 50 times
