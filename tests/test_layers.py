"""The package's layers, read from the modules' own imports.

``process/`` runs inside instrumented processes, ``host/`` on the host;
they meet only in the state file's format (``statefile``) and the shared
modules, and never import each other. ``export/`` serves both and imports
neither. The commands a host runs (``status``, ``daemon``, ``--version``)
load neither h5py nor the in-process runtime.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "h5watch"
SHARED = {"h5watch.options", "h5watch.logs", "h5watch.errors", "h5watch.schema", "h5watch.statefile",
          "h5watch.statedir", "h5watch.records", "h5watch.recorder"}

# What each layer may import from h5watch, besides itself and SHARED.
ALLOWED = {
    "process": {"export"},
    "host": {"export"},
    "export": set(),
    "shared": set(),
    "cli": {"process", "host", "export", "demo"},
    "demo": {"process", "export", "host", "cli"},
    "bootstrap": {"api"},
    "pytest_plugin": {"api"},
}


def _layer(module: str) -> str:
    if module in SHARED:
        return "shared"
    if module in ("h5watch", "h5watch.__main__"):
        return "api"
    return module.split(".")[1]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every h5watch module this file imports, at the top or inside a function."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            # ``from h5watch.process import lock`` imports h5watch.process.lock.
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if (PACKAGE.parent / base.replace(".", "/") / f"{alias.name}.py").exists()
                         or (PACKAGE.parent / base.replace(".", "/") / alias.name).is_dir())
    return {name for name in found if name == "h5watch" or name.startswith("h5watch.")}


MODULES = sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_layers_cover_every_module():
    layers = {_layer(_module_name(path)) for path in MODULES}
    assert layers <= set(ALLOWED) | {"api"}, layers - set(ALLOWED)
    assert {"process", "host", "export", "shared"} <= layers


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_each_module_imports_only_what_its_layer_may(path):
    layer = _layer(_module_name(path))
    if layer == "api":
        return  # the public API loads the in-process runtime lazily, on first use
    allowed = ALLOWED[layer] | {layer, "shared"}
    wrong = sorted(name for name in _imports(path) if name != "h5watch" and _layer(name) not in allowed)
    assert not wrong, f"{_module_name(path)} ({layer}) imports {wrong}"


def test_the_import_reader_sees_a_forbidden_import(tmp_path):
    """The check can fail: a host module importing the lock is caught."""
    bad = PACKAGE / "host" / "_layers_probe_tmp.py"
    bad.write_text("def f():\n    from h5watch.process import lock\n    from ..process.fork import ForkGuard\n")
    try:
        assert {"h5watch.process.lock", "h5watch.process.fork"} <= _imports(bad)
    finally:
        bad.unlink()


def _modules_loaded(code: str, *args: str) -> list[str]:
    """The modules a fresh interpreter has loaded when ``code`` ends (exit included)."""
    read, write = os.pipe()
    probe = (
        "import atexit, json, os, sys\n"
        f"atexit.register(lambda: os.write({write}, json.dumps(sorted(sys.modules)).encode()))\n"
        f"{code}\n"
    )
    try:
        proc = subprocess.run([sys.executable, "-c", probe, *args], pass_fds=(write,), capture_output=True,
                              text=True, timeout=60)
    finally:
        os.close(write)
    with os.fdopen(read) as pipe:
        loaded = json.loads(pipe.read() or "[]")
    assert loaded, proc.stderr
    return loaded


def _runtime_or_h5py(loaded: list[str]) -> list[str]:
    return [name for name in loaded
            if name.split(".")[0] == "h5py" or (name.startswith("h5watch.process.") and name != "h5watch.process.implementation"
                                                 and name != "h5watch.process._lockcore")]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("argv", [
    ["status", "--json", "--state-dir", "{state_dir}"],
    ["status", "--state-dir", "{state_dir}"],
    ["top", "--once", "--state-dir", "{state_dir}"],
    ["daemon", "--help"],
    ["--version"],
], ids=" ".join)
def test_host_commands_load_neither_h5py_nor_the_in_process_runtime(argv, tmp_path):
    argv = [word.format(state_dir=tmp_path) for word in argv]
    code = "import sys\nfrom h5watch.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass"
    loaded = _modules_loaded(code, *argv)
    assert "h5watch.cli" in loaded
    assert _runtime_or_h5py(loaded) == []


@pytest.mark.timeout(90)
def test_the_daemon_loop_loads_neither_h5py_nor_the_in_process_runtime(tmp_path):
    code = (
        "import sys\nfrom h5watch.host.daemon import Daemon\nfrom h5watch.host import status\n"
        "import h5watch.export.server, h5watch.export.metrics, h5watch.host.reaper, h5watch.host.totals\n"
    )
    loaded = _modules_loaded(code)
    assert "h5watch.host.daemon" in loaded
    assert _runtime_or_h5py(loaded) == []


@pytest.mark.timeout(90)
def test_the_probe_sees_the_runtime_when_it_is_loaded():
    """The check can fail: the library side does load what the host side must not."""
    loaded = _modules_loaded("import h5watch\nh5watch.install(state_files=False)\nimport h5py")
    assert "h5watch.process.runtime" in _runtime_or_h5py(loaded)
    assert "h5py" in _runtime_or_h5py(loaded)


@pytest.mark.timeout(90)
def test_importtime_of_status_json_shows_neither_h5py_nor_the_in_process_runtime(tmp_path):
    """As an operator checks it: ``python -X importtime -m h5watch status --json``."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "h5watch", "status", "--json", "--state-dir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    # (importlib.import_module, which the CLI uses for its subcommand, is not
    # timed; what that module imports is.)
    assert "h5watch.statefile" in imported, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["processes"] == []
    assert [name for name in imported if name.split(".")[0] == "h5py" or name.startswith("h5watch.process")] == []
