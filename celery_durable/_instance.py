"""One workflow run's coroutine, driven activation by activation.

A :class:`WorkflowInstance` owns a :class:`WorkflowEventLoop` and the run's main task.
Each :meth:`~WorkflowInstance.activate` delivers step outcomes, runs the loop until every
task is blocked, and returns the commands the code issued meanwhile. It does no I/O: the
driver decides where the outcomes come from and what the commands turn into.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from ._commands import (
    ActivityResolved,
    Command,
    CompleteWorkflow,
    FailWorkflow,
    ScheduleActivity,
    WorkflowInfo,
)
from ._loop import WorkflowEventLoop
from .errors import NotInWorkflowError, WorkflowAwaitError

__all__ = ["WorkflowInstance", "current_instance"]

WorkflowFunction = Callable[..., Coroutine[Any, Any, Any]]


class WorkflowInstance:
    """A workflow coroutine suspended between driver turns."""

    def __init__(
        self,
        fn: WorkflowFunction,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        info: WorkflowInfo,
        encode: Callable[[ScheduleActivity], Any] | None = None,
    ) -> None:
        self.info = info
        # Encodes a step's input as it is issued, so that a value the serializer cannot
        # take fails at the workflow's await rather than later in the driver.
        self._encode = encode
        self.loop = WorkflowEventLoop(owner=self)
        self.now = info.start_time
        self.random = random.Random(info.workflow_id)
        self.turn = 0
        self._fn = fn
        self._args = tuple(args)
        self._kwargs = dict(kwargs)
        self._main: asyncio.Task[Any] | None = None
        self._next_seq = 1
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._issued: list[Command] = []
        self.finished = False

    # -- called by workflow code (through the public helpers) ----------------------------

    def schedule_activity(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> asyncio.Future[Any]:
        """Issue a :class:`ScheduleActivity` and return the future its outcome resolves."""
        command = ScheduleActivity(self._next_seq, name, tuple(args), dict(kwargs), dict(options))
        if self._encode is not None:
            command = replace(command, payload=self._encode(command))
        self._next_seq += 1
        future = self.loop.create_future()
        self._waiting[command.seq] = future
        self._issued.append(command)
        return future

    # -- called by the driver -----------------------------------------------------------

    def activate(self, outcomes: Sequence[ActivityResolved], now: datetime) -> list[Command]:
        """Deliver ``outcomes`` in order, run until blocked, and return the new commands.

        The first activation starts the coroutine. ``now`` is the turn's recorded time;
        it never moves the workflow's clock backwards.
        """
        if self.finished:
            raise RuntimeError(f"workflow {self.info.workflow_id} has already finished")
        self.turn += 1
        if now > self.now:
            self.now = now
        self.loop.set_time((self.now - self.info.start_time).total_seconds())
        if self._main is None:
            self._main = self.loop.create_task(self._fn(*self._args, **self._kwargs))
        for outcome in outcomes:
            future = self._waiting.pop(outcome.seq, None)
            # A future the code already cancelled (or a step it never awaited again after
            # a code change) has nobody waiting: its outcome is simply dropped.
            if future is None or future.done():
                continue
            if outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.value)
        self.loop.run_until_quiescent()
        issued, self._issued = self._issued, []
        if self._main.done():
            self.finished = True
            issued.append(self._outcome(self._main, self.info))
            self.loop.close()
        return issued

    @staticmethod
    def _outcome(task: asyncio.Task[Any], info: WorkflowInfo) -> CompleteWorkflow | FailWorkflow:
        if task.cancelled():
            return FailWorkflow(asyncio.CancelledError())
        error = task.exception()
        if isinstance(error, TypeError) and "can't be used in 'await' expression" in str(error):
            # Python's own message does not say what to await instead.
            wrapped = WorkflowAwaitError(
                f"workflow {info.name}[{info.workflow_id}]: {error}. Inside a workflow, "
                "await task signatures (`await task.s(...)`), coroutines and asyncio "
                "primitives such as asyncio.gather."
            )
            wrapped.__cause__ = error
            wrapped.__traceback__ = error.__traceback__
            return FailWorkflow(wrapped)
        if error is not None:
            return FailWorkflow(error)
        return CompleteWorkflow(task.result())

    @property
    def pending_seqs(self) -> list[int]:
        """Steps issued and still awaited, in order."""
        return sorted(self._waiting)


def current_instance(helper: str) -> WorkflowInstance:
    """The instance whose loop is running now, or a :class:`NotInWorkflowError`.

    ``helper`` names what the caller tried to use, for the error message.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    owner = getattr(loop, "owner", None)
    if not isinstance(owner, WorkflowInstance):
        raise NotInWorkflowError(
            f"{helper} can only be used inside a running @durable_workflow; outside one, "
            "start tasks with .delay()/.apply_async() and workflows with their .delay()"
        )
    return owner
