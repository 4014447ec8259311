"""What callbacks and errbacks saw, by the tag of the test that ran them.

Shared by the canvas tests, whose tasks run on an embedded worker in the test process.
"""

from __future__ import annotations

import threading
import time
from typing import Any

__all__ = ["see", "seen", "wait_seen"]

_lock = threading.Lock()
seen: dict[str, list[tuple[Any, ...]]] = {}


def see(tag: str, *entry: Any) -> None:
    """Record ``entry`` under ``tag``."""
    with _lock:
        seen.setdefault(tag, []).append(entry)


def wait_seen(tag: str, count: int, timeout: float = 30.0) -> list[tuple[Any, ...]]:
    """What ``tag`` saw once it saw ``count`` things (errbacks sent as tasks run later)."""
    deadline = time.monotonic() + timeout
    while len(seen.get(tag, [])) < count and time.monotonic() < deadline:
        time.sleep(0.01)
    return sorted(seen.get(tag, []), key=repr)
