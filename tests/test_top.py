"""``h5watch top`` on real workers: in a real terminal (a tmux pane, read
with capture-pane, driven with send-keys), and its plain table through a
pipe; bad input is one line and exit 2."""

from __future__ import annotations

import os
import re
import selectors
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from daemon_support import H5WATCH, read_json_line, wait_for

from h5watch.host.top import PLAIN_WIDTH, Sampler, operations_text, render_plain
from h5watch.schema import BUCKET_BOUNDS_SECONDS, N_BUCKETS

pytestmark = pytest.mark.timeout(120)

# A Python in which rich cannot be imported, running the h5watch command.
NO_RICH = [sys.executable, "-c", "import sys; sys.modules['rich'] = None; from h5watch.cli import main; sys.exit(main())"]


def top(*args: str, command: list[str] = H5WATCH) -> subprocess.CompletedProcess:
    return subprocess.run([*command, "top", *args], capture_output=True, text=True, timeout=30, cwd=REPO,
                          stdin=subprocess.DEVNULL)


def busy_and_crowd(state_dir: Path, workers) -> tuple[int, int]:
    """A worker whose lock three threads take in turn (contended, at a
    steady rate), and one whose lock is held forever with six waiters."""
    busy = read_json_line(workers(state_dir, "busy", "-", "3", service="busy"))["pid"]
    crowd = read_json_line(workers(state_dir, "crowd", "-", "6", service="crowd"))["pid"]
    return busy, crowd


def rows(frame: str) -> dict[int, list[str]]:
    """Each process's lines of a plain frame: its row and the lines under it."""
    out: dict[int, list[str]] = {}
    current = None
    for line in frame.splitlines():
        match = re.match(r"^[ !] ( {0,6}\d+) ", line)  # the PID column: 7 wide after the mark
        if match and len(match.group(1)) != 7:
            match = None
        if match:
            current = out.setdefault(int(match.group(1)), [])
        if current is not None and line.strip():
            current.append(line)
    return out


def app_numbers(lines: list[str]) -> dict[str, str]:
    [row] = [line for line in lines if re.search(r"\bapp\.x\s", line) and "top by hold time" not in line]
    values = row.split("app.x", 1)[1].split()
    return dict(zip(["rate", "contention", "wait_p50", "wait_p99", "hold_p50", "hold_p99"], values))


# -- the plain table, through a pipe ------------------------------------------------


def read_frames(proc: subprocess.Popen, count: int, timeout: float) -> list[str]:
    """The first ``count`` frames a plain ``h5watch top`` prints (each
    starts with its headline); the process is killed on timeout."""
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    text = ""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        frames = re.split(r"^(?=h5watch top: )", text, flags=re.MULTILINE)[1:]
        # A frame is whole once the next one starts.
        if len(frames) > count:
            return frames[:count]
        if selector.select(timeout=0.1):
            line = proc.stdout.readline()
            if not line:
                break
            text += line
    proc.kill()
    raise AssertionError(f"no {count} frames in {timeout} s:\n{text}\n{proc.stderr.read()}")


