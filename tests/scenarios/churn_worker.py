"""A worker of the churn soak; run under ``h5watch run`` (h5watch installed at start-up).

Usage: churn_worker.py JOURNAL DIR K F THREADS

It keeps its own count of everything it does in JOURNAL, a small file it
maps shared: a store into it is in the page cache the moment it is made,
so it survives any death of this process (SIGKILL included) without a
write(2) per acquisition. Layout (little-endian u64 words):

  word 0  K: acquisitions of 'app.exact' (all made before word 2 is set)
  word 1  F: forks made (all before word 2 is set)
  word 2  1 once words 0 and 1 are final: from then on, killing this
          process cannot change what it counted on 'app.exact' or in forks
  word 8 + 2i, 8 + 2i + 1: thread i's 'app.churn' acquisitions begun and done

Phases: F forks (each child exits at once), K acquisitions of 'app.exact',
then THREADS threads loop on 'app.churn' (an h5py read under it every
fourth time, so h5py's phil churns too) until DIR/stop exists; then exit 0.
A thread stores "begun" before it acquires and "done" once it holds the
lock, so whatever moment kills it, h5watch counted between done and begun.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import time

import h5watch

assert h5watch.is_installed(), "run me under 'h5watch run'"

import h5py
import numpy as np

journal_path, directory = sys.argv[1], sys.argv[2]
k, forks, n_threads = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
JOURNAL_BYTES = 4096

fd = os.open(journal_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
os.ftruncate(fd, JOURNAL_BYTES)
journal = mmap.mmap(fd, JOURNAL_BYTES, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
os.close(fd)
# One 8-byte store per update (struct.pack_into would zero the word first,
# and a SIGKILL between the two stores would leave a 0 behind).
words = memoryview(journal).cast("Q")

for _ in range(forks):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

exact = h5watch.WatchedLock("app.exact")
for _ in range(k):
    with exact:
        pass
words[0] = k
words[1] = forks
words[2] = 1

data_path = os.path.join(directory, f"data-{os.getpid()}.h5")
with h5py.File(data_path, "w") as f:
    f["values"] = np.arange(64.0)
data = h5py.File(data_path, "r")
dataset = data["values"]
churn = h5watch.WatchedLock("app.churn")
stop = threading.Event()


def run(i: int) -> None:
    begun_at, done_at = 8 + 2 * i, 8 + 2 * i + 1
    begun = done = 0
    while not stop.is_set():
        begun += 1
        words[begun_at] = begun
        with churn:
            done += 1
            words[done_at] = done
            if done % 4 == 0:
                dataset[:8]


threads = [threading.Thread(target=run, args=(i,), name=f"churn-{i}") for i in range(n_threads)]
for thread in threads:
    thread.start()
stop_path = os.path.join(directory, "stop")
deadline = time.monotonic() + 300
while not os.path.exists(stop_path) and time.monotonic() < deadline:
    time.sleep(0.02)
stop.set()
for thread in threads:
    thread.join()
data.close()
sys.exit(0)
