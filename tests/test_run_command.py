"""``h5watch run -- CMD``: what would leave CMD unmonitored is refused before it
starts; a command that cannot run exits 127 or 126, as with ``env``."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from h5watch.cli.run import python_flags_skipping_bootstrap

H5WATCH = [sys.executable, "-m", "h5watch", "run"]


def run(*args: str, env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None,
        timeout: float = 50) -> subprocess.CompletedProcess:
    """``h5watch run ARGS`` in its own session, killed whole on timeout."""
    full_env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    full_env.update(env or {})
    proc = subprocess.Popen([*H5WATCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env, cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
    # A build without its compiled parts says so before every command: not what these tests look at.
    err = "".join(line for line in err.splitlines(keepends=True) if "compiled parts missing" not in line)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def events(stderr: str, event: str) -> list[dict]:
    return [record for record in (json.loads(line) for line in stderr.splitlines() if line.startswith("{"))
            if record.get("event") == event]


@pytest.fixture
def listening():
    """A port some other program listens on: ``listening()`` gives a new one."""
    sockets: list[socket.socket] = []

    def listen() -> int:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        sockets.append(sock)
        return sock.getsockname()[1]

    yield listen
    for sock in sockets:
        sock.close()


def free_ports(count: int) -> int:
    """The first of ``count`` consecutive ports free now."""
    for first in range(20000 + os.getpid() % 20000, 60000, count):
        probes = []
        try:
            for port in range(first, first + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise AssertionError("no free ports")


# -- a command that cannot run -------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "command, code, message",
    [
        ("", 127, "command not found: ''"),
        ("no-such-command-h5watch", 127, "command not found: 'no-such-command-h5watch'"),
        ("./no-such-command-h5watch", 127, "command not found: './no-such-command-h5watch'"),
        ("/no/such/command", 127, "command not found: '/no/such/command'"),
        ("./", 126, "command not executable: './'"),
        ("/", 126, "command not executable: '/'"),
        ("/dev/null", 126, "command not executable: '/dev/null'"),
    ],
)
def test_a_command_that_cannot_run_exits_127_or_126_in_one_line(command, code, message, tmp_path):
    result = run("--", command, "arg", cwd=tmp_path, env={"H5WATCH_STATE_DIR": str(tmp_path)})
    assert result.returncode == code, result
    assert result.stderr == f"h5watch run: error: {message}\n"


@pytest.mark.timeout(60)
def test_a_command_found_but_not_executable_on_path_exits_126(tmp_path):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "tool").write_text("#!/bin/sh\nexit 0\n")  # mode 0644
    result = run("--", "tool", env={"H5WATCH_STATE_DIR": str(tmp_path / "state"), "PATH": str(tmp_path / "bin")})
    assert result.returncode == 126, result
    assert result.stderr == "h5watch run: error: command not executable: 'tool'\n"


# -- the state dir -----------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_state_dir_that_cannot_be_made_refuses_to_start_the_command(tmp_path):
    (tmp_path / "a-file").write_text("")
    ran = tmp_path / "ran"
    result = run("--state-dir", str(tmp_path / "a-file" / "state"), "--", "touch", str(ran))
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"h5watch run: error: state_dir '{tmp_path / 'a-file' / 'state'}': ")
    assert result.stderr.endswith("; or run with --state-files false\n") and result.stderr.count("\n") == 1
    assert not ran.exists()  # never started unmonitored
    assert run("--state-dir", str(tmp_path / "a-file" / "state"), "--state-files", "false",
               "--", "touch", str(ran)).returncode == 0 and ran.exists()


@pytest.fixture
def read_only_state_dir(tmp_path: Path):
    """A state dir whose <uid> directory exists, checked and owned, on a
    read-only mount: every directory check passes, no file can be made."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)")
    try:
        (mount / str(os.geteuid())).mkdir(mode=0o700)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True, capture_output=True)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False, capture_output=True)


@pytest.mark.timeout(60)
def test_a_read_only_state_dir_refuses_to_start_the_command(read_only_state_dir, tmp_path):
    ran = tmp_path / "ran"
    result = run("--state-dir", str(read_only_state_dir), "--", "touch", str(ran))
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"h5watch run: error: state_dir '{read_only_state_dir}': cannot make a file in ")
    assert "Read-only file system" in result.stderr and result.stderr.count("\n") == 1
    assert not ran.exists()


