"""Turning the commands of one activation into what the turn commits and publishes.

One method per kind of command, found through a table; each adds to the turn's
:class:`~celery_durable.store.TurnWrite` and to the :class:`Messages` it sends once the
commit has landed.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from .._codec import Codec, encode_error
from ..errors import WorkflowCancelledError, WorkflowEncodeError
from ..runtime import (
    CancelStep,
    Command,
    CompleteWorkflow,
    ContinueAsNew,
    FailWorkflow,
    RecordPatch,
    RunLocal,
    ScheduleActivity,
    SetStatus,
    StartChild,
    StartTimer,
    WaitSignal,
)
from ..store import (
    CANCELLED,
    DELIVERED,
    DONE,
    FAILURE,
    RUNNING,
    SUCCESS,
    NewRun,
    NewStep,
    TurnWrite,
)
from ..worker import DRIVER_OPTION_KEYS
from ._ids import child_run_id

__all__ = ["Messages", "TurnPlan"]

#: content_type and input of steps that have no input of their own.
_EMPTY = ("application/json", b"null")


class Messages:
    """Messages a turn sends once its commit has landed."""

    def __init__(self) -> None:
        self.activities: list[tuple[ScheduleActivity, str]] = []
        self.children: list[tuple[str, str, Mapping[str, Any]]] = []
        #: Local steps ran in this turn: their outcomes are delivered by the next one.
        self.local_steps = 0


class TurnPlan:
    """The write and the messages of one turn, built from its commands.

    Args:
        run_id: the run the turn belongs to.
        label: how errors name the run (``workflow name[id]``).
        codec: encodes results, child inputs and local step outcomes.
        write: the turn's write, filled in by :meth:`add`.
    """

    def __init__(self, run_id: str, label: str, codec: Codec, write: TurnWrite) -> None:
        self.run_id = run_id
        self.label = label
        self.codec = codec
        self.write = write
        self.messages = Messages()
        self._new_steps: list[NewStep] = []
        self._children: list[NewRun] = []
        self._cancelled: list[int] = []
        self._progress: dict[str, Any] = {}

    def add(self, commands: Sequence[Command]) -> TurnPlan:
        """Plan every command, in the order the workflow issued them."""
        for command in commands:
            _PLANNERS[type(command)](self, command)
        self.write.new_steps = self._new_steps
        self.write.children = self._children
        self.write.cancelled = self._cancelled
        self.write.progress = self._progress or None
        return self

    # -- one method per command ---------------------------------------------------------

    def _activity(self, command: ScheduleActivity) -> None:
        content_type, payload = command.payload
        dispatch_id = str(uuid.uuid4())
        self._step(command, content_type, payload, dispatch_id=dispatch_id)
        self.messages.activities.append((command, dispatch_id))

    def _timer(self, command: StartTimer) -> None:
        # Due by the database's clock, counted from the commit: not from this host's.
        self._step(command, *_EMPTY, due_in=command.delay)

    def _signal_wait(self, command: WaitSignal) -> None:
        self._step(command, *_EMPTY)

    def _patch(self, command: RecordPatch) -> None:
        self._step(command, *_EMPTY, state=DELIVERED)

    def _local(self, command: RunLocal) -> None:
        """Run a local step now; it is stored with its outcome."""
        what = f"local step {command.seq} ({command.name}) of {self.label}"
        try:
            value = command.fn(*command.args, **command.kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
            content_type, result = self.codec.dumps(value, f"the result of {what}")
        except Exception as exc:
            self._step(command, *_EMPTY, state=DONE, error=encode_error(exc))
        else:
            self._step(command, content_type, _EMPTY[1], state=DONE, result=result)
        self.messages.local_steps += 1

    def _child(self, command: StartChild) -> None:
        content_type, payload = command.payload
        child_id = child_run_id(self.run_id, command.seq)
        self._step(command, content_type, payload, child_id=child_id)
        child_input = self.codec.dumps(
            [list(command.args), dict(command.kwargs)], f"the arguments of child {child_id}"
        )
        routing = {k: v for k, v in command.options.items() if k in DRIVER_OPTION_KEYS}
        self._children.append(
            NewRun(
                child_id,
                command.name,
                *child_input,
                routing,
                parent_id=self.run_id,
                parent_seq=command.seq,
            )
        )
        self.messages.children.append((child_id, command.name, routing))

    def _cancel(self, command: CancelStep) -> None:
        self._cancelled.append(command.seq)

    def _set_status(self, command: SetStatus) -> None:
        self._progress[command.key] = command.value

    def _complete(self, command: CompleteWorkflow) -> None:
        try:
            self.write.result = self.codec.dumps(command.result, f"the result of {self.label}")
            self.write.status = SUCCESS
        except WorkflowEncodeError as exc:
            self.write.status, self.write.error = FAILURE, encode_error(exc)

    def _fail(self, command: FailWorkflow) -> None:
        if isinstance(command.error, asyncio.CancelledError):
            self.write.status = CANCELLED
            self.write.error = encode_error(WorkflowCancelledError(f"{self.label} was cancelled"))
        else:
            self.write.status, self.write.error = FAILURE, encode_error(command.error)

    def _continue_as_new(self, command: ContinueAsNew) -> None:
        try:
            self.write.restart = self.codec.dumps(
                [list(command.args), dict(command.kwargs)],
                f"the arguments given to continue_as_new by {self.label}",
            )
            self.write.status = RUNNING
        except WorkflowEncodeError as exc:
            self.write.status, self.write.error = FAILURE, encode_error(exc)

    def _step(
        self,
        command: ScheduleActivity | StartTimer | WaitSignal | RecordPatch | RunLocal | StartChild,
        content_type: str,
        payload: bytes,
        dispatch_id: str | None = None,
        **fields: Any,
    ) -> None:
        self._new_steps.append(
            NewStep(
                command.seq,
                command.kind,
                command.name,
                content_type,
                payload,
                dispatch_id or str(uuid.uuid4()),
                **fields,
            )
        )


_PLANNERS: dict[type[Any], Callable[[TurnPlan, Any], None]] = {
    ScheduleActivity: TurnPlan._activity,
    StartTimer: TurnPlan._timer,
    WaitSignal: TurnPlan._signal_wait,
    RecordPatch: TurnPlan._patch,
    RunLocal: TurnPlan._local,
    StartChild: TurnPlan._child,
    CancelStep: TurnPlan._cancel,
    SetStatus: TurnPlan._set_status,
    CompleteWorkflow: TurnPlan._complete,
    FailWorkflow: TurnPlan._fail,
    ContinueAsNew: TurnPlan._continue_as_new,
}


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value
