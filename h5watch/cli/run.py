"""``h5watch run [options] -- CMD...``: CMD with h5watch installed, no code change.

The options become ``H5WATCH_*`` variables, and ``h5watch/bootstrap`` goes
first on ``PYTHONPATH``: its ``sitecustomize`` calls ``h5watch.install()``
in every Python process CMD starts, before that process's first ``import
h5py``. Then this process becomes CMD (``exec``), so CMD's exit status and
signals are its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from h5watch.errors import UsageError
from h5watch.options import OPTION_HELP, OPTION_NAMES, as_environ, resolve
from h5watch.process import lock
from h5watch.statefile import StateDirError, ensure_state_dir

__all__ = ["add_arguments", "main", "bootstrap_dir", "instrumented_environ"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.usage = "h5watch run [options] -- CMD [ARG...]"
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
    options = resolve(flags)  # OptionError: one line, exit 2, before anything runs
    if options.state_files:
        try:
            ensure_state_dir(options.state_dir)
        except StateDirError as exc:
            # Monitoring never stops the service: CMD runs, unmonitored, and
            # each of its processes logs state.unavailable.
            sys.stderr.write(f"h5watch run: warning: {exc}; running without state files\n")
    env = instrumented_environ(flags)
    if not command[0] or ("/" not in command[0] and shutil.which(command[0], path=env.get("PATH")) is None):
        raise UsageError(f"command not found: {command[0]!r}")
    if lock.EXTENSION_MISSING:
        # Only for a command that will run: a usage error stays one line.
        sys.stderr.write(
            f"h5watch run: warning: compiled parts missing ({lock.IMPLEMENTATION_REASON}); the lock hot path"
            " runs in pure Python, slower; install a C compiler and reinstall h5watch\n"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except FileNotFoundError:
        raise UsageError(f"command not found: {command[0]!r}") from None
    except PermissionError:
        raise UsageError(f"command not executable: {command[0]!r}") from None
    except OSError as exc:
        raise UsageError(f"cannot run {command[0]!r}: {exc.strerror}") from None
    except ValueError as exc:  # a name exec refuses before trying (empty, or with a NUL)
        raise UsageError(f"cannot run {command[0]!r}: {exc}") from None
    return 0  # not reached: exec replaced this process