# -- the metrics port ------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_metrics_port_in_use_refuses_to_start_the_command(listening, state_dir, tmp_path):
    port = listening()
    ran = tmp_path / "ran"
    result = run("--state-dir", str(state_dir), "--metrics-port", str(port), "--", "touch", str(ran))
    assert result.returncode == 2, result
    assert result.stderr == (
        f"h5watch run: error: metrics_port: 127.0.0.1:{port} is in use; choose a free port, or a range such as"
        f" {port}-{min(port + 6, 65535)} (each process takes the first free one)\n"
    )
    assert not ran.exists()
    # The same port from the environment.
    by_env = run("--state-dir", str(state_dir), "--", "touch", str(ran), env={"H5WATCH_METRICS_PORT": str(port)})
    assert by_env.returncode == 2 and f"127.0.0.1:{port} is in use" in by_env.stderr and not ran.exists()


@pytest.mark.timeout(60)
def test_a_range_is_refused_only_when_every_port_of_it_is_in_use(listening, state_dir, tmp_path):
    first = free_ports(2)
    taken = [socket.socket(), socket.socket()]
    try:
        taken[0].bind(("127.0.0.1", first))
        taken[0].listen()
        ran = tmp_path / "ran"
        result = run("--state-dir", str(state_dir), "--metrics-port", f"{first}-{first + 1}", "--", "touch", str(ran))
        assert result.returncode == 0 and ran.exists(), result  # one port is free
        taken[1].bind(("127.0.0.1", first + 1))
        taken[1].listen()
        ran.unlink()
        result = run("--state-dir", str(state_dir), "--metrics-port", f"{first}-{first + 1}", "--", "touch", str(ran))
        assert result.returncode == 2 and not ran.exists()
        assert result.stderr == (
            f"h5watch run: error: metrics_port: every port of {first}-{first + 1} is in use on 127.0.0.1;"
            " choose another range\n"
        )
    finally:
        for sock in taken:
            sock.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("port", ["9464", "0"])
def test_a_metrics_addr_not_of_this_host_refuses_to_start_the_command(port, state_dir):
    result = run("--state-dir", str(state_dir), "--metrics-port", port, "--metrics-addr", "192.0.2.1", "--", "true")
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"h5watch run: error: metrics_addr: cannot listen on 192.0.2.1:{port} (")
    assert result.stderr.count("\n") == 1


# The top process, its python subprocess and its multiprocessing spawn child,
# each instrumented, each reporting its exporter's port and workload name.
FAMILY = '''
import json, multiprocessing, subprocess, sys
import h5py, h5watch

def report(who):
    snap = h5watch.snapshot()
    print(json.dumps({"who": who, "port": snap["exporter"]["port"], "service": snap["service"]}), flush=True)

if __name__ == "__main__":
    report("top")
    subprocess.run([sys.executable, "-c", "import h5py, h5watch, sys; sys.path.insert(0, sys.argv[1]);"
                    " import family; family.report('subprocess')", sys.argv[1]], check=True)
    child = multiprocessing.get_context("spawn").Process(target=report, args=("spawned",))
    child.start()
    child.join(30)
    sys.exit(child.exitcode)
'''


def run_family(tmp_path: Path, *flags: str, env: dict[str, str] | None = None) -> tuple[dict, str]:
    (tmp_path / "family.py").write_text(textwrap.dedent(FAMILY))
    result = run("--state-files", "false", *flags, "--", sys.executable, str(tmp_path / "family.py"), str(tmp_path),
                 env=env)
    assert result.returncode == 0, result
    return {entry["who"]: entry for entry in map(json.loads, result.stdout.splitlines())}, result.stderr


@pytest.mark.timeout(90)
def test_a_single_metrics_port_is_the_top_process_s_alone(tmp_path):
    port = free_ports(1)
    family, stderr = run_family(tmp_path, "--metrics-port", str(port))
    assert family["top"]["port"] == port
    assert family["subprocess"]["port"] is None and family["spawned"]["port"] is None
    assert events(stderr, "exporter.unavailable") == [], stderr  # nobody tried and failed to bind it


