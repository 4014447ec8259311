"""Helpers for code running inside a workflow: ``from celery_durable import workflow``.

Each finds the running workflow through the current event loop and raises
:class:`~celery_durable.errors.NotInWorkflowError` when called anywhere else. They are
deterministic: a replay of the run returns exactly what the first execution got.
"""

from __future__ import annotations

import random as _random
import uuid as _uuid
from datetime import datetime

from ._commands import WorkflowInfo
from ._instance import current_instance

__all__ = ["info", "now", "random", "uuid4"]


def info() -> WorkflowInfo:
    """The running workflow's id, name, attempt and start time."""
    return current_instance("workflow.info()").info


def now() -> datetime:
    """The workflow's current time (UTC): the time of the current turn, never going back."""
    return current_instance("workflow.now()").now


def random() -> _random.Random:
    """A ``random.Random`` seeded per run, replayed identically."""
    return current_instance("workflow.random()").random


def uuid4() -> _uuid.UUID:
    """A random UUID that is the same on every replay of the run."""
    return _uuid.UUID(int=current_instance("workflow.uuid4()").random.getrandbits(128), version=4)
