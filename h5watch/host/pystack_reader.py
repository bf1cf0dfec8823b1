"""``python -m h5watch.host.pystack_reader PID [--native]``: one process's threads, read with pystack, as one JSON line.

Run as a child of the daemon (or of ``h5watch dump``) so that the caller can
bound the read with a timeout and kill it: a target whose memory pystack
cannot make sense of must not hang the caller. With ``--native`` the target is
stopped (ptrace) while it is read and resumed after, and every thread's native
frames are read too; without it the target's memory is read while it runs
(Python frames and the GIL holder only). Prints ``{"threads": [...]}`` or
``{"error": "...", "kind": "..."}``; exits 0 either way.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["main", "MAX_FRAMES"]

# Per thread, Python and native frames each: the innermost are kept.
MAX_FRAMES = 200


def _thread(thread: Any) -> dict[str, Any]:
    python_frames = [
        {"function": frame.code.scope, "file": frame.code.filename, "line": frame.code.location.lineno}
        for frame in thread.frames
    ]
    native_frames = [
        {"symbol": frame.symbol, "library": frame.library, "file": frame.path or None, "line": frame.linenumber or None}
        for frame in thread.native_frames
    ]
    return {
        "native_id": int(thread.tid),
        "holds_gil": bool(thread.holds_the_gil > 0),
        "gil_status": thread.gil_status or None,
        "gc_status": thread.gc_status or None,
        # Outermost first, as a traceback prints them.
        "python_frames": python_frames[-MAX_FRAMES:],
        "native_frames": native_frames[-MAX_FRAMES:],
    }


def main(argv: list[str]) -> int:
    try:
        pid = int(argv[0])
        native = "--native" in argv[1:]
    except (IndexError, ValueError):
        print(json.dumps({"error": "usage: python -m h5watch.host.pystack_reader PID [--native]", "kind": "usage"}))
        return 0
    try:
        from pystack.engine import NativeReportingMode, get_process_threads
    except ImportError as exc:
        print(json.dumps({"error": f"pystack is not installed ({exc}); pip install 'h5watch[pystack]'", "kind": "not_installed"}))
        return 0
    try:
        threads = get_process_threads(pid, stop_process=native,
                                      native_mode=NativeReportingMode.ALL if native else NativeReportingMode.OFF)
        out: dict[str, Any] = {"threads": [_thread(thread) for thread in threads]}
    except Exception as exc:  # pystack's errors are of several kinds; each is one line here
        message = " ".join(str(exc).split()) or type(exc).__name__
        kind = "permission" if "ermission" in message or "ptrace" in message.lower() else "error"
        out = {"error": f"{type(exc).__name__}: {message}"[:2000], "kind": kind}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
