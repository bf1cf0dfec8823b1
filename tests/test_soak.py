"""The churn soak: workers on a WatchedLock and on h5py's phil, killed at random
by SIGKILL and SIGTERM, while the daemon is restarted by SIGTERM and SIGKILL;
the daemon's final totals equal what the workers counted themselves, and no
counter ever goes down between two scrapes.

About two minutes by default; H5WATCH_SOAK_SECONDS lengthens it. Run with
``-s`` to see the figures.

The oracle, and why it is exact:

- 'app.exact' and forks: each worker makes a random, known number K of
  acquisitions of 'app.exact' and F forks first, then marks them final in its
  journal (a small file it maps shared: what it stores survives its death,
  SIGKILL included). It is signalled only after that mark, at a random
  moment (at once, or while its threads churn), and never touches
  'app.exact' again, so sum(K) and sum(F) are exact whatever kills it. The
  daemon's totals must equal them.
- 'app.churn': threads acquire it in a loop until the worker dies. Each
  thread stores "begun" before it acquires and "done" once it holds the
  lock, so for a worker killed mid-run h5watch counted between done and
  begun (at most one apart per thread): the total must lie in
  [sum(done), sum(begun)], a bracket of at most one per killed thread, and
  exact for the workers told to stop (they exit normally).
- 'h5py.phil': no outside oracle (h5py takes it an unknown number of times
  per read); it is checked for never going down, like every counter.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import REPO
from daemon_support import H5WATCH, DaemonProcess, kill_group, wait_for

SOAK_SECONDS = float(os.environ.get("H5WATCH_SOAK_SECONDS", "90"))
CONCURRENT_WORKERS = 3
THREADS_PER_WORKER = 2
SCRAPE_EVERY = 0.5
WORKLOAD = "soak"
CHURN_WORKER = str(REPO / "tests" / "scenarios" / "churn_worker.py")
LOCK_COUNTERS = ("h5watch_lock_", "h5watch_forks", "h5watch_fork_wait_seconds", "h5watch_orphaned_locks")
COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")
WORD = struct.Struct("<Q")


@dataclass
class Worker:
    index: int
    proc: subprocess.Popen
    directory: Path
    journal: Path
    k: int
    forks: int
    started: float
    fate: str = ""  # SIGKILL, SIGTERM or stop, chosen once its exact part is final
    act_at: float = 0.0
    acted: bool = False
    returncode: int | None = None
    counts: dict = field(default_factory=dict)

    def journal_words(self) -> list[int]:
        try:
            raw = self.journal.read_bytes()
        except FileNotFoundError:
            return []
        return [WORD.unpack_from(raw, 8 * i)[0] for i in range(len(raw) // 8)]

    def exact_part_final(self) -> bool:
        words = self.journal_words()
        return len(words) > 2 and words[2] == 1

    def read_counts(self) -> dict:
        words = self.journal_words()
        threads = [(words[8 + 2 * i], words[8 + 2 * i + 1]) for i in range(THREADS_PER_WORKER)]
        # Each thread stores "begun" before "done": anything else means the
        # journal was written by something other than the worker's own code.
        consistent = all(done <= begun <= done + 1 for begun, done in threads)
        return {"exact": words[0], "forks": words[1], "begun": sum(b for b, _ in threads),
                "done": sum(d for _, d in threads), "consistent": consistent, "words": words[: 8 + 2 * THREADS_PER_WORKER]}


def start_worker(state_dir: Path, tmp_path: Path, index: int, rng: random.Random) -> Worker:
    directory = tmp_path / f"worker-{index}"
    directory.mkdir()
    k, forks = rng.randint(500, 3000), rng.randint(0, 2)
    journal = directory / "journal"
    with open(directory / "stderr", "wb") as stderr:
        proc = subprocess.Popen(
            [*H5WATCH, "run", "--state-dir", str(state_dir), "--service", WORKLOAD, "--",
             sys.executable, CHURN_WORKER, str(journal), str(directory), str(k), str(forks), str(THREADS_PER_WORKER)],
            stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True, cwd=REPO,
        )
    return Worker(index, proc, directory, journal, k, forks, time.monotonic())


def lock_counters(daemon: DaemonProcess) -> dict:
    return {key: value for key, value in daemon.samples().items()
            if key[0].startswith(LOCK_COUNTERS) and key[0].endswith(COUNTER_SUFFIXES)}


def decreases(before: dict, after: dict) -> list[str]:
    out = []
    for key, value in before.items():
        now = after.get(key)
        # Sums of seconds are floats: allow for rounding, never for a loss.
        slack = 1e-9 * abs(value) if key[0].endswith("_sum") else 0.0
        if now is None or now < value - slack:
            out.append(f"{key[0]}{dict(key[1])}: {value} -> {now}")
    return out


@pytest.mark.timeout(SOAK_SECONDS + 150)
def test_churn_soak_counts_are_exact_across_kills_and_daemon_restarts(tmp_path):
    rng = random.Random(int(os.environ.get("H5WATCH_SOAK_SEED", str(time.time_ns()))))
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    daemons: list[DaemonProcess] = []
    workers: list[Worker] = []
    scrapes = 0
    dropped: list[str] = []
    restarts = {"SIGTERM": 0, "SIGKILL": 0}

    def start_daemon() -> DaemonProcess:
        daemon = DaemonProcess(state_dir, tmp_path / f"daemon-{len(daemons)}.log", "--scan-interval", "0.3")
        daemons.append(daemon)
        return daemon

    def stop_daemon(daemon: DaemonProcess, how: str) -> None:
        if how == "SIGKILL":
            os.killpg(daemon.proc.pid, signal.SIGKILL)
        daemon.stop()
        restarts[how] += 1

    try:
        daemon: DaemonProcess | None = start_daemon()
        previous: dict | None = None
        started = time.monotonic()
        end = started + SOAK_SECONDS
        # Restarts spread over the run, alternating SIGKILL and SIGTERM, each
        # leaving the dir without a daemon for a moment while workers die.
        n_restarts = max(2, int(SOAK_SECONDS // 15))
        restart_at = [started + SOAK_SECONDS * (i + 1) / (n_restarts + 1) for i in range(n_restarts)]
        restart_how = ["SIGKILL" if i % 2 == 0 else "SIGTERM" for i in range(n_restarts)]
        daemon_back_at = 0.0
        last_scrape = 0.0

        while time.monotonic() < end:
            now = time.monotonic()
            live = [w for w in workers if w.returncode is None]
            while len(live) < CONCURRENT_WORKERS:
                worker = start_worker(state_dir, tmp_path, len(workers), rng)
                workers.append(worker)
                live.append(worker)
            for worker in live:
                code = worker.proc.poll()
                if code is not None:
                    worker.returncode = code
                    assert worker.acted, f"worker {worker.index} died by itself ({code}):\n" \
                        f"{(worker.directory / 'stderr').read_text(errors='replace')[-3000:]}"
                    continue
                if not worker.fate:
                    if worker.exact_part_final():
                        worker.fate = rng.choices(["SIGKILL", "SIGTERM", "stop"], weights=[45, 40, 15])[0]
                        # At once (the exact part not yet on any tick), or mid-churn.
                        delay = rng.choice([0.0, rng.uniform(0.0, 0.5), rng.uniform(0.5, 3.0)])
                        worker.act_at = now + delay
                    elif now - worker.started > 60:
                        raise AssertionError(f"worker {worker.index} not ready after 60 s:\n"
                                             f"{(worker.directory / 'stderr').read_text(errors='replace')[-3000:]}")
                if worker.fate and not worker.acted and now >= worker.act_at:
                    worker.acted = True
                    if worker.fate == "stop":
                        (worker.directory / "stop").touch()
                    else:
                        os.kill(worker.proc.pid, getattr(signal, worker.fate))
            if daemon is not None and restart_at and now >= restart_at[0]:
                restart_at.pop(0)
                stop_daemon(daemon, restart_how.pop(0))
                daemon = None
                daemon_back_at = now + rng.uniform(0.2, 1.5)
            if daemon is None and now >= daemon_back_at:
                daemon = start_daemon()
            if daemon is not None and now - last_scrape >= SCRAPE_EVERY:
                last_scrape = now
                current = lock_counters(daemon)
                scrapes += 1
                if previous is not None:
                    dropped += decreases(previous, current)
                previous = current
            time.sleep(0.05)

        # Wind down: the last workers die the same ways, then everything settles.
        for worker in workers:
            if worker.returncode is None and not worker.acted:
                worker.acted = True
                wait_for(lambda w=worker: w.exact_part_final() or w.proc.poll() is not None, 60,
                         what=f"worker {worker.index}'s exact part")
                worker.fate = worker.fate or rng.choice(["SIGKILL", "SIGTERM", "stop"])
                if worker.fate == "stop":
                    (worker.directory / "stop").touch()
                else:
                    os.kill(worker.proc.pid, getattr(signal, worker.fate))
        for worker in workers:
            if worker.returncode is None:
                worker.returncode = worker.proc.wait(30)
        expected_codes = {"SIGKILL": -signal.SIGKILL, "SIGTERM": -signal.SIGTERM, "stop": 0}
        wrong = [(w.index, w.fate, w.returncode) for w in workers if w.returncode != expected_codes[w.fate]]
        assert not wrong, f"workers that did not end as told: {wrong[:10]}"
        for worker in workers:
            worker.counts = worker.read_counts()
            assert worker.counts["exact"] == worker.k and worker.counts["forks"] == worker.forks

        # A last restart by SIGKILL: the final totals come from the persisted
        # totals and whatever the dead workers left, read by a fresh daemon.
        if daemon is None:
            daemon = start_daemon()
        wait_for(lambda: daemon.value("h5watch_processes", workload=WORKLOAD, state="ok")
                 + daemon.value("h5watch_processes", workload=WORKLOAD, state="stuck") == 0, 30,
                 what="no live soak worker left in the daemon's view")
        dropped += decreases(previous or {}, lock_counters(daemon))
        previous = lock_counters(daemon)
        stop_daemon(daemon, "SIGKILL")
        daemon = start_daemon()
        time.sleep(1)  # a few scans: anything folded twice would show now
        final = lock_counters(daemon)
        dropped += decreases(previous, final)

        def exported(name: str, **labels: str) -> float:
            wanted = {"workload": WORKLOAD, **labels}
            return sum(v for (n, have), v in final.items() if n == name and all(dict(have).get(a) == b for a, b in wanted.items()))

        expected_exact = sum(w.k for w in workers)
        expected_forks = sum(w.forks for w in workers)
        churn_low = sum(w.counts["done"] for w in workers)
        churn_high = sum(w.counts["begun"] for w in workers)
        figures = {
            "seconds": SOAK_SECONDS,
            "workers": len(workers),
            "worker forks": expected_forks,
            "SIGKILLed workers": sum(w.fate == "SIGKILL" for w in workers),
            "SIGTERMed workers": sum(w.fate == "SIGTERM" for w in workers),
            "workers that exited normally": sum(w.fate == "stop" for w in workers),
            "daemon restarts by SIGTERM": restarts["SIGTERM"],
            "daemon restarts by SIGKILL": restarts["SIGKILL"],
            "scrapes": scrapes,
            "app.exact expected": expected_exact,
            "app.exact exported": exported("h5watch_lock_acquisitions_total", lock="app.exact"),
            "app.exact holds exported": exported("h5watch_lock_hold_seconds_count", lock="app.exact"),
            "forks exported": exported("h5watch_forks_total"),
            "app.churn counted by the workers": f"[{churn_low}, {churn_high}]",
            "app.churn exported": exported("h5watch_lock_acquisitions_total", lock="app.churn"),
            "h5py.phil exported": exported("h5watch_lock_acquisitions_total", lock="h5py.phil"),
            "counter decreases between scrapes": len(dropped),
            "inconsistent worker journals": sum(not w.counts["consistent"] for w in workers),
        }
        print("\nchurn soak:")
        for name, value in figures.items():
            print(f"  {name}: {value:,}" if isinstance(value, (int, float)) else f"  {name}: {value}")

        broken = [(w.index, w.fate, w.counts["words"]) for w in workers if not w.counts["consistent"]]
        assert not broken, f"journals not written as the worker writes them (stray writes?): {broken[:5]}"
        assert not dropped, f"{len(dropped)} counter decreases between scrapes, first: {dropped[:10]}"
        assert figures["app.exact exported"] == expected_exact
        assert figures["app.exact holds exported"] == expected_exact
        assert figures["forks exported"] == expected_forks
        assert churn_low <= figures["app.churn exported"] <= churn_high
        assert figures["h5py.phil exported"] > 0
        assert restarts["SIGKILL"] >= 2 and restarts["SIGTERM"] >= 1
    finally:
        for worker in workers:
            kill_group(worker.proc)
        for daemon_ in daemons:
            daemon_.stop()
