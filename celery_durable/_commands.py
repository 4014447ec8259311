"""What a workflow asks for (commands) and what it is told (completions).

These frozen dataclasses are the only things that cross the boundary between the
runtime (which runs workflow code and knows nothing of Celery or SQL) and the driver
(which stores commands, publishes them, and feeds completions back).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

__all__ = [
    "ACTIVITY",
    "ActivityResolved",
    "Command",
    "CompleteWorkflow",
    "FailWorkflow",
    "HistoryStep",
    "ScheduleActivity",
    "WorkflowInfo",
]

#: The ``kind`` of a step that runs a Celery task.
ACTIVITY = "activity"


@dataclass(frozen=True)
class ScheduleActivity:
    """Run the Celery task ``name`` with these arguments and report its outcome as ``seq``."""

    seq: int
    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    #: The input as the driver will store it, encoded when the step was issued.
    payload: Any = None

    kind = ACTIVITY


@dataclass(frozen=True)
class CompleteWorkflow:
    """The workflow's coroutine returned ``result``."""

    result: Any


@dataclass(frozen=True)
class FailWorkflow:
    """The workflow's coroutine raised ``error``."""

    error: BaseException


Command = ScheduleActivity | CompleteWorkflow | FailWorkflow


@dataclass(frozen=True)
class ActivityResolved:
    """Step ``seq`` finished: with ``value``, or with ``error`` when that is set."""

    seq: int
    value: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class HistoryStep:
    """One recorded step of a run, as replay needs it.

    ``created_turn`` is the driver turn that scheduled the step; ``observed_turn`` the
    turn whose activation delivered its outcome (``None`` while not yet delivered).
    """

    seq: int
    kind: str
    name: str
    created_turn: int
    observed_turn: int | None = None
    outcome: ActivityResolved | None = None


@dataclass(frozen=True)
class WorkflowInfo:
    """Facts about the running workflow, available inside it as ``workflow.info()``."""

    workflow_id: str
    name: str
    start_time: datetime
    attempt: int = 1