@pytest.mark.timeout(90)
def test_with_a_range_each_process_takes_the_first_free_port(tmp_path):
    first = free_ports(4)
    family, stderr = run_family(tmp_path, env={"H5WATCH_METRICS_PORT": f"{first}-{first + 3}"})
    assert family["top"]["port"] == first
    assert family["subprocess"]["port"] == first + 1  # the top one still serves
    assert family["spawned"]["port"] == first + 1  # the subprocess has exited
    assert events(stderr, "exporter.unavailable") == [], stderr


@pytest.mark.timeout(90)
def test_children_inherit_the_workload_name_of_the_top_process(tmp_path):
    family, _ = run_family(tmp_path)
    assert {entry["service"] for entry in family.values()} == {"family"}  # not "python"
    named, _ = run_family(tmp_path, "--service", "ingest")
    assert {entry["service"] for entry in named.values()} == {"ingest"}


@pytest.mark.timeout(60)
def test_install_hands_its_workload_name_to_children_it_starts(tmp_path):
    script = tmp_path / "ingest.py"
    script.write_text(textwrap.dedent('''
        import subprocess, sys
        import h5watch
        child = "import h5watch; print(h5watch.install(state_files=False).service)"
        print(h5watch.install(state_files=False).service)
        subprocess.run([sys.executable, "-c", child], check=True)
        h5watch.install(state_files=False, service="renamed")
        subprocess.run([sys.executable, "-c", child], check=True)
    '''))
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "H5WATCH_SERVICE")}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=50)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ingest", "ingest", "renamed"]


# -- warnings: the command still runs ------------------------------------------------


@pytest.mark.timeout(60)
def test_an_unknown_variable_is_one_warning_naming_the_closest_option(state_dir):
    code = "import h5py; from h5watch.process import runtime; print(runtime.current_options().hold_timeout)"
    result = run("--state-dir", str(state_dir), "--", sys.executable, "-c", code,
                 env={"H5WATCH_HOLD_TIMOUT": "3"})
    assert result.returncode == 0 and result.stdout == "None\n", result
    # Once, by h5watch run: the instrumented process does not repeat it.
    assert result.stderr == (
        "h5watch run: warning: H5WATCH_HOLD_TIMOUT is not an h5watch option (did you mean H5WATCH_HOLD_TIMEOUT?);"
        " ignored\n"
    )


