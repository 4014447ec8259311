"""The store's idea of "now", in one place so that every time the store writes comes
from the same function (and a test can move it)."""

from __future__ import annotations

import time

__all__ = ["now"]


def now() -> float:
    """UNIX seconds."""
    return time.time()
