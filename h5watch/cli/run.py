"""``h5watch run [options] -- CMD...``: CMD with h5watch installed, no code change.

The options become ``H5WATCH_*`` variables, and ``h5watch/bootstrap`` goes
first on ``PYTHONPATH``: its ``sitecustomize`` calls ``h5watch.install()``
in every Python process CMD starts, before that process's first ``import
h5py``. Then this process becomes CMD (``exec``), so CMD's exit status and
signals are its own.

Before that, what would leave CMD unmonitored is refused (exit 2): a state
directory that cannot hold a file, a metrics port no process could take. A
command that cannot be found exits 127, one that cannot be run 126, as with
``env`` and ``timeout``. A misspelt ``H5WATCH_*`` variable, or a Python
started with ``-E``, ``-I`` or ``-S`` (which never reads the bootstrap), is a
one-line warning.
"""

from __future__ import annotations

import argparse
import errno
import os
import shutil
import socket
import stat
import sys

from h5watch.errors import UsageError
from h5watch.export.server import bind_listener
from h5watch.options import (
    METRICS_PORT_OWNER,
    OPTION_HELP,
    OPTION_NAMES,
    as_environ,
    resolve,
    unknown_variable_text,
    unknown_variables,
)
from h5watch.process import lock
from h5watch.statedir import StateDirError, ensure_writable_state_dir

__all__ = [
    "add_arguments",
    "main",
    "bootstrap_dir",
    "instrumented_environ",
    "check_metrics_port",
    "python_flags_skipping_bootstrap",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "h5watch run [options] -- CMD [ARG...]"
    parser.epilog = (
        "exit status: CMD's own; 2 for a bad option, a state dir in which no file can be made or a metrics port"
        " in use (CMD not started); 127 if CMD is not found, 126 if it cannot be run"
    )
    for name in OPTION_NAMES:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", metavar="VALUE", help=OPTION_HELP[name])
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="the command to run, after --")


def bootstrap_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bootstrap")


def instrumented_environ(flags: dict[str, str], environ: dict[str, str] | None = None) -> dict[str, str]:
    """The environment CMD runs in: ``environ`` plus the flags as ``H5WATCH_*``
    variables and the bootstrap on ``PYTHONPATH``. CMD's interpreters import
    h5watch from their own environment (this one's site-packages would not
    suit an interpreter of another version)."""
    env = dict(os.environ if environ is None else environ)
    env.update(as_environ(flags))
    if "metrics_port" in flags:
        env.pop(METRICS_PORT_OWNER, None)  # an ancestor's claim: this port is CMD's
    entries = [bootstrap_dir()] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(entries))
    env["H5WATCH_BOOTSTRAP"] = "1"
    return env


def main(args: argparse.Namespace) -> int:
    command = list(args.cmd)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("no command given: use 'h5watch run [options] -- CMD [ARG...]'")
    flags = {name: getattr(args, f"opt_{name}") for name in OPTION_NAMES if getattr(args, f"opt_{name}") is not None}
    # Every check that can refuse comes before CMD starts: a person who asked
    # for monitoring is told at once, never left with a service unmonitored.
    options = resolve(flags)
    if options.state_files:
        try:
            ensure_writable_state_dir(options.state_dir)
        except StateDirError as exc:
            raise UsageError(f"{exc}; or run with --state-files false") from None
    check_metrics_port(options.metrics_addr, options.metrics_port)
    env = instrumented_environ(flags)
    name = command[0]
    if not name:
        return _cannot_run(EXIT_NOT_FOUND, "command not found: ''")
    if "/" in name or shutil.which(name, path=env.get("PATH")) is not None:
        _warn_before_running(command, env)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(name, command, env)
    except FileNotFoundError:
        return _cannot_run(EXIT_NOT_FOUND, f"command not found: {name!r}")
    except PermissionError:
        return _cannot_run(EXIT_CANNOT_RUN, f"command not executable: {name!r}")
    except OSError as exc:
        return _cannot_run(EXIT_CANNOT_RUN, f"cannot run {name!r}: {exc.strerror}")
    except ValueError as exc:  # a name exec refuses before trying (with a NUL)
        return _cannot_run(EXIT_CANNOT_RUN, f"cannot run {name!r}: {exc}")
    return 0  # not reached: exec replaced this process