def test_the_plain_table_through_a_pipe_shows_holders_waiters_and_rates(state_dir, workers):
    busy, crowd = busy_and_crowd(state_dir, workers)
    proc = subprocess.Popen([*H5WATCH, "top", "--state-dir", str(state_dir), "--interval", "0.5"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        first, second = read_frames(proc, 2, 30)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "rates since each process started; sort: waiting" in first
    assert re.search(r"rates over 0\.\d+s; sort: waiting", second), second
    assert "\x1b" not in first + second  # no escape codes in a pipe
    for frame in (first, second):
        assert max(len(line) for line in frame.splitlines()) <= PLAIN_WIDTH, frame
        processes = rows(frame)
        assert list(processes) == [crowd, busy], frame  # six waiters sort first
        crowd_text = " ".join(" ".join(processes[crowd]).split())
        assert "held by crowd-holder for" in crowd_text
        assert "6 waiting: waiter-0, waiter-1, waiter-2, waiter-3, +2 more; oldest" in crowd_text
        busy_app = app_numbers(processes[busy])
        assert float(busy_app["rate"]) > 0 and busy_app["contention"] not in ("-", "0.0%"), frame
    # Over the interval: three threads holding it 2 ms each in turn, hundreds
    # a second (at most 500), many of them contended, the holds' median a few ms.
    busy_app = app_numbers(rows(second)[busy])
    assert 50 < float(busy_app["rate"]) <= 550, second
    assert busy_app["contention"].endswith("%") and float(busy_app["contention"][:-1]) > 5, second
    assert busy_app["hold_p50"].endswith("ms") and 1 <= float(busy_app["hold_p50"][:-2]) <= 50, second
    assert busy_app["wait_p50"] != "-" and busy_app["wait_p99"] != "-", second
    # Who holds it: the busy threads' plain acquisitions count under the lock's name.
    assert any(re.search(r"top by hold time: app\.x [\d.]+m?s \(\d+ holds", line) for line in rows(second)[busy]), second
    # Over the interval the crowd's lock was taken by nobody: no rate, no share of nothing.
    assert app_numbers(rows(second)[crowd])["rate"] == "0.0"
    assert app_numbers(rows(second)[crowd])["contention"] == "-"


def test_once_prints_one_table_and_needs_no_rich(state_dir, workers):
    busy, crowd = busy_and_crowd(state_dir, workers)
    result = top("--state-dir", str(state_dir), "--once", "--sort", "pid", command=NO_RICH)
    assert result.returncode == 0 and result.stderr == "", result
    assert result.stdout.count("h5watch top: ") == 1
    assert "2 live processes, 0 stuck; rates since each process started; sort: pid" in result.stdout
    assert list(rows(result.stdout)) == sorted([busy, crowd])
    assert float(app_numbers(rows(result.stdout)[busy])["rate"]) > 0


def test_an_empty_state_dir_is_a_table_that_says_so(state_dir):
    result = top("--state-dir", str(state_dir), "--once")
    assert result.returncode == 0, result
    assert "0 live processes" in result.stdout and "no live instrumented processes" in result.stdout


# -- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("interval", ["abc", "0", "-1", "nan", "inf", ""])
def test_a_bad_interval_is_one_line_exit_2(state_dir, interval):
    result = top("--state-dir", str(state_dir), "--interval", interval)
    assert result.returncode == 2, result
    assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "--interval" in result.stderr


@pytest.mark.parametrize("make", ["missing", "file"])
def test_a_state_dir_that_is_no_directory_is_one_line_exit_2(tmp_path, make):
    target = tmp_path / "typo"
    if make == "file":
        target.write_text("")
    for args in ((), ("--once",)):
        result = top("--state-dir", str(target), *args)
        assert result.returncode == 2, result
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
        assert str(target) in result.stderr


def test_the_keys_are_in_the_help():
    result = top("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for words in ("w sorts by waiters", "h sorts by the current hold's age", "a sorts by acquisitions per second",
                  "p sorts by process id", "q quits"):
        assert words in text, text


# -- a real terminal: tmux -------------------------------------------------------------


def tmux_path() -> str:
    """tmux: skipped without it, unless under CI, where it is required."""
    path = shutil.which("tmux")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("tmux is not on PATH but CI is set (install Debian's tmux package)")
    pytest.skip("tmux is not on PATH (install Debian's tmux package)")


class Pane:
    """One tmux session on a server of its own, running ``script`` in sh."""

    def __init__(self, tmp_path: Path, script: str) -> None:
        self.base = [tmux_path(), "-S", str(tmp_path / "tmux.sock"), "-f", os.devnull]
        self.tmux("new-session", "-d", "-s", "top", "-x", "200", "-y", "40", "-c", str(REPO), "sh", "-c", script)

    def tmux(self, *args: str) -> str:
        # os.environ as Python read it at start: readline, once imported,
        # exports its own COLUMNS and LINES, which would fix the pane's program at 80x24.
        return subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=10, check=True,
                              env=dict(os.environ)).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_screen(self, predicate, what: str, timeout: float = 20) -> str:
        last = [""]

        def check() -> str | None:
            last[0] = self.screen()
            return last[0] if predicate(last[0]) else None

        try:
            return wait_for(check, timeout, interval=0.1, what=what)
        except AssertionError as exc:
            size = self.tmux("display", "-p", "-t", "top", "#{window_width}x#{window_height} #{pane_width}x#{pane_height}")
            raise AssertionError(f"{exc}; the screen ({size.strip()}):\n{last[0]}") from None

    def close(self) -> None:
        subprocess.run([*self.base, "kill-server"], capture_output=True, timeout=10)


@pytest.fixture
def pane(tmp_path):
    opened: list[Pane] = []

    def open_pane(script: str) -> Pane:
        opened.append(Pane(tmp_path, script))
        return opened[-1]

    yield open_pane
    for each in opened:
        each.close()


def order(screen: str) -> list[int]:
    """The pids of the live view's process rows, top to bottom."""
    return [int(m.group(1)) for m in re.finditer(r"^\s*(\d+)\s+(?:busy|crowd)\s", screen, flags=re.MULTILINE)]


def test_top_in_a_real_terminal_sorts_by_key_and_quits_with_q(state_dir, workers, pane, tmp_path):
    busy, crowd = busy_and_crowd(state_dir, workers)
    command = shlex.join([*H5WATCH, "top", "--state-dir", str(state_dir), "--interval", "0.5"])
    before, after, rc = (tmp_path / name for name in ("stty-before", "stty-after", "rc"))
    terminal = pane(f"stty -g > {before}; {command}; echo $? > {rc}; stty -g > {after}; echo top ended; sleep 600")
    screen = terminal.wait_screen(lambda s: "sort: waiting" in s and "rates over" in s and len(order(s)) == 2,
                                  "the live view of both workers, refreshed once")
    assert order(screen) == [crowd, busy], screen  # six waiters first
    assert "keys: w waiting  h hold  a rate  p pid  q quit" in screen
    assert "crowd-holder for" in screen and "6 waiting: waiter-0, waiter-1, waiter-2," in screen
    assert re.search(rf"^\s*{busy}\s+busy\s+ok\s+app\.x\s+\d+\s+\d+\.\d%", screen, flags=re.MULTILINE), screen
    assert terminal.tmux("display", "-p", "-t", "top", "#{alternate_on}").strip() == "1"  # drawn in place

    terminal.tmux("send-keys", "-t", "top", "a")
    screen = terminal.wait_screen(lambda s: "sort: rate" in s and order(s) == [busy, crowd], "the sort by rate")
    terminal.tmux("send-keys", "-t", "top", "p")
    terminal.wait_screen(lambda s: "sort: pid" in s and order(s) == sorted([busy, crowd]), "the sort by pid")
    terminal.tmux("send-keys", "-t", "top", "w")
    terminal.wait_screen(lambda s: "sort: waiting" in s and order(s) == [crowd, busy], "the sort by waiting again")

    terminal.tmux("send-keys", "-t", "top", "q")
    screen = terminal.wait_screen(lambda s: "top ended" in s, "h5watch top to end on q", timeout=10)
    assert rc.read_text().strip() == "0"
    assert after.read_text() == before.read_text()  # the terminal's settings are back (echo, canonical)
    assert terminal.tmux("display", "-p", "-t", "top", "#{alternate_on} #{cursor_flag}").strip() == "0 1"
    assert "sort:" not in screen  # the normal screen again, as before


def test_ctrl_c_restores_the_terminal_and_exits_0(state_dir, workers, pane, tmp_path):
    busy_and_crowd(state_dir, workers)
    command = shlex.join([*H5WATCH, "top", "--state-dir", str(state_dir)])
    before, after, rc = (tmp_path / name for name in ("stty-before", "stty-after", "rc"))
    # The shell catches Ctrl-C (and carries on); the program it starts gets the default handling back.
    terminal = pane(f"trap true INT; stty -g > {before}; {command}; echo $? > {rc}; stty -g > {after}; echo top ended; "
                    "sleep 600")
    terminal.wait_screen(lambda s: "sort: waiting" in s and len(order(s)) == 2, "the live view")
    terminal.tmux("send-keys", "-t", "top", "C-c")
    terminal.wait_screen(lambda s: "top ended" in s, "h5watch top to end on Ctrl-C", timeout=10)
    assert rc.read_text().strip() == "0"
    assert after.read_text() == before.read_text()
    assert terminal.tmux("display", "-p", "-t", "top", "#{alternate_on} #{cursor_flag}").strip() == "0 1"


def test_the_live_view_without_rich_is_one_line_exit_2(state_dir, pane, tmp_path):
    rc = tmp_path / "rc"
    command = shlex.join([*NO_RICH, "top", "--state-dir", str(state_dir)])
    terminal = pane(f"{command}; echo $? > {rc}; echo top ended; sleep 600")
    screen = terminal.wait_screen(lambda s: "top ended" in s, "h5watch top to refuse")
    assert rc.read_text().strip() == "2"
    lines = [line for line in screen.splitlines() if line.strip()]
    assert lines == ["h5watch top: error: the live view needs rich: pip install 'h5watch[top]' (or use --plain or "
                     "--once)", "top ended"], screen


# -- the numbers, from made-up reports ---------------------------------------------------


def _report(now: float, acquisitions: int, contentions: int, hold_buckets: list[int], operations=None) -> dict:
    lock = {
        "lock": "app.x", "acquisitions": acquisitions, "contentions": contentions, "orphaned": False,
        "holder": {"thread_name": "t", "thread_ident": 1, "operation": "File.__init__", "hold_age_seconds": 0.5},
        "waiters": 0, "waiting_threads": [], "waiters_unrecorded": 0, "oldest_wait_seconds": 0.0, "stuck": False,
        "wait": {"buckets": [0] * N_BUCKETS, "sum_seconds": 0.0, "max_seconds": 0.0},
        "hold": {"buckets": hold_buckets, "sum_seconds": 1.0, "max_seconds": 0.0012},
    }
    if operations is not None:
        lock["operations"] = operations
    process = {"pid": 42, "workload": "w", "state": "ok", "stuck": False, "stopped": None, "reason": None,
               "culprit_lock": None, "stuck_age_seconds": None, "kill_reason": None, "heartbeat_age_seconds": 0.1,
               "started_unix": 1000.0, "path": "/x/42-1.h5w", "locks": [lock]}
    return {"state_dir": "/x", "time_unix": now, "processes": [process], "skipped": []}


def test_rates_and_quantiles_are_of_the_interval():
    ms = BUCKET_BOUNDS_SECONDS.index(1e-3)
    early = [0] * N_BUCKETS
    early[ms - 3] = 100  # 100 holds under 100 us
    late = list(early)
    late[ms + 1] = 50  # then 50 between 1 and 2.5 ms
    sampler = Sampler()
    [first] = sampler.frame(_report(1010.0, 100, 10, early)).processes[0].locks
    assert first.rate == pytest.approx(10.0)  # since the process started, 10 s before
    assert first.contention == pytest.approx(0.1)
    assert first.quantile("hold", 0.5) < 1e-4
    [second] = sampler.frame(_report(1012.0, 150, 35, late)).processes[0].locks
    assert second.rate == pytest.approx(25.0)  # 50 in 2 s
    assert second.contention == pytest.approx(0.5)
    # Every hold of the interval is in the 1 to 2.5 ms bucket; none above the max recorded (1.2 ms).
    assert 1e-3 < second.quantile("hold", 0.5) <= 0.0012
    assert second.quantile("hold", 0.99) == pytest.approx(0.0012)
    # Counters that went down are not the same counters: from the start again.
    [third] = sampler.frame(_report(1020.0, 5, 0, early)).processes[0].locks
    assert third.rate == pytest.approx(5 / 20)


def test_top_operations_by_hold_time_when_the_lock_has_them():
    [lock] = Sampler().frame(_report(1010.0, 1, 0, [0] * N_BUCKETS)).processes[0].locks
    assert operations_text(lock) == "now in File.__init__"
    operations = [
        {"operation": name, "holds": holds, "hold_seconds": total, "hold_max_seconds": top,
         "caused_wait_seconds": 0.0, "waits": 0, "wait_seconds": 0.0}
        for name, holds, total, top in [("a", 1, 0.1, 0.1), ("b", 10, 3.0, 0.5), ("c", 5, 1.0, 0.3), ("d", 2, 0.2, 0.1)]
    ]
    [lock] = Sampler().frame(_report(1010.0, 1, 0, [0] * N_BUCKETS, operations)).processes[0].locks
    assert operations_text(lock) == ("top by hold time: b 3.0s (10 holds, max 500ms), c 1.0s (5 holds, max 300ms), "
                                     "d 200ms (2 holds, max 100ms), +1 more")
    frame = render_plain(Sampler().frame(_report(1010.0, 1, 0, [0] * N_BUCKETS, operations)), "hold")
    assert "top by hold time: b 3.0s" in frame
    assert max(len(line) for line in frame.splitlines()) <= PLAIN_WIDTH
