"""Which hot path this interpreter runs: the compiled core or its pure-Python
mirror, and why. Loaded alone by ``h5watch --version``, which must say so
without loading the in-process runtime."""

from __future__ import annotations

import os
import sys
from typing import Any

from h5watch.schema import BUCKET_BOUNDS_NS, COUNTER_LAYOUT, DEAD_OWNER, OPERATION_LAYOUT, OPERATION_NAME_LAYOUT

__all__ = ["EXTENSION_MISSING", "NAME", "REASON", "compiled_core", "shared_numbers", "shared_numbers_of"]

_NOT_BUILT = "extension not built"


def _free_threaded_build() -> bool:
    if not hasattr(sys, "_is_gil_enabled"):  # before 3.13: no free-threaded builds
        return False
    abiflags = getattr(sys, "abiflags", None)
    if abiflags is not None:
        return "t" in abiflags
    import sysconfig

    return bool(sysconfig.get_config_var("Py_GIL_DISABLED"))


def _load_compiled() -> tuple[Any, str]:
    """The compiled core, or None; and why."""
    if os.environ.get("H5WATCH_IMPLEMENTATION", "").strip().lower() == "python":
        return None, "H5WATCH_IMPLEMENTATION=python"
    if _free_threaded_build():
        # The core's field updates rely on the GIL for atomicity.
        return None, "free-threaded interpreter"
    try:
        from h5watch.process import _lockcore
    except ImportError as exc:
        return None, f"{_NOT_BUILT}: {_import_error(exc)}"
    if shared_numbers_of(_lockcore) != shared_numbers():
        return None, f"{_NOT_BUILT}: the compiled core was built from another version of h5watch (reinstall it)"
    return _lockcore, "compiled"


def _import_error(exc: ImportError) -> str:
    """Why the compiled core did not import. Not there at all ("cannot import
    name '_lockcore' from 'h5watch.process' (.../__init__.py)"): said so, with
    no path (the package's own file names nothing to fix); anything else (a
    broken or foreign extension file) as the import system says it."""
    if exc.name == __package__ and str(exc).startswith("cannot import name '_lockcore'"):
        return "h5watch.process._lockcore is missing"
    return str(exc)


def shared_numbers() -> dict[str, Any]:
    """The numbers the compiled core must agree on, as h5watch.schema has them."""
    return {"COUNTER_LAYOUT": COUNTER_LAYOUT, "BOUNDS_NS": BUCKET_BOUNDS_NS, "DEAD_OWNER": DEAD_OWNER,
            "OPERATION_LAYOUT": OPERATION_LAYOUT, "OPERATION_NAME_LAYOUT": OPERATION_NAME_LAYOUT}


def shared_numbers_of(core: Any) -> dict[str, Any]:
    """The same numbers as the compiled core declares them."""
    return {
        "COUNTER_LAYOUT": tuple(getattr(core, "COUNTER_LAYOUT", ())),
        "BOUNDS_NS": tuple(getattr(core, "BOUNDS_NS", ())),
        "DEAD_OWNER": getattr(core, "DEAD_OWNER", None),
        "OPERATION_LAYOUT": tuple(getattr(core, "OPERATION_LAYOUT", ())),
        "OPERATION_NAME_LAYOUT": tuple(getattr(core, "OPERATION_NAME_LAYOUT", ())),
    }


compiled_core, REASON = _load_compiled()
NAME = "compiled" if compiled_core is not None else "python"
# The compiled core should be there and is not (no compiler at install time):
# everything works, the hot path is slower. Not so for an explicit choice or
# a free-threaded interpreter, where it is off on purpose.
EXTENSION_MISSING = REASON.startswith(_NOT_BUILT)
