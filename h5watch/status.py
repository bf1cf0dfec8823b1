"""Placeholder: see the issue that builds this subcommand."""

from __future__ import annotations

import argparse

from .cli import UsageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    raise UsageError("'status' is not built yet")
