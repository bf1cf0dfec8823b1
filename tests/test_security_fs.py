"""The state directory under attack from another local user.

Replays, with real users (made here with useradd, removed after), real
instrumented processes and a real daemon: another user pre-creating a
victim's directory or the base; a directory swapped for a symlink after
start-up; symlinks, hard links and FIFOs planted at every name h5watch
writes; files of one user planted in another's directory; a non-root user's
workers exported by a root daemon; a totals save that fails. What must hold:
nothing is written through what was planted (the victim file is unchanged),
nobody blocks, every refusal is one line naming the path.

Root only (users are created); as another user, the test's interpreter may
sit under a directory only root can enter (/root/.pyenv): the users' processes
then get CAP_DAC_READ_SEARCH, which lets them read, never write, anything.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from daemon_support import H5WATCH, DaemonProcess, free_port, wait_for

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="creates users and plays them against root: run as root"),
]

VICTIM_TEXT = b"root's precious data\n"


def _python_hidden_from_others() -> bool:
    path = Path(os.path.realpath(sys.executable))
    return any(not (parent.stat().st_mode & stat.S_IXOTH) for parent in path.parents)


READ_CAPS = ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"] if _python_hidden_from_others() else []


class User:
    def __init__(self, name: str) -> None:
        self.name = name
        entry = pwd.getpwnam(name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid

    def argv(self, *argv: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", *READ_CAPS, *argv]


def _env(**extra: str) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/", "PYTHONDONTWRITEBYTECODE": "1"}
    env.update(extra)
    return env


def run(argv: list[str], timeout: float = 60, **extra_env: str) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(**extra_env),
                            cwd="/", start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{argv} blocked for {timeout} s\nstdout:\n{out}\nstderr:\n{err}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(10)


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(code), *args]


def events(stderr: str, event: str) -> list[dict]:
    out = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event:
                out.append(record)
    return out


@pytest.fixture(scope="module")
def users():
    """Two fresh users, ``alice`` (the attacker) and ``bob`` (the victim)."""
    tag = os.urandom(3).hex()
    names = [f"h5wa{tag}", f"h5wb{tag}"]
    made = []
    try:
        for name in names:
            subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name], check=True, capture_output=True, timeout=30)
            made.append(name)
        yield User(names[0]), User(names[1])
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False, capture_output=True, timeout=30)


@pytest.fixture
def top():
    """A directory every user can enter (pytest's tmp_path is root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="h5watch-sec-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def base(top: Path) -> Path:
    """The shared base, as systemd's RuntimeDirectory= makes it: root's, 1777."""
    path = top / "base"
    path.mkdir()
    path.chmod(0o1777)
    return path


@pytest.fixture
def victim(top: Path) -> Path:
    """A root-only file that nothing h5watch does may change."""
    path = top / "victim"
    path.write_bytes(VICTIM_TEXT)
    path.chmod(0o600)
    return path


@pytest.fixture
def daemons(top: Path):
    started: list[DaemonProcess] = []

    def start(state_dir: Path, *args: str) -> DaemonProcess:
        daemon = DaemonProcess(state_dir, top / f"daemon-{len(started)}.log", "--scan-interval", "0.2", *args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


WORKER = """
    import json, os, sys, time
    import h5watch
    h5watch.install(state_dir=sys.argv[1], service=sys.argv[2], tick_interval=0.05)
    lock = h5watch.WatchedLock("app.sec")
    for _ in range(int(sys.argv[3])):
        with lock:
            pass
    time.sleep(0.3)
    print(json.dumps({"pid": os.getpid(), "state": h5watch.snapshot()["state"]["path"]}), flush=True)
    sys.stdin.readline()
"""


class Worker:
    """An instrumented process counting ``n`` acquisitions of 'app.sec', then
    waiting for a line on stdin (or its end) before it exits."""

    def __init__(self, argv_prefix: list[str], state_dir: Path, service: str, n: int) -> None:
        self.proc = subprocess.Popen([*argv_prefix, *python(WORKER, str(state_dir), service, str(n))], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd="/",
                                     start_new_session=True)
        line = self.proc.stdout.readline()
        if not line:
            self.kill()
            raise AssertionError(f"worker printed nothing:\n{self.proc.stderr.read()}")
        self.report = json.loads(line)

    def finish(self) -> str:
        try:
            _, err = self.proc.communicate("\n", timeout=30)
        finally:
            self.kill()
        assert self.proc.returncode == 0, err
        return err

    def kill(self) -> None:
        kill(self.proc)


# -- directories another user made ---------------------------------------------------


def test_a_user_dir_pre_created_by_another_user_is_refused_and_the_service_runs(users, base):
    alice, bob = users
    trap = base / str(bob.uid)
    assert run(alice.argv("mkdir", "-m", "0777", str(trap))).returncode == 0

    result = run(bob.argv(*python("""
        import sys, h5watch
        h5watch.install(state_dir=sys.argv[1], tick_interval=0.05)
        lock = h5watch.WatchedLock("app.x")
        with lock:
            pass
        import time; time.sleep(0.3)
        print("served")
    """, str(base))))
    assert result.returncode == 0 and "served" in result.stdout, result.stderr
    [event] = events(result.stderr, "state.unavailable")  # loud, once: never silently unmonitored
    assert str(trap) in event["error"] and f"uid {alice.uid}" in event["error"]
    assert os.listdir(trap) == []

    # Where a person asked for monitoring, h5watch run refuses to start the
    # command unmonitored: one line, exit 2.
    ran = run(bob.argv(*H5WATCH_AS_USER, "run", "--state-dir", str(base), "--", "sh", "-c", "exit 5"))
    assert ran.returncode == 2, ran.stderr
    assert ran.stderr.startswith("h5watch run: error: ") and ran.stderr.count("\n") == 1 and str(trap) in ran.stderr
    assert os.listdir(trap) == []


H5WATCH_AS_USER = [sys.executable, "-m", "h5watch"]


def test_a_base_pre_created_by_another_user_is_refused_by_everybody(users, base):
    alice, bob = users
    trap = base / "h5watch-0"  # as /tmp/h5watch-0 was: a predictable name in a sticky directory
    assert run(alice.argv("mkdir", "-m", "0777", str(trap))).returncode == 0
    for who in ([], bob.argv()):  # root trusts it no more than bob does
        result = run([*who, *python("""
            import sys, h5watch
            h5watch.install(state_dir=sys.argv[1], tick_interval=0.05)
            with h5watch.WatchedLock("app.x"):
                pass
            import time; time.sleep(0.3)
        """, str(trap))])
        assert result.returncode == 0, result.stderr
        [event] = events(result.stderr, "state.unavailable")
        assert str(trap) in event["error"] and f"owned by uid {alice.uid}" in event["error"]
    daemon = run([*H5WATCH, "daemon", "--state-dir", str(trap), "--listen", f"127.0.0.1:{free_port()}"], timeout=30)
    assert daemon.returncode == 2 and len(daemon.stderr.strip().splitlines()) == 1, daemon.stderr
    assert str(trap) in daemon.stderr and "Traceback" not in daemon.stderr
    assert os.listdir(trap) == []


@pytest.mark.skipif(os.path.exists("/run/h5watch"), reason="this machine has /run/h5watch: every user's default")
def test_no_predictable_default_in_tmp_for_a_user_without_a_runtime_dir(users):
    _, bob = users
    result = run(bob.argv(*python("""
        import h5watch
        h5watch.install(tick_interval=0.05)
        with h5watch.WatchedLock("app.x"):
            pass
        import time; time.sleep(0.3)
        print(h5watch.snapshot()["state"]["path"])
    """)))
    assert result.returncode == 0 and result.stdout.strip() == "None", result
    [event] = events(result.stderr, "state.unavailable")
    assert "H5WATCH_STATE_DIR" in event["error"]
    assert not os.path.lexists(f"/tmp/h5watch-{bob.uid}")


# -- a swapped directory ---------------------------------------------------------------


SWAPPED = """
    import json, os, sys, time
    import h5watch
    h5watch.install(state_dir=sys.argv[1], tick_interval=0.05)
    lock = h5watch.WatchedLock("app.swapped")
    with lock:
        pass
    time.sleep(0.3)
    print(json.dumps(h5watch.snapshot()["state"]), flush=True)
    sys.stdin.readline()  # the test swaps the directory now
    pid = os.fork()  # the child makes its own state file, after the swap
    if pid == 0:
        with lock:
            time.sleep(0.3)
        print(json.dumps(h5watch.snapshot()["state"]), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
"""


def test_a_user_dir_swapped_for_a_symlink_after_start_up_is_never_written_through(base, top, daemons):
    """Root's own worker and daemon: their directory is swapped under them for
    a symlink to a root-only directory; nothing they write lands there."""
    secret = top / "secret"
    secret.mkdir(mode=0o700)
    daemon = daemons(base)
    proc = subprocess.Popen(python(SWAPPED, str(base)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd="/", start_new_session=True)
    try:
        own, moved = base / "0", base / "moved"
        assert Path(json.loads(proc.stdout.readline())["path"]).parent == own
        own.rename(moved)
        own.symlink_to(secret)
        out, err = proc.communicate("\n", timeout=30)
    finally:
        kill(proc)
    assert proc.returncode == 0, err
    child = json.loads(out.splitlines()[-1])
    assert child["path"] and Path(child["path"]).name in os.listdir(moved)  # through the descriptor opened at start
    fresh = run(python(SWAPPED, str(base)), timeout=30)  # started after the swap: refuses the symlink
    assert any("symlink" in event["error"] for event in events(fresh.stderr, "state.unavailable")), fresh.stderr
    assert daemon.stop() == 0  # saves its totals on the way out
    assert os.listdir(secret) == []
    assert (moved / "h5watch-daemon.json").exists()


# -- links and FIFOs planted at every name ------------------------------------------------


PLANTED = """
    import json, os, sys
    from h5watch.statedir import proc_start_ticks
    print(json.dumps({"pid": os.getpid(), "ticks": proc_start_ticks(os.getpid())}), flush=True)
    sys.stdin.readline()  # the test plants its traps now
    import h5watch, time
    h5watch.install(state_dir=sys.argv[1], tick_interval=0.05)
    with h5watch.WatchedLock("app.planted"):
        pass
    time.sleep(0.3)
    print(json.dumps(h5watch.snapshot()["state"]), flush=True)
"""


def plant(kind: str, at: Path, victim: Path) -> None:
    if kind == "symlink":
        at.symlink_to(victim)
    elif kind == "hardlink":
        os.link(victim, at)
    else:
        os.mkfifo(at, 0o600)


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
@pytest.mark.parametrize("name", ["state", "temp", "stacks"])
def test_a_worker_never_writes_through_nor_waits_on_what_is_planted_at_its_names(base, victim, kind, name):
    own = base / "0"
    own.mkdir(mode=0o700)
    proc = subprocess.Popen(python(PLANTED, str(base)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(), cwd="/", start_new_session=True)
    try:
        me = json.loads(proc.stdout.readline())
        stem = f"{me['pid']}-{me['ticks']}"
        at = own / {"state": f"{stem}.h5w", "temp": f".{stem}.h5w.new", "stacks": f"{stem}.stacks"}[name]
        plant(kind, at, victim)
        out, err = proc.communicate("\n", timeout=30)
    finally:
        kill(proc)
    assert proc.returncode == 0, err
    assert victim.read_bytes() == VICTIM_TEXT and stat.S_IMODE(victim.stat().st_mode) == 0o600
    state = json.loads(out.splitlines()[-1])
    if name == "state":
        # Its own name is taken: refused, loudly, and the service goes on.
        assert state["path"] is None
        [event] = events(err, "state.unavailable")
        assert stem in event["error"] or "symlink" in event["error"] or "not this process" in event["error"], event
    else:
        # A temporary or stacks name is replaced: made anew with O_EXCL.
        made = os.stat(state["stacks_path"] if name == "stacks" else state["path"], follow_symlinks=False)
        assert stat.S_ISREG(made.st_mode) and made.st_nlink == 1 and made.st_uid == 0
        assert events(err, "state.unavailable") == []


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_the_daemon_never_writes_through_nor_waits_on_its_planted_lock_file(base, victim, kind):
    own = base / "0"
    own.mkdir(mode=0o700)
    plant(kind, own / "h5watch-daemon.lock", victim)
    result = run([*H5WATCH, "daemon", "--state-dir", str(base), "--listen", f"127.0.0.1:{free_port()}"], timeout=30)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "h5watch-daemon.lock" in result.stderr and "Traceback" not in result.stderr
    assert victim.read_bytes() == VICTIM_TEXT


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo"])
def test_the_daemon_never_reads_through_nor_waits_on_its_planted_totals(base, victim, daemons, kind):
    own = base / "0"
    own.mkdir(mode=0o700)
    totals = own / "h5watch-daemon.json"
    plant(kind, totals, victim)
    daemon = daemons(base)  # starts: a FIFO is not waited on
    [refused] = daemon.events("daemon.totals_unreadable")
    assert "h5watch-daemon.json" in refused["error"]
    assert daemon.stop() == 0
    # Saved on the way out: a new regular file under the name, the victim untouched.
    saved = os.stat(totals, follow_symlinks=False)
    assert stat.S_ISREG(saved.st_mode) and saved.st_nlink == 1 and stat.S_IMODE(saved.st_mode) == 0o600
    assert victim.read_bytes() == VICTIM_TEXT and os.stat(victim).st_nlink == 1  # the planted name was replaced
    assert [name for name in os.listdir(own) if name.endswith(".tmp")] == []


# -- users' workers and a root daemon --------------------------------------------------------


def test_a_root_daemon_exports_a_users_workers_and_refuses_files_owned_by_another(users, base, daemons):
    alice, bob = users
    daemon = daemons(base)
    worker = Worker(bob.argv(), base, "bobs", 321)
    bob_dir = base / str(bob.uid)
    info = bob_dir.stat()
    assert (info.st_uid, stat.S_IMODE(info.st_mode)) == (bob.uid, 0o700)
    state_path = Path(worker.report["state"])
    assert state_path.parent == bob_dir and state_path.stat().st_uid == bob.uid
    assert stat.S_IMODE(state_path.stat().st_mode) == 0o600
    wait_for(lambda: daemon.value("h5watch_lock_acquisitions_total", workload="bobs", lock="app.sec") == 321, 15,
             what="bob's counts exported by the root daemon")

    # alice's copy of bob's file, in bob's directory: the daemon reads it as
    # a dead process's file, sees alice owns it, and never counts it.
    forged = bob_dir / "999999-1.h5w"
    shutil.copyfile(state_path, forged)
    os.chown(forged, alice.uid, -1)
    wait_for(lambda: any(Path(e["path"]).name == forged.name for e in daemon.events("daemon.state_file_skipped")), 15,
             what="the forged file skipped")
    [skipped] = [e for e in daemon.events("daemon.state_file_skipped") if Path(e["path"]).name == forged.name]
    assert skipped["reason"] == "foreign_owner"
    assert daemon.value("h5watch_lock_acquisitions_total", workload="bobs", lock="app.sec") == 321
    assert forged.exists()

    worker.finish()
    wait_for(lambda: not state_path.exists(), 15, what="bob's exited worker folded and its file removed")
    assert daemon.value("h5watch_lock_acquisitions_total", workload="bobs", lock="app.sec") == 321

    status = run([*H5WATCH, "status", "--state-dir", str(base), "--json"], timeout=30)
    assert status.returncode == 0, status.stderr


def test_one_daemon_per_user_directory_a_root_daemon_and_the_users_own_never_both_fold_it(users, base, daemons, top):
    _, bob = users
    worker = Worker(bob.argv(), base, "bobs", 55)
    root_daemon = daemons(base)
    wait_for(lambda: root_daemon.value("h5watch_lock_acquisitions_total", workload="bobs") == 55, 15,
             what="bob's counts on the root daemon")
    port = free_port()
    log = open(top / "bob-daemon.log", "wb")
    bob_daemon = subprocess.Popen(
        bob.argv(*H5WATCH_AS_USER, "daemon", "--state-dir", str(base), "--listen", f"127.0.0.1:{port}", "--scan-interval", "0.2"),
        stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd="/", start_new_session=True)
    try:
        def bob_metrics() -> str:
            import urllib.request

            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                return response.read().decode()

        def bob_log() -> list[dict]:
            return [json.loads(line) for line in (top / "bob-daemon.log").read_text().splitlines() if line.startswith("{")]

        wait_for(lambda: any(e["event"] == "daemon.dir_claimed" for e in bob_log()), 15, what="bob's daemon leaving his dir")
        assert 'workload="bobs"' not in bob_metrics()
        worker.finish()
        wait_for(lambda: not Path(worker.report["state"]).exists(), 15, what="the exited worker folded")
        time.sleep(0.6)
        assert root_daemon.value("h5watch_lock_acquisitions_total", workload="bobs") == 55
        assert 'workload="bobs"' not in bob_metrics()  # folded once, by the daemon that holds the directory
        # The root daemon gone, bob's own takes his directory over.
        root_daemon.stop()
        again = Worker(bob.argv(), base, "bobs", 7)
        wait_for(lambda: 'h5watch_lock_acquisitions_total{lock="app.sec",workload="bobs"} 7.0' in bob_metrics(), 15,
                 what="bob's daemon reading his directory")
        again.finish()
    finally:
        kill(bob_daemon)
        log.close()


def test_a_failed_totals_save_keeps_the_dead_workers_file(base, daemons):
    own = base / "0"
    own.mkdir(mode=0o700)
    blocker = own / "h5watch-daemon.json"
    blocker.mkdir()  # a rename onto it fails (EISDIR): a real failed save, as ENOSPC or EIO would be
    daemon = daemons(base)
    worker = Worker([], base, "unsaved", 77)
    state_path = Path(worker.report["state"])
    worker.finish()
    wait_for(lambda: daemon.events("daemon.totals_unsaved"), 15, what="daemon.totals_unsaved")
    time.sleep(1)  # several scans
    assert state_path.exists(), "a dead worker's file was removed although its counts were not saved"
    assert len(daemon.events("daemon.totals_unsaved")) == 1  # once, not once a scan
    assert daemon.value("h5watch_lock_acquisitions_total", workload="unsaved", lock="app.sec") == 77
    assert daemon.value("h5watch_daemon_totals_save_failures_total") >= 2  # counted every scan it fails
    blocker.rmdir()
    wait_for(lambda: not state_path.exists(), 15, what="the file removed once the totals are saved")
    daemon.stop()
    again = daemons(base)
    assert again.value("h5watch_lock_acquisitions_total", workload="unsaved", lock="app.sec") == 77


# -- bookkeeping: many files, junk -------------------------------------------------------------


def test_live_workers_are_read_first_however_many_files_and_junk_goes_after_a_grace(users, base, daemons):
    alice, _ = users
    own = base / "0"
    own.mkdir(mode=0o700)
    # More dead processes' files than one scan reads, all unreadable.
    for i in range(21000):
        (own / f"{4_000_000 + i}-1.h5w").touch()
    old = time.time() - 3600
    junk = {".1-1.h5w.0123456789abcdef.tmp": "temp", "2-2.stacks": "stacks", "notes.txt": "other"}
    for name in junk:
        (own / name).write_text("x")
        os.utime(own / name, (old, old))
    (own / "fresh.txt").write_text("x")
    (own / "link").symlink_to("/etc/hostname")
    os.utime(own / "link", (old, old), follow_symlinks=False)
    (own / "alices.txt").write_text("x")
    os.chown(own / "alices.txt", alice.uid, -1)
    os.utime(own / "alices.txt", (old, old))

    worker = Worker([], base, "crowded", 9)
    daemon = daemons(base)
    # The first scrape after the start already has the live worker.
    assert daemon.value("h5watch_lock_acquisitions_total", workload="crowded", lock="app.sec") == 9
    status = run([*H5WATCH, "status", "--state-dir", str(base), "--json"], timeout=60)
    assert worker.report["pid"] in [p["pid"] for p in json.loads(status.stdout)["processes"]], status.stderr
    wait_for(lambda: not any((own / name).exists() for name in junk), 15, what="old junk removed")
    remaining = set(os.listdir(own))
    assert {"fresh.txt", "link", "alices.txt", "h5watch-daemon.lock"} <= remaining
    worker.finish()
