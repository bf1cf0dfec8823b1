"""Who holds the lock, seen by the wrapper and by the probe; h5py coverage."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest
from conftest import run_python

pytestmark = pytest.mark.timeout(60)


def test_holder_and_waiters_during_a_hold(lock_class):
    lock = lock_class("test.identity")
    inside, leave = threading.Event(), threading.Event()

    def work():
        lock.acquire_for("Catalog.refresh")
        inside.set()
        leave.wait(10)
        lock.release()

    holder = threading.Thread(target=work, name="refresher")
    holder.start()
    inside.wait(5)
    waiter = threading.Thread(target=lambda: lock.acquire() and lock.release(), name="reader-7")
    waiter.start()
    time.sleep(0.1)
    try:
        snap = lock.snapshot()
        who = snap["holder"]
        assert who["pid"] == os.getpid()
        assert who["thread_name"] == "refresher" and who["thread_ident"] == holder.ident
        assert who["native_id"] == holder.native_id
        assert who["operation"] == "Catalog.refresh"
        assert who["hold_age_seconds"] >= 0.1 and who["depth"] == 1
        assert time.monotonic_ns() - who["since_ns"] >= 0.1e9
        [waiting] = snap["waiters"]
        assert waiting["thread_name"] == "reader-7" and waiting["wait_seconds"] >= 0.05
    finally:
        leave.set()
        holder.join(5)
        waiter.join(5)
    assert lock.snapshot()["holder"] is None and lock.snapshot()["waiters"] == []


def test_h5py_phil_holder_operation_and_probe_agree(tmp_path):
    result = run_python(
        f"""
        import io, json, threading, time
        import h5watch
        h5watch.install(state_files=False)
        import h5py, numpy

        class SlowFile(io.BytesIO):
            def readinto(self, buffer):
                time.sleep(0.05)  # a slow read, inside h5py, holding phil
                return io.BytesIO.readinto(self, buffer)

        path = {str(tmp_path / "x.h5")!r}
        with h5py.File(path, "w") as f:
            f["values"] = numpy.arange(100000.0)
        data = open(path, "rb").read()
        stop = threading.Event()

        def reader():
            while not stop.is_set():
                with h5py.File(SlowFile(data), "r") as f:
                    f["values"][:]

        thread = threading.Thread(target=reader, name="slow-reader", daemon=True)
        thread.start()
        seen = None
        deadline = time.monotonic() + 10
        while seen is None and time.monotonic() < deadline:
            snap = h5watch.snapshot()
            phil = snap["locks"]["h5py.phil"]
            holder = phil["holder"]
            # Inside a @with_phil function (not a bare "with phil:" block): the operation is known.
            if holder and holder["thread_name"] == "slow-reader" and holder["operation"]:
                seen = {{"holder": phil["holder"], "probe": phil["probe"]}}
        stop.set()
        thread.join(10)
        free = h5watch.snapshot()["locks"]["h5py.phil"]
        print(json.dumps({{"seen": seen, "ident": thread.ident, "free_probe": free["probe"],
                          "coverage": h5watch.snapshot()["h5py"]["coverage"]}}))
        """,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["coverage"] == "full"
    seen = report["seen"]
    assert seen is not None, "never saw slow-reader holding phil"
    assert seen["holder"]["thread_ident"] == report["ident"]
    assert "." in seen["holder"]["operation"]  # a qualified name, such as Dataset.__getitem__
    probe = seen["probe"]
    assert probe["enabled"] is True
    # The probe read the real FastRLock a moment later: same owner, or already free again.
    assert probe["owner_ident"] in (report["ident"], None)
    assert report["free_probe"]["owner_ident"] is None and report["free_probe"]["count"] == 0


def test_probe_agrees_while_a_thread_holds_phil():
    result = run_python(
        """
        import json, threading
        import h5watch
        h5watch.install(state_files=False)
        import h5py
        inside, leave = threading.Event(), threading.Event()
        def hold():
            with h5py._objects.phil:
                with h5py._objects.phil:
                    inside.set()
                    leave.wait(10)
        thread = threading.Thread(target=hold, name="phil-holder")
        thread.start()
        inside.wait(10)
        phil = h5watch.snapshot()["locks"]["h5py.phil"]
        leave.set()
        thread.join(10)
        print(json.dumps({"holder": phil["holder"], "probe": phil["probe"], "ident": thread.ident}))
        """,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["holder"]["thread_name"] == "phil-holder" and report["holder"]["depth"] == 2
    assert report["probe"]["owner_ident"] == report["ident"] == report["holder"]["thread_ident"]
    assert report["probe"]["count"] == 1  # the wrapper holds the real phil once, underneath


def test_late_install_is_partial_and_logged_and_idempotent_across_threads(tmp_path):
    result = run_python(
        f"""
        import json, threading
        import h5py, numpy
        import h5watch
        threads = [threading.Thread(target=h5watch.install, kwargs={{"state_files": False}}) for _ in range(8)]
        for t in threads: t.start()
        for t in threads: t.join()
        h5watch.install(state_files=False)
        with h5py.File({str(tmp_path / "late.h5")!r}, "w") as f:
            f["v"] = numpy.arange(10)
            assert list(f["v"][:3]) == [0, 1, 2]
        snap = h5watch.snapshot()
        print(json.dumps({{"coverage": snap["h5py"]["coverage"], "acq": snap["locks"]["h5py.phil"]["stats"]["acquisitions"],
                          "watchdogs": sum(t.name == "h5watch-watchdog" for t in threading.enumerate())}}))
        """,
        timeout=60,
        env={"H5WATCH_LOG_LEVEL": "info"},  # h5watch.installed is an info event
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["coverage"] == "partial" and report["acq"] > 0 and report["watchdogs"] == 1
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    partial = [e for e in events if e.get("coverage") == "partial" and e.get("level") == "warning"]
    assert partial, result.stderr
    assert sum(e["event"] == "h5watch.installed" for e in events) == 1
