"""The daemon's persisted totals: what exited processes counted, across restarts."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["read", "write"]


def read(path: str) -> dict[str, Any] | None:
    """The saved totals, or None when there are none yet."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def write(path: str, data: dict[str, Any]) -> None:
    """Replace the totals atomically (write, fsync, rename)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
