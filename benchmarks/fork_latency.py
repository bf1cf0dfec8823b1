"""Fork latency while ten threads use h5py, instrumented over bare.

``python benchmarks/fork_latency.py [--python PYTHON] [--repeats N] [--json]``

Each side runs in its own child interpreter, in turn: bare; with
``h5watch.install()`` before ``import h5py`` on its defaults (state files
on, in the benchmark's directory: every forked child makes its own at
once); and the same with ``state_files=False``. Where h5py has no fork
guard of its own (before 3.14), a fourth side: bare h5py with the guard
h5py 3.14 added (``phil`` acquired before a fork, released after it in
the parent and the child), the least a fork that leaves no child a held
``phil`` pays. Ten reader threads read their own HDF5 files in a loop while
the main thread starts a ``multiprocessing`` fork pool of four workers,
maps a trivial task and joins it, twenty times. Reported per side: the
median time of one ``os.fork()`` call in the parent (every fork the pools
made) and the median pool start (constructor to first result). The table
shows instrumented / bare, the same with state files off, and
instrumented / guarded bare.

``--steps`` measures instead where the pool start's time goes: only the
pool start, over bare, for sides with h5watch's fork steps cut down (for
the measurement only: each of these is unsafe) beside the defaults, state
files off and the guarded bare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator

CHILD = r"""
import json, os, statistics, sys, threading, time
side, directory = sys.argv[1], sys.argv[2]
if side not in ("bare", "guarded"):
    import h5watch
    h5watch.install(state_files=side != "no_state_files", state_dir=os.path.join(directory, "state"))
if side.startswith("cut_"):
    # --steps only: h5watch's fork steps cut down, for the measurement (unsafe).
    from h5watch.process.fork import ForkGuard

    def give_back_only(self, hooked):
        self._give_back_fork_locks(hooked)

    def give_back_and_spin(self, hooked):
        self._give_back_fork_locks(hooked)
        end = time.perf_counter() + 0.003
        while time.perf_counter() < end:
            pass

    if side == "cut_all":
        ForkGuard._before_fork = ForkGuard._after_fork_in_parent = lambda self: None
        ForkGuard._after_fork_in_child = lambda self, hooked: None
    else:
        ForkGuard._after_fork_in_child = give_back_only if side == "cut_child" else give_back_and_spin
import multiprocessing
import h5py
import numpy as np

native_guard = hasattr(h5py._objects, "_phil_before_fork")
if side == "guarded":
    if native_guard:
        print(json.dumps({"native_guard": True}))
        sys.stdout.flush()
        os._exit(0)
    # h5py 3.14's fork guard (h5py/_objects.pyx), on an h5py without it.
    phil = h5py._objects.phil
    os.register_at_fork(before=phil.acquire, after_in_parent=phil.release, after_in_child=phil.release)

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


SIDES = ("bare", "defaults", "no_state_files", "guarded")


def run_side(python: str, side: str, directory: str) -> dict:
    # A directory of its own per run: the children's state files start from
    # none each time (as with a daemon, which removes dead processes' files).
    proc = subprocess.run(
        [python, "-c", CHILD, side, tempfile.mkdtemp(dir=directory)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": ""},
    )
    if proc.returncode != 0:
        raise SystemExit(f"fork benchmark child failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rounds(python: str, sides: list[str] | tuple[str, ...], repeats: int) -> Iterator[dict[str, dict]]:
    """Each repeat's runs by side, the sides in turn (rotated, so none always runs first)."""
    with tempfile.TemporaryDirectory() as directory:
        for i in range(repeats):
            order = [*sides[i % len(sides):], *sides[: i % len(sides)]]
            yield {side: run_side(python, side, directory) for side in order}


def measure(python: str, repeats: int) -> dict:
    """Per repeat (see ``rounds``), ratios of each instrumented side over
    that repeat's bare one, and of the defaults over the guarded bare one
    where h5py has no guard of its own."""
    result: dict = {"fork": [], "pool": [], "fork_no_state_files": [], "pool_no_state_files": [],
                    "fork_over_guarded": [], "pool_over_guarded": [],
                    "worst_fork_ms": [], "bare_fork_ms": [], "watched_fork_ms": [],
                    "bare_pool_ms": [], "watched_pool_ms": [], "guarded_pool_ms": []}
    for runs in rounds(python, SIDES, repeats):
        bare, watched, quiet, guarded = runs["bare"], runs["defaults"], runs["no_state_files"], runs["guarded"]
        result["h5py"] = watched["h5py"]
        result["fork"].append(watched["fork_ns"] / bare["fork_ns"])
        result["pool"].append(watched["pool_ns"] / bare["pool_ns"])
        result["fork_no_state_files"].append(quiet["fork_ns"] / bare["fork_ns"])
        result["pool_no_state_files"].append(quiet["pool_ns"] / bare["pool_ns"])
        result["worst_fork_ms"].append(watched["fork_max_ns"] / 1e6)
        result["bare_fork_ms"].append(bare["fork_ns"] / 1e6)
        result["watched_fork_ms"].append(watched["fork_ns"] / 1e6)
        result["bare_pool_ms"].append(bare["pool_ns"] / 1e6)
        result["watched_pool_ms"].append(watched["pool_ns"] / 1e6)
        if "fork_ns" in guarded:
            result["fork_over_guarded"].append(watched["fork_ns"] / guarded["fork_ns"])
            result["pool_over_guarded"].append(watched["pool_ns"] / guarded["pool_ns"])
            result["guarded_pool_ms"].append(guarded["pool_ns"] / 1e6)
    return result


# --steps: (side, what it keeps of h5watch's fork steps).
STEPS = (
    ("bare", "bare"),
    ("cut_all", "none: no wait for phil, none of the fork guard's steps in the child"),
    ("cut_child", "the parent's; a child that only gives back what the fork took"),
    ("cut_spin", "the parent's; a child that spins 3 ms in place of its hooks"),
    ("no_state_files", "all, state files off"),
    ("defaults", "all, state files on (the defaults)"),
    ("guarded", "bare with h5py 3.14's guard"),
)


def measure_steps(python: str, repeats: int) -> dict[str, list[float]]:
    """Pool start over bare per side of STEPS, each repeat's sides in turn (rotated)."""
    sides = [side for side, _ in STEPS]
    ratios: dict[str, list[float]] = {side: [] for side in sides}
    for runs in rounds(python, sides, repeats):
        for side in sides:
            if "pool_ns" in runs[side]:
                ratios[side].append(runs[side]["pool_ns"] / runs["bare"]["pool_ns"])
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--steps", action="store_true", help="where the pool start's time goes (see above)")
    args = parser.parse_args()
    if args.steps:
        ratios = measure_steps(args.python, args.repeats)
        if args.json:
            print(json.dumps(ratios))
            return
        for side, label in STEPS:
            if ratios[side]:
                print(f"pool start / bare, {label}: median {statistics.median(ratios[side]):.3f}")
        return
    result = measure(args.python, args.repeats)
    if args.json:
        print(json.dumps(result))
        return
    for key in ("fork", "pool", "fork_no_state_files", "pool_no_state_files", "fork_over_guarded", "pool_over_guarded"):
        values = result[key]
        if not values:
            continue
        print(f"h5py {result['h5py']} {key}: min {min(values):.3f} median {statistics.median(values):.3f} max {max(values):.3f}")
    print(f"worst single fork instrumented: {max(result['worst_fork_ms']):.1f} ms")


if __name__ == "__main__":
    main()