@pytest.mark.timeout(60)
def test_install_warns_once_about_an_unknown_variable(tmp_path):
    code = """
        import h5watch
        h5watch.install(state_files=False)
        h5watch.install(state_files=False, service="again")
        import h5py
        print("served")
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update({"H5WATCH_HOLD_TIMOUT": "3", "H5WATCH_WORKLOAD": "ingest"})
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                            timeout=50)
    assert result.returncode == 0 and result.stdout == "served\n", result.stderr
    found = [(e["variable"], e["did_you_mean"], e["level"]) for e in events(result.stderr, "options.unknown_variable")]
    assert found == [("H5WATCH_HOLD_TIMOUT", "H5WATCH_HOLD_TIMEOUT", "warning"),
                     ("H5WATCH_WORKLOAD", "H5WATCH_SERVICE", "warning")]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("flags, shown", [(["-E"], "-E"), (["-I"], "-I"), (["-X", "dev", "-Sc"], "-S"),
                                          (["-IS"], "-I/-S")])
def test_a_python_that_skips_the_bootstrap_is_one_warning(flags, shown, state_dir):
    code = "import sys; print('h5watch' in sys.modules)"
    result = run("--state-dir", str(state_dir), "--", sys.executable, *flags, *(["-c"] if flags[-1] != "-Sc" else []),
                 code)
    assert result.returncode == 0 and result.stdout == "False\n", result  # indeed not instrumented
    name = os.path.basename(sys.executable)
    assert result.stderr.startswith(f"h5watch run: warning: {name} {shown}: ") and result.stderr.count("\n") == 1
    assert "so that process runs without h5watch" in result.stderr


@pytest.mark.timeout(60)
def test_a_python_that_reads_the_bootstrap_gets_no_warning(state_dir):
    code = "import sys; print('h5watch' in sys.modules)"
    result = run("--state-dir", str(state_dir), "--", sys.executable, "-s", "-c", code, "-E")
    assert (result.returncode, result.stdout, result.stderr) == (0, "True\n", "")


@pytest.mark.timeout(60)
def test_the_program_sees_the_sys_path_it_has_without_h5watch(state_dir, tmp_path):
    """The bootstrap directory is on PYTHONPATH for every process (its
    children are instrumented too), but leaves sys.path once h5watch is in:
    nothing the program looks at or imports goes through it."""
    site = tmp_path / "site"
    site.mkdir()
    code = "import json, sys, h5watch; print(json.dumps([sys.path, h5watch.is_installed(), 'sitecustomize' in sys.modules]))"
    env = {"PYTHONPATH": str(site)}
    bare = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, cwd=tmp_path,
                          env={**os.environ, **env})
    watched = run("--state-dir", str(state_dir), "--", sys.executable, "-c", code, env=env, cwd=tmp_path)
    assert watched.returncode == 0, watched.stderr
    bare_path, bare_installed, _ = json.loads(bare.stdout)
    watched_path, watched_installed, bootstrapped = json.loads(watched.stdout)
    assert (bare_installed, watched_installed, bootstrapped) == (False, True, True)
    assert watched_path == bare_path and str(site) in watched_path


@pytest.mark.parametrize(
    "command, found",
    [
        (["python3", "-E", "app.py"], ["-E"]),
        (["/usr/bin/python3.11", "-u", "-I", "-m", "app"], ["-I"]),
        (["python", "-bES", "app.py"], ["-E", "-S"]),
        (["python", "-W", "-E", "app.py"], []),  # -E is -W's value
        (["python", "-Wignore", "-E", "app.py"], ["-E"]),
        (["python", "-c", "pass", "-E"], []),  # the program's arguments
        (["python", "-cE"], []),
        (["python", "app.py", "-S"], []),
        (["python", "-", "-S"], []),
        (["pythonista", "-E"], []),
        (["sh", "-E"], []),
    ],
)
def test_which_python_flags_keep_the_bootstrap_out(command, found):
    assert python_flags_skipping_bootstrap(command, None) == found


def test_a_script_s_shebang_flags_are_read(tmp_path):
    for line, found in [("#!/usr/bin/env -S python3 -E", ["-E"]), ("#!/usr/bin/python3 -I", ["-I"]),
                        ("#!/usr/bin/env python3", []), ("#!/bin/sh -E", [])]:
        script = tmp_path / "tool"
        script.write_text(f"{line}\nprint(1)\n")
        assert python_flags_skipping_bootstrap([str(script), "-S"], None) == found, line
        assert python_flags_skipping_bootstrap(["tool"], str(tmp_path)) == [], "not executable: not on PATH"
    os.mkfifo(tmp_path / "fifo")
    assert python_flags_skipping_bootstrap([str(tmp_path / "fifo")], None) == []  # never blocks


# -- the library keeps the service running -----------------------------------------------


@pytest.mark.timeout(60)
def test_install_keeps_the_service_running_and_says_so_once(listening, tmp_path):
    (tmp_path / "a-file").write_text("")
    port = listening()
    code = f"""
        import h5watch
        h5watch.install(state_dir={str(tmp_path / 'a-file' / 'state')!r}, metrics_port={port}, tick_interval=0.05)
        import h5py, time
        with h5py.File({str(tmp_path / 'data.h5')!r}, "w") as f:
            f["x"] = [1, 2, 3]
        lock = h5watch.WatchedLock("app.x")
        for _ in range(3):
            with lock:
                time.sleep(0.1)
        print("served")
    """
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                            timeout=50)
    assert result.returncode == 0 and result.stdout == "served\n", result.stderr
    [exporter] = events(result.stderr, "exporter.unavailable")
    assert exporter["level"] == "error" and exporter["port"] == port
    [state] = events(result.stderr, "state.unavailable")
    assert state["level"] == "error" and "a-file" in state["error"]


def test_the_exit_statuses_are_in_the_help():
    result = subprocess.run([*H5WATCH, "--help"], capture_output=True, text=True, timeout=50)
    assert result.returncode == 0
    assert "127 if CMD is not found, 126 if it cannot be run" in " ".join(result.stdout.split())
