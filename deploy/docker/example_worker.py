"""Example instrumented service for deploy/docker-compose.yml.

Reader threads share one HDF5 file, so they contend for h5py's lock; a slow
reader holds it longer now and then; every 30 s the main thread forks a child
that reads the file too. Options come from the H5WATCH_* environment.
"""

from __future__ import annotations

import os
import threading
import time

import h5watch

h5watch.install()

import h5py  # noqa: E402  (after install: every use of h5py's lock is watched)
import numpy as np  # noqa: E402

PATH = os.environ.get("EXAMPLE_FILE", "/tmp/example.h5")


def make_file() -> None:
    with h5py.File(PATH, "w") as f:
        f["values"] = np.random.default_rng(0).random((500, 500))


def reader(pause_seconds: float) -> None:
    while True:
        with h5py.File(PATH, "r") as f:
            f["values"][:]
        time.sleep(pause_seconds)


def main() -> None:
    make_file()
    for index in range(4):
        threading.Thread(target=reader, args=(0.01 * (index + 1),), name=f"reader-{index}", daemon=True).start()
    while True:
        time.sleep(30)
        pid = os.fork()
        if pid == 0:
            with h5py.File(PATH, "r") as f:
                f["values"][:10]
            os._exit(0)
        os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
