"""The runtime layer: run a workflow coroutine deterministically, turn its awaits into
commands, and rebuild it from history.

It does no I/O and imports nothing of Celery, kombu or SQLAlchemy (a test holds the
rule): the driver decides where outcomes come from and what commands turn into. Parts:

* ``_commands`` — frozen commands (what a workflow asks for) and outcomes (what it is
  told), the only things that cross into the driver.
* ``_loop`` — :class:`WorkflowEventLoop`, an asyncio loop with a FIFO ready queue and
  virtual time, on which nothing real ever waits.
* ``_instance`` — :class:`WorkflowInstance`, one run's coroutine, activated turn by turn.
* ``_replay`` — :func:`replay`, bringing a fresh instance up to the recorded turn and
  raising :class:`~celery_durable.errors.NonDeterminismError` where code and history
  disagree.
"""

from __future__ import annotations

from ._commands import (
    ACTIVITY,
    CHILD,
    LOCAL,
    PATCH,
    SIGNAL,
    TIMER,
    CancelStep,
    Command,
    CompleteWorkflow,
    ContinueAsNew,
    FailWorkflow,
    HistoryStep,
    RecordPatch,
    RunLocal,
    ScheduleActivity,
    SetStatus,
    StartChild,
    StartTimer,
    StepCommand,
    StepOutcome,
    WaitSignal,
    WorkflowInfo,
)
from ._instance import MAX_TIMER_SECONDS, ContinueAsNewRequest, WorkflowInstance, current_instance
from ._loop import WorkflowEventLoop
from ._replay import replay

__all__ = [
    "ACTIVITY",
    "CHILD",
    "LOCAL",
    "MAX_TIMER_SECONDS",
    "PATCH",
    "SIGNAL",
    "TIMER",
    "CancelStep",
    "Command",
    "CompleteWorkflow",
    "ContinueAsNew",
    "ContinueAsNewRequest",
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
    "WorkflowEventLoop",
    "WorkflowInfo",
    "WorkflowInstance",
    "current_instance",
    "replay",
]
