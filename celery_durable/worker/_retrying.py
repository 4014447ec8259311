"""Waiting out a store that is away, for the writes that must not be lost."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from celery.worker import state as worker_state

from ..store import is_unreachable

__all__ = ["retry_while_unreachable"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: The longest pause between two tries.
MAX_PAUSE = 5.0


def retry_while_unreachable(
    write: Callable[[], T], what: str, patience: float | None = None
) -> T | None:
    """Call ``write`` until it succeeds, pausing (0.1 s, doubling to 5 s) while the store
    is unreachable; any other error propagates.

    Gives up (returning None) after ``patience`` seconds, or when the worker is shutting
    down cold; ``patience=None`` waits as long as the process lives.
    """
    started = time.monotonic()
    pause = 0.1
    warned_at: float | None = None
    while True:
        try:
            result = write()
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            now = time.monotonic()
            if warned_at is None or now - warned_at > 30:
                logger.warning("cannot write %s yet (%s); retrying", what, exc)
                warned_at = now
            out_of_time = patience is not None and now - started + pause > patience
            if out_of_time or worker_state.should_terminate:
                logger.error("gave up writing %s: the store stayed unreachable", what)
                return None
            time.sleep(pause)
            pause = min(pause * 2, MAX_PAUSE)
            continue
        if warned_at is not None:
            logger.warning("wrote %s after the store came back", what)
        return result
