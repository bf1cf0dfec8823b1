"""Which lock implementation is in use, and why, is visible everywhere.

``h5watch --version`` names it (loading neither numpy, h5py, structlog nor
prometheus_client), the ``h5watch.installed`` event carries it, and a
missing extension (simulated here by blocking the import of
``h5watch.process._lockcore``) is a ``h5watch.degraded`` warning at install time and
a warning line from ``h5watch run``. Choosing the pure-Python implementation
on purpose (``H5WATCH_IMPLEMENTATION=python``) is not a degradation.
"""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import run_python

from h5watch import __version__
from h5watch.process.lock import CompiledWatchedLock

pytestmark = pytest.mark.timeout(120)

HEAVY = ("numpy", "h5py", "structlog", "prometheus_client")
PYTHON = sys.version.split()[0]
# Stands in for an installation built without a compiler.
BLOCK_EXTENSION = "import sys; sys.modules['h5watch.process._lockcore'] = None\n"
NOT_BUILT = "extension not built: import of h5watch.process._lockcore halted; None in sys.modules"
# Info-level events must be shown, whatever the default log level becomes.
LOG_ENV = {"H5WATCH_LOG_LEVEL": "info", "H5WATCH_LOG_FORMAT": "json"}

needs_compiled = pytest.mark.skipif(CompiledWatchedLock is None, reason="the compiled core is not built here")


def run_cli(args: list[str], *, prelude: str = "", env: dict[str, str] | None = None):
    """``python -m h5watch ARGS`` in a fresh interpreter, and the heavy modules
    it loaded (None when it exec'd another program: ``h5watch run``)."""
    code = prelude + (
        "import runpy, sys\n"
        "sys.argv = ['h5watch', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('h5watch', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exc:\n"
        "    status = exc.code\n"
        f"heavy = sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})\n"
        "sys.stderr.write('\\nloaded: ' + ','.join(heavy) + '\\n')\n"
        "raise SystemExit(status)\n"
    )
    result = run_python(code, args=args, env={"H5WATCH_IMPLEMENTATION": "", **(env or {})})
    lines = result.stderr.strip().splitlines()
    if not lines or not lines[-1].startswith("loaded:"):
        return result, None
    return result, [name for name in lines[-1].removeprefix("loaded:").strip().split(",") if name]


def events(stderr: str) -> list[dict]:
    found = []
    for line in stderr.splitlines():
        if line.startswith("{"):
            found.append(json.loads(line))
    return found


def install_child(*, prelude: str = "", env: dict[str, str] | None = None) -> list[dict]:
    """A fresh interpreter that installs h5watch (twice, reconfiguring) and
    imports h5py; its log events."""
    code = prelude + (
        "import h5watch\n"
        "h5watch.install(state_files=False)\n"
        "h5watch.install(state_files=False, hold_timeout=30)\n"
        "import h5py\n"
    )
    result = run_python(code, env={"H5WATCH_IMPLEMENTATION": "", **LOG_ENV, **(env or {})})
    assert result.returncode == 0, result.stderr[-3000:]
    return events(result.stderr)


def named(found: list[dict], event: str) -> list[dict]:
    return [entry for entry in found if entry.get("event") == event]


# -- h5watch --version ----------------------------------------------------------


