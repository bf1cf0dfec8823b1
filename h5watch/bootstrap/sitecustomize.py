"""Installs h5watch at interpreter start-up, for ``h5watch run``.

``h5watch run`` puts this directory first on ``PYTHONPATH`` and sets
``H5WATCH_BOOTSTRAP=1``: every Python process it starts (and their Python
children, which inherit the environment) imports this module before its own
code, so ``h5watch.install()`` runs before the first ``import h5py``. Options
come from the ``H5WATCH_*`` variables. A ``sitecustomize`` this one shadows
is run afterwards, so the environment's own start-up code still happens.
Then this directory leaves ``sys.path``: the program sees the path it would
have without h5watch, and its imports do not search here first.

Every Python process pays for this module: it imports nothing that start-up
has not loaded already, and ``install()`` defers everything heavy until h5py
is imported (see ``h5watch.process.runtime``).
"""

import importlib.machinery
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def _install() -> None:
    try:
        import h5watch
    except ImportError as exc:
        sys.stderr.write(f"h5watch: not instrumenting {sys.executable}: cannot import h5watch ({exc})\n")
        return
    try:
        h5watch.install()
    except h5watch.OptionError as exc:
        sys.stderr.write(f"h5watch: not instrumenting this process: {exc}\n")


def _without_here() -> list[str]:
    return [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]


def _run_shadowed_sitecustomize() -> None:
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _without_here())
    if spec is None or spec.loader is None:
        return
    from importlib.util import module_from_spec

    module = module_from_spec(spec)
    spec.loader.exec_module(module)


if os.environ.get("H5WATCH_BOOTSTRAP") == "1":
    _install()
sys.path[:] = _without_here()
_run_shadowed_sitecustomize()
