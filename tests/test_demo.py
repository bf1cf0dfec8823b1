"""``h5watch demo``, the real thing on its defaults: what a newcomer reads.

It is run the way the README's quick start runs it, from a checkout of the
sources (here a copy of the package without its compiled core, as a fresh
clone is), through the installed ``h5watch`` command.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_command, run_python

pytestmark = pytest.mark.timeout(180)

H5WATCH = Path(sys.executable).with_name("h5watch")
JARGON = [r"\bseed\b", r"\bworkload\b(?!\")", r"\bprobe", r"\bF[123]\b", r"at-fork", r"\bhooks?\b"]


def run_demo(cwd: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return run_command([str(H5WATCH), "demo", *args], timeout=timeout, what="h5watch demo", cwd=cwd)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The installed h5watch, as an interpreter started outside any checkout sees it."""
    neutral = tmp_path_factory.mktemp("neutral")
    result = run_python(
        """
        import json, os
        import h5watch
        from h5watch.process import implementation
        print(json.dumps({"path": os.path.dirname(os.path.abspath(h5watch.__file__)),
                          "implementation": implementation.NAME}))
        """,
        cwd=neutral,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, str] = json.loads(result.stdout)
    return found


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, installed: dict[str, str]) -> str:
    """The output of ``h5watch demo`` started in a fresh clone's root."""
    if not H5WATCH.exists():
        pytest.skip(f"no h5watch command next to {sys.executable}")
    checkout = tmp_path_factory.mktemp("checkout")
    shutil.copytree(REPO / "h5watch", checkout / "h5watch",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    result = run_demo(checkout)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip(), result.stderr[-3000:]
    return result.stdout


def test_every_line_fits_in_100_columns(demo):
    wide = [line for line in demo.splitlines() if len(line) > 100]
    assert not wide, wide


def test_it_speaks_plain_words(demo):
    assert "one thread at a time" in demo
    for pattern in JARGON:
        assert not re.search(pattern, demo, re.IGNORECASE), pattern


def test_a_progress_line_for_each_program(demo):
    starts = re.findall(r"^\[(\d)/5\] ", demo, re.MULTILINE)
    assert starts == ["1", "2", "3", "4", "5"]
    assert len(re.findall(r"^ +without h5watch \.+ ", demo, re.MULTILINE)) == 4
    assert len(re.findall(r"^ +with h5watch \.+ ", demo, re.MULTILINE)) == 5


def test_the_header_names_the_h5watch_its_programs_ran(demo, installed):
    text = " ".join(line.strip() for line in demo.splitlines())
    header = re.search(r"under h5watch \S+ \((compiled|pure-Python) lock core.*?\), from (\S+)\.(?: |$)", text)
    assert header, demo[:3000]
    implementation = "compiled" if header.group(1) == "compiled" else "python"
    assert (implementation, header.group(2)) == (installed["implementation"], installed["path"])
    assert "Note: a program ran" not in demo


def test_quantiles_never_exceed_the_max_beside_them(demo):
    rows = re.findall(r"^ +(waits|holds) +([\d.]+) +([\d.]+) +([\d.]+)$", demo, re.MULTILINE)
    assert [row[0] for row in rows] == ["waits", "holds"], demo
    for _, p50, p99, largest in rows:
        assert float(p50) <= float(p99) <= float(largest)


def test_the_evidence_shown_is_a_real_event_trimmed(demo):
    lines = demo.splitlines()
    start = lines.index("{")
    end = lines.index("}", start)
    event = json.loads("\n".join(lines[start:end + 1]))
    assert event["event"] == "lock.hold_timeout" and event["lock"] == "h5py.phil"
    assert event["level"] == "error" and event["workload"] == "demo" and event["timeout"] == 0.3
    assert not {"timestamp", "logger"} & set(event), "trimmed: the event's bookkeeping is left out"
    holder = event["holder"]
    assert holder["thread_name"] == "stuck-holder" and holder["hold_age_seconds"] >= 0.3
    assert not {"thread_ident", "native_id", "since_ns"} & set(holder)
    assert len(holder["stack"]) <= 3 and "in keep_the_lock" in holder["stack"][-1]
    assert [waiter["thread_name"] for waiter in event["waiters"]] == ["MainThread"]
    assert end - start < 40


def test_each_result_says_what_it_means(demo):
    assert demo.count("What it means: ") == 5
    fork_from_c = demo[demo.index("[2/5]"):demo.index("[3/5]")]
    assert "would have hung forever" in fork_from_c
    assert re.search(r"exited at once \(code 70\), naming that thread", " ".join(fork_from_c.split()))
    assert re.search(r"the first named 'reader-\d'", " ".join(fork_from_c.split()))
    assert "Try it on your own program:" in demo and "h5watch run --hold-timeout 30 -- python" in demo


def test_the_deadlock_is_silent_without_h5watch_and_named_with_it(demo):
    deadlock = " ".join(demo[demo.index("[5/5]"):demo.index("What h5watch logged")].split())
    assert "without h5watch . the reader never finished; nothing said why" in deadlock
    assert "h5watch logged lock.deadlock (kind gc_under_phil)" in deadlock and "with no timeout set" in deadlock
    assert "thread 'reader' holds h5py's phil in h5py._hl.files.File.__init__" in deadlock, deadlock
    assert "'io' is in garbage collection freeing an h5py object and waits for phil" in deadlock


def test_it_is_short(demo):
    took = re.search(r"^\(The demo took ([\d.]+) s\.\)$", demo, re.MULTILINE)
    assert took and float(took.group(1)) < 45  # about 12 s on 2 busy cores


def test_its_programs_run_bare_or_as_described_whatever_the_environment(tmp_path, monkeypatch):
    from h5watch.cli.run import bootstrap_dir
    from h5watch.demo.scenarios import run_scenario

    # As under ``h5watch run -- h5watch demo``, with variables that would change what it shows.
    monkeypatch.setenv("PYTHONPATH", bootstrap_dir())
    monkeypatch.setenv("H5WATCH_LOG_FORMAT", "console")
    monkeypatch.setenv("H5WATCH_LOG_LEVEL", "critical")
    bare = run_scenario("stuck_holder", False, str(tmp_path))
    assert "implementation" not in bare.result["about"] and bare.events == [], bare
    watched = run_scenario("stuck_holder", True, str(tmp_path))
    assert [event["event"] for event in watched.events] == ["lock.hold_timeout"], watched