def _warn_before_running(command: list[str], env: dict[str, str]) -> None:
    """Only for a command that will run (found, executable): an error stays one line."""
    name = command[0]
    for variable, closest in unknown_variables(env):
        _warn(unknown_variable_text(variable, closest))
    skipped = python_flags_skipping_bootstrap(command, env.get("PATH"))
    if skipped:
        shown = "/".join(skipped)
        _warn(
            f"{os.path.basename(name)} {shown}: {_WHY[skipped[0]]}, so that process runs without h5watch;"
            f" drop {shown}, or call h5watch.install() in the program"
        )
    if lock.EXTENSION_MISSING:
        _warn(
            f"compiled parts missing ({lock.IMPLEMENTATION_REASON}); the lock hot path"
            " runs in pure Python, slower; install a C compiler and reinstall h5watch"
        )


# As env(1) and timeout(1) exit when they cannot run the command.
EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 126


def _cannot_run(code: int, message: str) -> int:
    sys.stderr.write(f"h5watch run: error: {message}\n")
    return code


def _warn(message: str) -> None:
    sys.stderr.write(f"h5watch run: warning: {message}\n")


def check_metrics_port(addr: str, ports: int | tuple[int, int] | None) -> None:
    """Refuse a ``metrics_port`` no process of CMD could listen on: a port in
    use, every port of a range in use, an address not of this host."""
    if ports is None:
        return
    first, last = ports if isinstance(ports, tuple) else (ports, ports)
    for port in range(first, last + 1):
        try:
            bind_listener(addr, port).close()
            return
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                what = "metrics_addr" if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL else "metrics_port"
                raise UsageError(f"{what}: cannot listen on {addr}:{port} ({exc.strerror})") from None
    if first == last:
        raise UsageError(
            f"metrics_port: {addr}:{first} is in use; choose a free port, or a range such as {first}-{min(first + 6, 65535)}"
            " (each process takes the first free one)"
        )
    raise UsageError(f"metrics_port: every port of {first}-{last} is in use on {addr}; choose another range")


_WHY = {
    "-E": "ignores PYTHONPATH, where h5watch run puts its start-up code",
    "-I": "ignores PYTHONPATH, where h5watch run puts its start-up code",
    "-S": "skips the site module, which runs h5watch run's start-up code",
}


def python_flags_skipping_bootstrap(command: list[str], path: str | None) -> list[str]:
    """Which of ``-E``, ``-I``, ``-S`` a Python command is given, on its
    command line or in its script's ``#!`` line: each keeps the bootstrap
    (a ``sitecustomize`` found through ``PYTHONPATH``) out of it."""
    words = list(command)
    if not _is_python(words[0]):
        interpreter = _shebang(words[0], path)
        if not interpreter or not _is_python(interpreter[0]):
            return []
        words = interpreter + words
    found: list[str] = []
    args = iter(words[1:])
    for arg in args:
        if arg in ("-", "--") or not arg.startswith("-"):
            break
        if arg.startswith("--"):
            if arg == "--check-hash-based-pycs":
                next(args, None)
            continue
        for index, letter in enumerate(arg[1:], 1):
            if letter in "EIS" and f"-{letter}" not in found:
                found.append(f"-{letter}")
            elif letter in "cm":
                return found  # what follows is the program
            elif letter in "WX":
                if index == len(arg) - 1:
                    next(args, None)  # the value is the next word
                break
    return found


def _is_python(program: str) -> bool:
    name = os.path.basename(program)
    return name.startswith("python") and all(ch.isdigit() or ch == "." for ch in name[len("python"):])


def _shebang(program: str, path: str | None) -> list[str]:
    """The interpreter and its flags from ``program``'s ``#!`` line (through
    ``/usr/bin/env [-S]``), or [] if it has none or cannot be read."""
    found = program if "/" in program else shutil.which(program, path=path)
    if not found:
        return []
    try:
        # Never blocks (a FIFO), never reads a device.
        fd = os.open(found, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            line = os.read(fd, 256) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
        finally:
            os.close(fd)
    except OSError:
        return []
    if not line.startswith(b"#!"):
        return []
    words = line[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
    if words and os.path.basename(words[0]) == "env":
        words = words[1:]
        while words and (words[0].startswith("-") or "=" in words[0]):
            words = words[1:]  # env's own options and assignments
    return words
