"""A pytest plugin that installs h5watch before h5py is imported, for h5py's own suite.

Loaded with ``-p h5watch_pytest_plugin`` (tests/ on PYTHONPATH). At the end of
the session it writes what h5watch saw to ``$H5WATCH_SUITE_REPORT``.
"""

from __future__ import annotations

import json
import os

import h5watch

h5watch.install(log_format="json")


def pytest_sessionfinish(session, exitstatus):
    report = os.environ.get("H5WATCH_SUITE_REPORT")
    if not report:
        return
    snap = h5watch.snapshot()
    phil = snap["locks"].get("h5py.phil", {})
    with open(report, "w") as f:
        json.dump(
            {
                "coverage": snap["h5py"]["coverage"],
                "acquisitions": phil.get("stats", {}).get("acquisitions", 0),
                "probe_enabled": snap["h5py"]["probe"]["enabled"],
                "deadlocks": snap["watchdog"]["deadlocks"],
                "order_inversions": snap["lock_order"]["inversions"],
            },
            f,
        )
