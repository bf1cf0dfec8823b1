"""F2: a thread inside a slow Python file-like object holds phil while the main thread forks.

Prints one JSON line: how long os.fork() took to return and the child's exit code.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time

import h5watch

h5watch.install(fork_timeout=1, state_files=False)

import h5py
import numpy as np

buffer = io.BytesIO()
with h5py.File(buffer, "w") as f:
    f["values"] = np.arange(100.0)
image = buffer.getvalue()


class SlowFile(io.BytesIO):
    slept = False

    def slow_readinto(self, target):
        if not self.slept:
            self.slept = True
            time.sleep(3)
        return io.BytesIO.readinto(self, target)

    def readinto(self, target):
        return self.slow_readinto(target)


started = threading.Event()


def slow_open() -> None:
    started.set()
    with h5py.File(SlowFile(image), "r") as f:
        f["values"][:]


reader = threading.Thread(target=slow_open, name="slow-fileobj-reader")
reader.start()
started.wait()
deadline = time.monotonic() + 5
while h5watch.snapshot()["locks"]["h5py.phil"]["holder"] is None and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.2)
begin = time.monotonic()
pid = os.fork()
if pid == 0:
    with h5py.File(io.BytesIO(image), "r") as f:
        f["values"][:]
    os._exit(0)
fork_seconds = time.monotonic() - begin
code = None
deadline = time.monotonic() + 10
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        code = os.waitstatus_to_exitcode(status)
        break
    time.sleep(0.02)
if code is None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
reader.join(20)
print(json.dumps({"fork_seconds": fork_seconds, "child_exit": code, "h5py": h5py.__version__}), flush=True)
