"""The ``h5watch`` command: help, one-line errors with exit code 2 (the demo's output: test_demo.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import REPO

H5WATCH = [sys.executable, "-m", "h5watch"]


def run(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*H5WATCH, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env={**os.environ, **(env or {})})


def test_help_lists_the_subcommands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("run", "daemon", "status", "demo"):
        assert command in result.stdout
    for command in ("run", "daemon", "status", "demo"):
        sub = run(command, "--help")
        assert sub.returncode == 0 and "usage:" in sub.stdout


@pytest.mark.parametrize(
    "args, env, needle",
    [
        (["frobnicate"], {}, "invalid choice"),
        (["demo", "--seconds", "abc"], {}, "--seconds"),
        (["demo", "--seconds", "1000"], {}, "--seconds"),
        (["demo"], {"H5WATCH_ON_ORPHAN": "explode"}, "H5WATCH_ON_ORPHAN"),
        (["status", "--json", "--state-dir"], {}, "--state-dir"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, env, needle):
    result = run(*args, env=env)
    assert result.returncode == 2, result
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr
