"""What a workflow asks for (commands) and what it is told (outcomes).

These frozen dataclasses are the only things that cross the boundary between the
runtime (which runs workflow code and knows nothing of Celery or SQL) and the driver
(which stores commands, carries them out, and feeds outcomes back).

Commands with a ``seq`` create a *step*: a numbered entry of the run's history whose
``kind`` and ``name`` replay checks. The others change the run without adding a step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

__all__ = [
    "ACTIVITY",
    "CHILD",
    "LOCAL",
    "PATCH",
    "SIGNAL",
    "TIMER",
    "CancelStep",
    "Command",
    "CompleteWorkflow",
    "ContinueAsNew",
    "FailWorkflow",
    "HistoryStep",
    "RecordPatch",
    "RunLocal",
    "ScheduleActivity",
    "SetStatus",
    "StartChild",
    "StartTimer",
    "StepCommand",
    "StepOutcome",
    "WaitSignal",
    "WorkflowInfo",
]

#: Step kinds, as stored in history.
ACTIVITY = "activity"  # a Celery task
TIMER = "timer"  # a durable timer
LOCAL = "local"  # a function run inside the driver, its result recorded
SIGNAL = "signal"  # waiting for a signal by name
CHILD = "child"  # a child workflow run
PATCH = "patch"  # a marker that a versioned code path was taken


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

    kind: ClassVar[str] = ACTIVITY


@dataclass(frozen=True)
class StartTimer:
    """Fire at ``when`` (seconds of workflow time since the run started), which is
    ``delay`` seconds after the turn that starts it.

    The store counts ``delay`` from its own clock when the turn commits: the host running
    the turn may be minutes off, and its idea of the deadline must not move the timer.
    """

    seq: int
    when: float
    delay: float
    name: str = "timer"

    kind: ClassVar[str] = TIMER


@dataclass(frozen=True)
class RunLocal:
    """Run ``fn`` inside the driver, record its outcome, then deliver it."""

    seq: int
    name: str
    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    kind: ClassVar[str] = LOCAL


@dataclass(frozen=True)
class WaitSignal:
    """Resolve with the payload of the next signal called ``name`` sent to this run."""

    seq: int
    name: str

    kind: ClassVar[str] = SIGNAL


@dataclass(frozen=True)
class StartChild:
    """Start the workflow ``name`` as a child run and resolve with its result."""

    seq: int
    name: str
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)
    payload: Any = None

    kind: ClassVar[str] = CHILD


@dataclass(frozen=True)
class RecordPatch:
    """Remember that this run took the new path of patch ``name``."""

    seq: int
    name: str

    kind: ClassVar[str] = PATCH


StepCommand = ScheduleActivity | StartTimer | RunLocal | WaitSignal | StartChild | RecordPatch


@dataclass(frozen=True)
class CancelStep:
    """Nobody waits for step ``seq`` any more: cancel it (revoke a task, stop a child)."""

    seq: int


@dataclass(frozen=True)
class SetStatus:
    """Store a progress value readable from outside while the run is in flight."""

    key: str
    value: Any


@dataclass(frozen=True)
class CompleteWorkflow:
    """The workflow's coroutine returned ``result``."""

    result: Any


@dataclass(frozen=True)
class FailWorkflow:
    """The workflow's coroutine raised ``error`` (a CancelledError means it was cancelled)."""

    error: BaseException


@dataclass(frozen=True)
class ContinueAsNew:
    """End this run's history and start it afresh, same id, with these arguments."""

    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]


Command = StepCommand | CancelStep | SetStatus | CompleteWorkflow | FailWorkflow | ContinueAsNew


@dataclass(frozen=True)
class StepOutcome:
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
    outcome: StepOutcome | None = None


@dataclass(frozen=True)
class WorkflowInfo:
    """Facts about the running workflow, available inside it as ``workflow.info()``.

    ``attempt`` counts retries of the run (1 for the first); ``parent_id`` is the id of
    the parent run for a child workflow.
    """

    workflow_id: str
    name: str
    start_time: datetime
    attempt: int = 1
    parent_id: str | None = None
