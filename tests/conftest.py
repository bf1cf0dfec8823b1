"""Shared fixtures: real HDF5 files, real child interpreters with hard timeouts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session):
    """Where CI tests an installed build, fail at once if a source tree shadows it."""
    expected = os.environ.get("H5WATCH_EXPECT_PACKAGE_UNDER")
    if expected:
        import h5watch

        found = Path(h5watch.__file__).resolve().parent
        if found != Path(expected).resolve():
            raise pytest.UsageError(f"h5watch imported from {found}, expected the install at {expected}")


def make_h5(path: Path, seed: int = 0, shape: tuple[int, int] = (200, 200)) -> np.ndarray:
    """Write a real HDF5 file with a dataset 'values' and an attribute 'x'."""
    import h5py

    data = np.random.default_rng(seed).random(shape)
    with h5py.File(path, "w") as f:
        f["values"] = data
        f.attrs["x"] = seed
    return data


@pytest.fixture
def h5_file(tmp_path: Path) -> Path:
    path = tmp_path / "data.h5"
    make_h5(path)
    return path


def run_python(
    code: str,
    *,
    python: str | None = None,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    args: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter; kill its whole process group on timeout."""
    full_env = dict(os.environ)
    full_env.pop("PYTHONPATH", None)
    full_env.update(env or {})
    return run_command([python or sys.executable, "-c", textwrap.dedent(code), *(args or [])], timeout=timeout,
                       env=full_env, cwd=cwd)


def run_command(command: list[str], *, timeout: float, what: str = "child", **popen: object) -> subprocess.CompletedProcess:
    """Run ``command`` in a session of its own; its whole process group is
    killed at the end, and on timeout (an AssertionError with its output)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            **popen)  # type: ignore[call-overload]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{what} timed out after {timeout} s\nstdout:\n{out}\nstderr:\n{err}") from None
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture
def python313() -> str:
    """The interpreter of the second environment, with h5py 3.13 (pre-fix)."""
    python = os.environ.get("H5WATCH_TEST_PY313")
    if not python:
        if os.environ.get("H5WATCH_REQUIRE_PY313"):
            pytest.fail("H5WATCH_TEST_PY313 is not set but H5WATCH_REQUIRE_PY313 is")
        pytest.skip("H5WATCH_TEST_PY313 not set (the h5py 3.13 environment)")
    return python


def _lock_classes() -> dict:
    from h5watch.process.lock import CompiledWatchedLock, PythonWatchedLock

    classes = {"python": PythonWatchedLock}
    if CompiledWatchedLock is not None:
        classes["compiled"] = CompiledWatchedLock
    return classes


@pytest.fixture(params=sorted(_lock_classes()))
def lock_class(request):
    """Each WatchedLock implementation built here: they must behave the same."""
    return _lock_classes()[request.param]


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def workers():
    """Start real instrumented workers (``daemon_support.start_worker``'s
    arguments); every one is killed, with its process group, at the end."""
    from daemon_support import kill_group, start_worker

    started: list = []

    def start(*args, **kwargs):
        proc = start_worker(*args, **kwargs)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        kill_group(proc)


@pytest.fixture
def daemons(tmp_path: Path):
    """Start real daemons (``start(state_dir, *args)``); every one is stopped at the end."""
    from daemon_support import DaemonProcess

    started: list[DaemonProcess] = []

    def start(state_dir: Path, *args: str, kind: type[DaemonProcess] = DaemonProcess) -> DaemonProcess:
        daemon = kind(state_dir, tmp_path / f"daemon-{len(started)}.log", *args)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()
