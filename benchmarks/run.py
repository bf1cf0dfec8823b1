"""h5watch's overhead, as A/B ratios in one run: ``python benchmarks/run.py``.

Every h5py row runs bare and instrumented in separate, alternating child
interpreters (``h5watch.install()`` must precede ``import h5py``); each child
reports the median of its own samples, and the table shows the min, median
and max over the pairs of the ratio instrumented / bare. Lock rows compare
``WatchedLock`` with the raw locks in one process, interleaved. Start-up rows
time whole interpreters, in the environment ``h5watch run`` gives them and
bare, alternating (wall time, and CPU time, which a busy machine disturbs
less); each pair of medians is one ratio. Targets are those of the
performance issues; ``FAIL`` marks a missed one.

Options: ``--quick`` (fewer repeats), ``--repeats N``, ``--startup`` (only the
start-up and subprocess rows), ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SAMPLE_SECONDS = 0.25


# -- measurements inside a child interpreter ----------------------------------


def _time_per_op(func, samples: int = 7) -> float:
    """Median ns per call of ``func`` over ``samples`` samples of ~SAMPLE_SECONDS."""
    n = 1
    while True:
        start = time.perf_counter_ns()
        for _ in range(n):
            func()
        elapsed = time.perf_counter_ns() - start
        if elapsed > SAMPLE_SECONDS * 1e9 / 4:
            break
        n *= 2
    n = max(1, int(n * SAMPLE_SECONDS * 1e9 / 4 / max(elapsed, 1) * 4 / 4))
    results = []
    for _ in range(samples):
        start = time.perf_counter_ns()
        for _ in range(n):
            func()
        results.append((time.perf_counter_ns() - start) / n)
    return statistics.median(results)


def child(row: str, instrumented: bool, directory: str, lock_order_off: bool = False) -> dict:
    app_lock = threading.RLock()
    if instrumented:
        import h5watch
        from h5watch.process import lock_order

        h5watch.install(state_dir=os.path.join(directory, "state"), service="bench")
        if lock_order_off:
            lock_order.set_checking(False)
        app_lock = h5watch.WatchedLock("bench.app")
    import h5py
    import numpy as np

    path = os.path.join(directory, f"bench-{os.getpid()}.h5")
    with h5py.File(path, "w") as f:
        f["values"] = np.random.default_rng(0).random((200, 200))
        f.attrs["x"] = 42
    if row == "read":
        with h5py.File(path, "r") as f:
            dataset = f["values"]
            return {"ns": _time_per_op(lambda: dataset[:])}
    if row == "read_under_app_lock":
        # The usual service pattern: an application lock held around h5py
        # calls (a WatchedLock instrumented, threading.RLock bare), so that
        # every outermost acquisition of phil is a nested one.
        with h5py.File(path, "r") as f:
            dataset = f["values"]

            def read() -> None:
                with app_lock:
                    dataset[:]

            return {"ns": _time_per_op(read)}
    if row == "attr":
        with h5py.File(path, "r") as f:
            attrs = f.attrs
            return {"ns": _time_per_op(lambda: attrs["x"])}
    if row == "threads":
        paths = []
        for i in range(10):
            p = os.path.join(directory, f"bench-{os.getpid()}-{i}.h5")
            with h5py.File(p, "w") as f:
                f["values"] = np.random.default_rng(i).random((200, 200))
            paths.append(p)
        counts = [0] * 10
        stop = threading.Event()

        def reader(i: int) -> None:
            with h5py.File(paths[i], "r") as f:
                dataset = f["values"]
                while not stop.is_set():
                    dataset[:]
                    counts[i] += 1

        threads = [threading.Thread(target=reader, args=(i,)) for i in range(10)]
        for t in threads:
            t.start()
        time.sleep(0.3)  # warm up
        before = sum(counts)
        start = time.perf_counter()
        time.sleep(2.0)
        done = sum(counts) - before
        elapsed = time.perf_counter() - start
        stop.set()
        for t in threads:
            t.join()
        return {"ops_per_s": done / elapsed}
    if row == "snapshot":
        import h5watch

        with h5py.File(path, "r") as f:
            f["values"][:]
        return {"us": _time_per_op(h5watch.snapshot, samples=5) / 1e3}
    if row == "preexec":
        # subprocess's preexec_fn child runs Python's at-fork hooks, then execs.
        true = shutil.which("true") or "/bin/true"
        state_dir = os.path.join(directory, "state")
        before = set(os.listdir(state_dir)) if os.path.isdir(state_dir) else set()
        samples = []
        for _ in range(PREEXEC_CALLS):
            start = time.perf_counter_ns()
            subprocess.run([true], preexec_fn=lambda: None, check=True)
            samples.append(time.perf_counter_ns() - start)
        after = set(os.listdir(state_dir)) if os.path.isdir(state_dir) else set()
        mine = {name for name in after - before if not name.startswith(f"{os.getpid()}-")}
        return {"ms": statistics.median(samples) / 1e6, "files": len(mine)}
    if row == "detector":
        return _detector_cost(h5py, path)
    if row == "idle":
        # CPU of a process that only idles: the whole process's (instrumented
        # and bare), and the watchdog thread's own clock (instrumented).
        watchdog_clock = None
        if instrumented:
            from h5watch.process import runtime

            thread = runtime._parts.watchdog._thread
            if thread is None or thread.ident is None:
                raise SystemExit("the watchdog does not run in the idle process")
            watchdog_clock = time.pthread_getcpuclockid(thread.ident)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        watchdog0 = time.clock_gettime(watchdog_clock) if watchdog_clock is not None else 0.0
        time.sleep(10.0)
        wall = time.perf_counter() - wall0
        result = {"cpu_share": (time.process_time() - cpu0) / wall}
        if watchdog_clock is not None:
            result["watchdog_share"] = (time.clock_gettime(watchdog_clock) - watchdog0) / wall
        return result
    raise SystemExit(f"unknown row {row}")


def _detector_cost(h5py, path: str) -> dict:
    """CPU time of one deadlock-detector tick (on this thread's clock) with 50
    other threads: 30 read h5py in a loop (phil contended: waiters every tick),
    10 hold a watched lock each while blocked in Event.wait, and 10 wait for
    those locks (a holder in a non-lock wait with waiters: the detector reads
    stacks every tick, and finds no deadlock, since nothing ties the two)."""
    import h5watch
    from h5watch.process import runtime

    stop = threading.Event()
    locks = [h5watch.WatchedLock(f"bench.app{i}") for i in range(10)]

    def reader() -> None:
        with h5py.File(path, "r") as f:
            dataset = f["values"]
            while not stop.is_set():
                dataset[0:10]

    def holder(lock) -> None:
        with lock:
            stop.wait()

    def waiter(lock) -> None:
        with lock:
            pass

    threads = [threading.Thread(target=reader) for _ in range(30)]
    threads += [threading.Thread(target=holder, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    time.sleep(0.2)
    waiters = [threading.Thread(target=waiter, args=(lock,)) for lock in locks]
    for t in waiters:
        t.start()
    time.sleep(0.3)
    try:
        detector = runtime._parts.watchdog._deadlock_detector()  # made at the first tick, else now
        options = runtime.current_options()
        ticks = 200
        cpu0 = time.thread_time()
        for _ in range(ticks):
            detector.check(options, lambda: None)
        per_tick = (time.thread_time() - cpu0) / ticks
        reported = sum(detector.counts.values())
    finally:
        stop.set()
        for t in threads + waiters:
            t.join()
    return {"cpu_share": per_tick / options.tick_interval, "per_tick_us": per_tick * 1e6, "reported": reported}


def run_child(row: str, instrumented: bool, directory: str, lock_order_off: bool = False) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", row, "--instrumented" if instrumented else "--bare", "--dir", directory,
         *(["--lock-order-off"] if lock_order_off else [])],
        capture_output=True, text=True, timeout=300, env={**os.environ, "H5WATCH_LOG_FORMAT": "json"},
    )
    if out.returncode != 0:
        raise RuntimeError(f"benchmark child {row} failed:\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    FALSE_REPORTS.append(result.get("false_reports", 0))
    return result


# Deadlocks and lock-order inversions reported by every instrumented child.
FALSE_REPORTS: list[int] = []


# -- start-up rows: whole interpreters, under h5watch run and bare --------------

PREEXEC_CALLS = 30
STARTUP_RUNS = 10  # interpreters per side for one pair of medians


def startup_environ(instrumented: bool, directory: str) -> dict[str, str]:
    """The environment ``h5watch run`` gives CMD (or the same without h5watch).

    Both sides get compiled bytecode as an installation has it: a cache of
    our own, whatever PYTHONDONTWRITEBYTECODE this shell sets; and one BLAS
    thread, so that CPU time counts the interpreter, not OpenBLAS's threads
    spinning at numpy's import."""
    from h5watch.cli.run import instrumented_environ

    env = {k: v for k, v in os.environ.items() if not k.startswith("H5WATCH_") and k != "PYTHONDONTWRITEBYTECODE"}
    env.pop("PYTHONPATH", None)
    env["PYTHONPYCACHEPREFIX"] = os.path.join(directory, "pycache")
    env["OPENBLAS_NUM_THREADS"] = "1"
    if instrumented:
        env = instrumented_environ({"state_dir": os.path.join(directory, "state-startup")}, env)
    return env


def _run_interpreter(code: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU (user + system) seconds of ``python -c code``."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise RuntimeError(f"python -c {code!r} failed: {err.decode(errors='replace')[-2000:]}")
    return wall, usage.ru_utime + usage.ru_stime


def startup_rows(code: str, label: str, repeats: int, directory: str, ratio_target: float | None,
                 extra_ms_target: float | None) -> list[dict]:
    envs = {False: startup_environ(False, directory), True: startup_environ(True, directory)}
    for instrumented in (False, True):  # warm the bytecode cache and the page cache
        _run_interpreter(code, envs[instrumented])
    walls: dict[bool, list[float]] = {False: [], True: []}
    cpus: dict[bool, list[float]] = {False: [], True: []}
    wall_ratios, cpu_ratios, extra_ms = [], [], []
    for _ in range(repeats):
        pair_wall: dict[bool, list[float]] = {False: [], True: []}
        pair_cpu: dict[bool, list[float]] = {False: [], True: []}
        for i in range(STARTUP_RUNS):
            for instrumented in ((False, True) if i % 2 == 0 else (True, False)):
                wall, cpu = _run_interpreter(code, envs[instrumented])
                pair_wall[instrumented].append(wall)
                pair_cpu[instrumented].append(cpu)
        medians = {k: statistics.median(v) for k, v in pair_wall.items()}
        cpu_medians = {k: statistics.median(v) for k, v in pair_cpu.items()}
        wall_ratios.append(medians[True] / medians[False])
        cpu_ratios.append(cpu_medians[True] / cpu_medians[False])
        extra_ms.append((medians[True] - medians[False]) * 1e3)
        for k in (False, True):
            walls[k].append(medians[k] * 1e3)
            cpus[k].append(cpu_medians[k] * 1e3)
    return [
        _row(f"{label}, bare (ms wall)", walls[False], None, None, unit="ms"),
        _row(f"{label}, under h5watch run (ms wall)", walls[True], None, None, unit="ms"),
        _row(f"{label}, under h5watch run - bare (ms wall)", extra_ms, "<=" if extra_ms_target else None,
             extra_ms_target, unit="ms"),
        _row(f"{label}, under h5watch run / bare (wall)", wall_ratios, "<=" if ratio_target else None, ratio_target),
        _row(f"{label}, under h5watch run / bare (CPU)", cpu_ratios, "<=" if ratio_target else None, ratio_target),
    ]


def preexec_rows(repeats: int, directory: str) -> list[dict]:
    ratios, files, times = [], [], {False: [], True: []}
    for i in range(repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        results = {instrumented: run_child("preexec", instrumented, directory) for instrumented in order}
        ratios.append(results[True]["ms"] / results[False]["ms"])
        files.append(float(results[True]["files"]))
        for k in (False, True):
            times[k].append(results[k]["ms"])
    return [
        _row("subprocess.run(preexec_fn=...) after import h5py, bare (ms)", times[False], None, None, unit="ms"),
        _row("subprocess.run(preexec_fn=...) after import h5py, instrumented (ms)", times[True], None, None, unit="ms"),
        _row("subprocess.run(preexec_fn=...), instrumented / bare", ratios, "<=", 1.5),
        _row(f"state files left by {PREEXEC_CALLS} preexec_fn children", files, "<=", 0, unit=""),
    ]


# -- lock rows, in this process ------------------------------------------------


def lock_rows(repeats: int) -> list[dict]:
    import threading

    import h5py

    from h5watch import WatchedLock
    from h5watch.process import lock_order

    fast_type = type(h5py._objects.phil)
    raw_fast, raw_rlock = fast_type(), threading.RLock()
    watched = WatchedLock("bench.lock", fast_type())
    # "nested": the thread holds another lock of the same kind first.
    outer = {watched: WatchedLock("bench.outer"), raw_fast: fast_type(), raw_rlock: threading.RLock()}

    def with_lock(lock):
        def op():
            with lock:
                pass
        return op

    rows = []
    for checking in (True, False):
        lock_order.set_checking(checking)
        suffix = "" if checking else ", lock order off"
        for label in ("outermost", "re-entrant", "nested"):
            ratios_fast, ratios_rlock = [], []
            for _ in range(repeats):
                held = {"outermost": [], "re-entrant": [watched, raw_fast, raw_rlock], "nested": list(outer.values())}[label]
                for lock in held:
                    lock.acquire()
                try:
                    t_watched = _time_per_op(with_lock(watched), samples=3)
                    t_fast = _time_per_op(with_lock(raw_fast), samples=3)
                    t_rlock = _time_per_op(with_lock(raw_rlock), samples=3)
                finally:
                    for lock in held:
                        lock.release()
                ratios_fast.append(t_watched / t_fast)
                ratios_rlock.append(t_watched / t_rlock)
            target = 1.2 if label == "re-entrant" else 1.5
            rows.append(_row(f"WatchedLock {label} acquire+release / FastRLock{suffix}", ratios_fast, "<=", target))
            rows.append(_row(f"WatchedLock {label} acquire+release / threading.RLock{suffix}", ratios_rlock, None, None))
    lock_order.set_checking(True)
    rows.extend(lock_order_rows(repeats, watched, outer[watched]))

    # Contention by operation, at its dearest: every acquisition names
    # another operation than the last (a dictionary look-up each time).
    def alternating():
        watched.acquire_for("bench.a")
        watched.release()
        watched.acquire_for("bench.b")
        watched.release()

    def raw_twice():
        with raw_fast:
            pass
        with raw_fast:
            pass

    ratios = [_time_per_op(alternating, samples=3) / _time_per_op(raw_twice, samples=3) for _ in range(repeats)]
    rows.append(_row("WatchedLock acquire_for, two operations in turn / FastRLock", ratios, "<=", 1.5))
    return rows


def lock_order_rows(repeats: int, watched, outer) -> list[dict]:
    """The lock-order checker's own cost: the same acquisition with it on
    over off, interleaved."""
    from h5watch.process import lock_order

    def op():
        with watched:
            pass

    rows = []
    for label, held in (("outermost", None), ("nested", outer)):
        ratios = []
        for _ in range(repeats):
            if held is not None:
                held.acquire()
            try:
                times = {}
                for checking in (True, False):
                    lock_order.set_checking(checking)
                    times[checking] = _time_per_op(op, samples=3)
            finally:
                lock_order.set_checking(True)
                if held is not None:
                    held.release()
            ratios.append(times[True] / times[False])
        rows.append(_row(f"WatchedLock {label} acquire+release, lock order checked / off", ratios, "<=", 1.1))
    return rows


# -- the table -----------------------------------------------------------------


def _row(name: str, values: list[float], op: str | None, target: float | None, unit: str = "x") -> dict:
    median = statistics.median(values)
    ok = None
    if op == "<=":
        ok = median <= target
    elif op == ">=":
        ok = median >= target
    return {"row": name, "min": min(values), "median": median, "max": max(values), "target": f"{op} {target:g}" if op else "",
            "ok": ok, "unit": unit, "n": len(values)}


def ab_row(name: str, row: str, repeats: int, directory: str, key: str, op: str, target: float,
           lock_order_off: bool = False) -> dict:
    ratios = []
    for i in range(repeats):
        order = (False, True) if i % 2 == 0 else (True, False)
        results = {instrumented: run_child(row, instrumented, directory, lock_order_off)[key] for instrumented in order}
        ratios.append(results[True] / results[False])
    return _row(name, ratios, op, target)


def machine() -> dict:
    import h5py
    import numpy

    import h5watch.process.lock

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "h5py": h5py.version.version,
        "hdf5": h5py.version.hdf5_version, "numpy": numpy.__version__, "implementation": h5watch.process.lock.IMPLEMENTATION,
    }


def render(info: dict, rows: list[dict]) -> str:
    lines = [" ".join(f"{k}={v}" for k, v in info.items()), ""]
    lines.append(f"{'row':<72} {'min':>9} {'median':>9} {'max':>9}  {'target':<8} ")
    for row in rows:
        unit = row["unit"]
        fmt = (lambda v: f"{v:.3f}") if unit == "x" else (lambda v, unit=unit: f"{v:.2f}{unit}")
        verdict = "" if row["ok"] is None else ("ok" if row["ok"] else "FAIL")
        lines.append(f"{row['row']:<72} {fmt(row['min']):>9} {fmt(row['median']):>9} {fmt(row['max']):>9}  {row['target']:<8} {verdict}")
    return "\n".join(lines)


def fork_rows(repeats: int) -> list[dict]:
    """Forks and pool starts while ten threads use h5py (see fork_latency.py),
    on this interpreter's h5py and, when H5WATCH_TEST_PY313 names one, on h5py 3.13."""
    from fork_latency import measure

    rows = []
    pythons = [sys.executable]
    if os.environ.get("H5WATCH_TEST_PY313"):
        pythons.append(os.environ["H5WATCH_TEST_PY313"])
    for python in pythons:
        result = measure(python, repeats)
        version = result["h5py"]
        rows.append(_row(f"fork with 10 h5py threads, h5py {version}, instrumented / bare", result["fork"], "<=", 1.5))
        rows.append(_row(f"fork Pool(4) start, h5py {version}, instrumented / bare", result["pool"], "<=", 1.5))
        rows.append(_row(f"fork with 10 h5py threads, h5py {version}, state files off / bare",
                         result["fork_no_state_files"], None, None))
        rows.append(_row(f"fork Pool(4) start, h5py {version}, state files off / bare",
                         result["pool_no_state_files"], None, None))
        if result["pool_over_guarded"]:  # h5py without a fork guard of its own
            rows.append(_row(f"fork with 10 h5py threads, h5py {version}, instrumented / bare with 3.14's guard",
                             result["fork_over_guarded"], None, None))
            rows.append(_row(f"fork Pool(4) start, h5py {version}, instrumented / bare with 3.14's guard",
                             result["pool_over_guarded"], None, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description="h5watch overhead benchmarks (ratios against bare h5py and raw locks)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="A/B pairs per row (default 7, quick 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--startup", action="store_true", help="only the start-up and subprocess rows")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--instrumented", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--lock-order-off", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = child(args.child, args.instrumented, args.dir, args.lock_order_off)
        if args.instrumented:
            # What the detector and the lock-order checker reported over this
            # workload, which has neither a deadlock nor an inversion.
            import h5watch

            snap = h5watch.snapshot()
            result["false_reports"] = sum(snap.get("watchdog", {}).get("deadlocks", {}).values()) + snap["lock_order"]["inversions"]
        print(json.dumps(result))
        return
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    with tempfile.TemporaryDirectory(prefix="h5watch-bench-") as directory:
        rows.extend(startup_rows("pass", "python -c pass", repeats, directory, None, 3.0))
        rows.extend(startup_rows("import h5py", "python -c 'import h5py'", repeats, directory, 1.10, None))
        rows.extend(preexec_rows(repeats, directory))
    if args.startup:
        info = machine()
        print(json.dumps({"machine": info, "rows": rows}, indent=2) if args.json else render(info, rows))
        return
    with tempfile.TemporaryDirectory(prefix="h5watch-bench-") as directory:
        for off in (False, True):
            suffix = ", lock order off" if off else ""
            rows.append(ab_row(f"single thread f['values'][:] 200x200, instrumented / bare{suffix}", "read", repeats,
                               directory, "ns", "<=", 1.02, off))
            rows.append(ab_row(f"single thread f['values'][:] under an application lock, instrumented / bare{suffix}",
                               "read_under_app_lock", repeats, directory, "ns", "<=", 1.02, off))
            rows.append(ab_row(f"single thread f.attrs['x'], instrumented / bare{suffix}", "attr", repeats, directory,
                               "ns", "<=", 1.02, off))
            rows.append(ab_row(f"10 threads reading own files, throughput instrumented / bare{suffix}", "threads", repeats,
                               directory, "ops_per_s", ">=", 0.97, off))
        rows.extend(lock_rows(repeats))
        snapshot = [run_child("snapshot", True, directory)["us"] for _ in range(1 if args.quick else 3)]
        rows.append(_row("h5watch.snapshot() per call (us)", snapshot, None, None, unit="us"))
        detector = [run_child("detector", True, directory) for _ in range(1 if args.quick else 3)]
        if any(result["reported"] for result in detector):
            raise SystemExit("the deadlock detector reported a deadlock in a workload that has none")
        rows.append(_row("deadlock detector at default tick, 50 threads, CPU % of one core",
                         [result["cpu_share"] * 100 for result in detector], "<=", 0.5, unit="%"))
        idle = [(run_child("idle", True, directory), run_child("idle", False, directory)) for _ in range(1 if args.quick else 2)]
        rows.append(_row("watchdog at default tick, CPU % of one core (idle process, the watchdog thread's clock)",
                         [instrumented["watchdog_share"] * 100 for instrumented, _ in idle], "<=", 0.5, unit="%"))
        rows.append(_row("idle process CPU % of one core, instrumented - bare (points)",
                         [(instrumented["cpu_share"] - bare["cpu_share"]) * 100 for instrumented, bare in idle], None, None,
                         unit="%"))
    rows.append(_row("deadlocks + lock-order inversions reported over the instrumented workloads", [sum(FALSE_REPORTS)],
                     "<=", 0, unit=""))
    rows.extend(fork_rows(2 if args.quick else 5))
    from daemon_scan import bench_daemon_scan, bench_state_write

    scan = bench_daemon_scan(1000, 5 if args.quick else 15)
    rows.append(_row("daemon scan + collect, 1,000 state files (ms)", [scan["scan_plus_collect_ms_median"]], "<=", 100, unit="ms"))
    write = bench_state_write()
    rows.append(_row("state file write per watchdog tick, 3 locks (us)", [write["tick_write_us_median"]], None, None, unit="us"))
    info = machine()
    info["daemon_peak_rss_mb"] = round(scan["peak_rss_mb"], 1)
    if args.json:
        print(json.dumps({"machine": info, "rows": rows}, indent=2))
    else:
        print(render(info, rows))


if __name__ == "__main__":
    main()
