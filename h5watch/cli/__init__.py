"""The ``h5watch`` command: ``run``, ``daemon``, ``status``, ``top``, ``dump``, ``demo``.

Each subcommand lives in its own module with ``add_arguments(parser)`` and
``main(args) -> int``. A user error anywhere is one line on stderr and exit
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from h5watch import __version__
from h5watch.errors import EXIT_USAGE, UsageError
from h5watch.options import OptionError

__all__ = ["main", "UsageError"]

_SUBCOMMANDS = {
    "run": ("h5watch.cli.run", "run a command with h5watch installed in it (and its children)"),
    "daemon": ("h5watch.host.daemon", "watch every instrumented process on this host and export to Prometheus"),
    "status": ("h5watch.host.status", "show live instrumented processes, lock holders and waiters"),
    "top": ("h5watch.host.top", "a live view of every instrumented process's locks, refreshed in place, like top"),
    "dump": ("h5watch.host.dump", "show one instrumented process from outside: its locks and every thread's stacks"),
    "demo": ("h5watch.demo", "run the built-in demonstration workload"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"{self.prog}: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(EXIT_USAGE)


def version_text() -> str:
    """``h5watch 0.1.0 (compiled hot path; Python 3.11.7)``: which lock
    implementation this interpreter uses, and why when it is not the compiled one."""
    from h5watch.process import implementation

    python = f"Python {sys.version.split()[0]}"
    if implementation.NAME == "compiled":
        return f"h5watch {__version__} (compiled hot path; {python})"
    return f"h5watch {__version__} (pure-Python hot path: {implementation.REASON}; {python})"


class _VersionAction(argparse.Action):
    """argparse's own would wrap the line at the terminal's width."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        sys.stdout.write(version_text() + "\n")
        parser.exit()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; with ``command``, only that subcommand's module is
    imported (another name: none), so ``--version`` and ``--help`` load no
    numpy, h5py or Prometheus client."""
    parser = _Parser(
        prog="h5watch",
        description="Lock-timeout monitoring for h5py's global lock: fork safety, watchdog, Prometheus daemon.",
    )
    parser.add_argument(
        "--version", action=_VersionAction, help="print the version and the lock implementation, then exit"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for name, (module_name, help_text) in _SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if command is None or command == name:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # The top level has no options that take a value: the first word that is
    # not an option names the subcommand.
    command = next((word for word in argv if not word.startswith("-")), "")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except (OptionError, UsageError) as exc:
        sys.stderr.write(f"h5watch {args.command}: error: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130