@needs_compiled
def test_version_names_the_compiled_hot_path_and_loads_nothing_heavy():
    result, loaded = run_cli(["--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"h5watch {__version__} (compiled hot path; Python {PYTHON})\n"
    assert loaded == []


def test_version_names_the_pure_python_hot_path_and_why():
    result, loaded = run_cli(["--version"], env={"H5WATCH_IMPLEMENTATION": "python"})
    assert result.returncode == 0, result.stderr
    expected = f"h5watch {__version__} (pure-Python hot path: H5WATCH_IMPLEMENTATION=python; Python {PYTHON})\n"
    assert result.stdout == expected
    assert loaded == []


def test_version_says_the_extension_is_missing():
    result, loaded = run_cli(["--version"], prelude=BLOCK_EXTENSION)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"h5watch {__version__} (pure-Python hot path: {NOT_BUILT}; Python {PYTHON})\n"
    assert loaded == []


def test_help_loads_nothing_heavy():
    result, loaded = run_cli(["--help"])
    assert result.returncode == 0 and "status" in result.stdout
    assert loaded == []


def test_import_h5watch_loads_no_runtime():
    result = run_python(
        "import sys, h5watch\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m == 'h5watch.process.runtime'))\n"
        "print(callable(h5watch.install), 'h5watch.process.runtime' in sys.modules)\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "True True"]


# -- the h5watch.installed event and h5watch.degraded ------------------------------


@needs_compiled
def test_installed_event_names_the_compiled_implementation():
    found = install_child()
    (installed,) = named(found, "h5watch.installed")
    assert installed["implementation"] == "compiled"
    assert installed["implementation_reason"] == "compiled"
    assert named(found, "h5watch.degraded") == []


def test_installed_event_names_the_chosen_python_implementation():
    found = install_child(env={"H5WATCH_IMPLEMENTATION": "python"})
    (installed,) = named(found, "h5watch.installed")
    assert installed["implementation"] == "python"
    assert installed["implementation_reason"] == "H5WATCH_IMPLEMENTATION=python"
    assert named(found, "h5watch.degraded") == [], "an explicit choice is not a degradation"


def test_missing_extension_is_one_degraded_warning_at_install():
    found = install_child(prelude=BLOCK_EXTENSION)
    (installed,) = named(found, "h5watch.installed")
    assert installed["implementation"] == "python"
    assert installed["implementation_reason"] == NOT_BUILT
    (degraded,) = named(found, "h5watch.degraded")
    assert degraded["level"] == "warning"
    assert degraded["reason"] == NOT_BUILT
    assert "pure Python" in degraded["slower"]
    assert "C compiler" in degraded["fix"] and "reinstall" in degraded["fix"]


def test_a_missing_extension_is_named_without_the_package_path_and_a_broken_one_with_its_file():
    from h5watch.process.implementation import _import_error

    init = "/somewhere/site-packages/h5watch/process/__init__.py"
    missing = ImportError(f"cannot import name '_lockcore' from 'h5watch.process' ({init})", name="h5watch.process",
                          path=init)
    assert _import_error(missing) == "h5watch.process._lockcore is missing"
    so = "/somewhere/site-packages/h5watch/process/_lockcore.cpython-311-x86_64-linux-gnu.so"
    broken = ImportError(f"{so}: undefined symbol: PyFoo", name="h5watch.process._lockcore", path=so)
    assert _import_error(broken) == f"{so}: undefined symbol: PyFoo"


# -- h5watch run -------------------------------------------------------------------


RUN = ["run", "--state-files", "false", "--", sys.executable, "-c", "pass"]


def run_warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("h5watch run: warning:")]


def test_run_warns_when_the_extension_is_missing():
    result, _ = run_cli(RUN, prelude=BLOCK_EXTENSION)
    assert result.returncode == 0, result.stderr
    warnings = run_warnings(result.stderr)
    assert len(warnings) == 1, result.stderr
    assert NOT_BUILT in warnings[0] and "C compiler" in warnings[0]


@pytest.mark.parametrize("implementation", ["", "python"])
def test_run_does_not_warn_otherwise(implementation):
    if implementation == "" and CompiledWatchedLock is None:
        pytest.skip("the compiled core is not built here")
    result, _ = run_cli(RUN, env={"H5WATCH_IMPLEMENTATION": implementation})
    assert result.returncode == 0, result.stderr
    assert run_warnings(result.stderr) == []


def test_free_threaded_builds_do_not_load_the_compiled_core(monkeypatch):
    """No free-threaded interpreter here: the decision itself, on a faked build."""
    from h5watch.process import implementation

    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    monkeypatch.setattr(sys, "abiflags", "t", raising=False)
    monkeypatch.delenv("H5WATCH_IMPLEMENTATION", raising=False)
    assert implementation._load_compiled() == (None, "free-threaded interpreter")
    monkeypatch.setattr(sys, "abiflags", "", raising=False)
    core, reason = implementation._load_compiled()
    built = importlib.util.find_spec("h5watch.process._lockcore") is not None
    assert (core is not None) is built
    if built:
        assert reason == "compiled"
    else:
        assert reason.startswith("extension not built: ")
