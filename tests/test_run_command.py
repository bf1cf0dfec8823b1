"""``h5watch run -- CMD``: a command that cannot run is one line and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "command, message",
    [
        ("", "command not found: ''"),
        ("no-such-command-h5watch", "command not found: 'no-such-command-h5watch'"),
        ("./", "command not executable: './'"),
        ("/", "command not executable: '/'"),
        ("/dev/null", "command not executable: '/dev/null'"),
    ],
)
def test_a_command_that_cannot_run_is_one_line(command, message, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "h5watch", "run", "--", command, "arg"],
        check=False, capture_output=True, text=True, timeout=50, cwd=tmp_path,
        env={**os.environ, "H5WATCH_STATE_DIR": str(tmp_path)},
    )
    assert result.returncode == 2, result
    assert result.stderr == f"h5watch run: error: {message}\n"
