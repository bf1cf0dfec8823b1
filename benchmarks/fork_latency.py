"""Fork latency while ten threads use h5py, instrumented over bare.

``python benchmarks/fork_latency.py [--python PYTHON] [--repeats N] [--json]``

Each side runs in its own child interpreter (bare, or with
``h5watch.install()`` before ``import h5py``), alternating: ten reader
threads read their own HDF5 files in a loop while the main thread starts a
``multiprocessing`` fork pool of four workers, maps a trivial task and joins
it, twenty times. Reported per side: the median time of one ``os.fork()``
call in the parent (every fork the pools made) and the median pool start
(constructor to first result). The table shows instrumented / bare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

CHILD = r"""
import json, os, statistics, sys, threading, time
instrumented, directory = sys.argv[1] == "1", sys.argv[2]
if instrumented:
    import h5watch
    h5watch.install(state_files=False)
import multiprocessing
import h5py
import numpy as np

paths = []
for i in range(10):
    path = os.path.join(directory, f"fork-{os.getpid()}-{i}.h5")
    with h5py.File(path, "w") as f:
        f["values"] = np.random.default_rng(i).random((200, 200))
    paths.append(path)
stop = threading.Event()


def reader(path):
    with h5py.File(path, "r") as f:
        dataset = f["values"]
        while not stop.is_set():
            dataset[:]


threads = [threading.Thread(target=reader, args=(p,), daemon=True) for p in paths]
for t in threads:
    t.start()
time.sleep(0.3)

fork_ns = []
real_fork = os.fork


def timed_fork():
    start = time.perf_counter_ns()
    pid = real_fork()
    if pid:
        fork_ns.append(time.perf_counter_ns() - start)
    return pid


os.fork = timed_fork
context = multiprocessing.get_context("fork")
starts = []
for _ in range(20):
    start = time.perf_counter_ns()
    with context.Pool(4) as pool:
        pool.map(abs, range(4))
        starts.append(time.perf_counter_ns() - start)
        pool.close()
        pool.join()
stop.set()
print(json.dumps({"fork_ns": statistics.median(fork_ns), "pool_ns": statistics.median(starts),
                  "fork_max_ns": max(fork_ns), "h5py": h5py.__version__}))
sys.stdout.flush()
os._exit(0)
"""


def run_side(python: str, instrumented: bool, directory: str) -> dict:
    proc = subprocess.run(
        [python, "-c", CHILD, "1" if instrumented else "0", directory],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    if proc.returncode != 0:
        raise SystemExit(f"fork benchmark child failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(python: str, repeats: int) -> dict:
    fork_ratios, pool_ratios, worst_ms, bare_ms, watched_ms = [], [], [], [], []
    version = None
    with tempfile.TemporaryDirectory() as directory:
        for _ in range(repeats):
            bare = run_side(python, False, directory)
            watched = run_side(python, True, directory)
            version = watched["h5py"]
            fork_ratios.append(watched["fork_ns"] / bare["fork_ns"])
            pool_ratios.append(watched["pool_ns"] / bare["pool_ns"])
            worst_ms.append(watched["fork_max_ns"] / 1e6)
            bare_ms.append(bare["fork_ns"] / 1e6)
            watched_ms.append(watched["fork_ns"] / 1e6)
    return {
        "h5py": version,
        "fork": fork_ratios,
        "pool": pool_ratios,
        "worst_fork_ms": worst_ms,
        "bare_fork_ms": bare_ms,
        "watched_fork_ms": watched_ms,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = measure(args.python, args.repeats)
    if args.json:
        print(json.dumps(result))
        return
    for key in ("fork", "pool"):
        values = result[key]
        print(f"h5py {result['h5py']} {key}: min {min(values):.3f} median {statistics.median(values):.3f} max {max(values):.3f}")
    print(f"worst single fork instrumented: {max(result['worst_fork_ms']):.1f} ms")


if __name__ == "__main__":
    main()
