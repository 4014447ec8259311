"""One driver turn: load the run, bring its coroutine up to date, advance it, commit, publish.

A turn is what the workflow's Celery task does each time a wake message arrives. It holds
no lock while workflow code runs: the commit is fenced on the run's turn number, so when
two workers race on one run exactly one commit lands and the other turn does nothing.
Suspended coroutines are kept in a per-process cache so that the usual turn (the same
process that ran the previous turn) skips replaying history altogether.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import datetime, timezone
from typing import Any

from celery import Celery

from ._codec import Codec, decode_error, encode_error
from ._commands import (
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
    StepOutcome,
    WaitSignal,
    WorkflowInfo,
)
from ._config import settings_for, store_for
from ._instance import WorkflowInstance
from ._messages import DRIVER_OPTION_KEYS, batched, publish_step, publish_wake, step_headers
from ._replay import replay
from ._store import (
    ACTIVE,
    CANCELLED,
    DELIVERED,
    DONE,
    FAILURE,
    RUNNING,
    STUCK,
    SUCCESS,
    NewRun,
    NewStep,
    RunRecord,
    StepRecord,
    Store,
    TurnCommitted,
    TurnWrite,
)
from .errors import (
    HistoryWriteError,
    NonDeterminismError,
    WorkflowCancelledError,
    WorkflowEncodeError,
)

__all__ = ["DriverTurn", "InstanceCache"]

logger = logging.getLogger(__name__)


class InstanceCache:
    """Suspended workflow instances of this process, least recently used evicted first.

    An instance is found again by run id, turn and incarnation: continue-as-new starts
    the run over at turn 0 under the same id, so a turn number alone could hand a later
    incarnation the coroutine of an earlier one (still cached by another process).
    """

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[int, WorkflowInstance]] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, run_id: str, turn: int, incarnation: int = 0) -> WorkflowInstance | None:
        """Remove and return the instance of ``run_id`` if it is exactly at ``turn`` of
        ``incarnation`` (the run's ``seq_base``)."""
        with self._lock:
            item = self._items.pop(run_id, None)
        if item is not None and item[0] == incarnation and item[1].turn == turn:
            return item[1]
        if item is not None:
            item[1].close()  # out of date: another process moved the run on
        return None

    def put(
        self, run_id: str, instance: WorkflowInstance, capacity: int, incarnation: int = 0
    ) -> None:
        """Keep ``instance`` (of ``incarnation``) for the next turn of ``run_id``."""
        if capacity <= 0:
            instance.close()
            return
        evicted = []
        with self._lock:
            self._items[run_id] = (incarnation, instance)
            self._items.move_to_end(run_id)
            while len(self._items) > capacity:
                evicted.append(self._items.popitem(last=False)[1][1])
        for old in evicted:
            old.close()

    def clear(self) -> None:
        """Forget every instance."""
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        for _, instance in items:
            instance.close()

    def __len__(self) -> int:
        return len(self._items)


#: The cache of this process; a forked child starts with the parent's copy, which stays
#: correct because instances are only reused at the exact turn the store reports.
cache = InstanceCache()


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


#: Turns a driver may run back to back in one task, when local steps or buffered
#: signals make the next turn ready at once.
MAX_TURNS_IN_ONE_TASK = 100


class DriverTurn:
    """Runs the turns of one run that are ready. Create one per wake message, call :meth:`run`."""

    def __init__(
        self,
        app: Celery,
        workflow: str,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        run_id: str,
    ) -> None:
        self.app = app
        self.workflow = workflow
        self.fn = fn
        self.run_id = run_id
        self.settings = settings_for(app)
        self.codec: Codec = self.settings.codec
        self.store: Store = store_for(app)

    @property
    def _label(self) -> str:
        return f"workflow {self.workflow}[{self.run_id}]"

    def run(self) -> str | None:
        """Do the turns that are ready; returns the run's status (None if there is no run)."""
        status: str | None = None
        for _ in range(MAX_TURNS_IN_ONE_TASK):
            status, again = self._turn()
            if not again:
                return status
        # Still more to do: let another task (maybe another worker) carry on.
        run = self.store.get_run(self.run_id)
        if run is not None:
            publish_wake(self.app, self.workflow, self.run_id, run.options)
        return status

    def _turn(self) -> tuple[str | None, bool]:
        start = self.store.begin_turn(self.run_id)
        if start is None:
            logger.warning("%s: no such run in the store; wake ignored", self._label)
            return None, False
        run = start.run
        if run.status not in ACTIVE:
            return run.status, False
        cancel = run.cancel_requested and run.cancel_turn is None
        if run.turn > 0 and not start.new_outcomes and not cancel:
            return run.status, False  # a duplicate or coalesced wake: nothing new

        instance = cache.take(self.run_id, run.turn, run.seq_base)
        # The turn's time; the first turn's becomes the run's start time, which replays
        # read back from the store, so the first execution must see the same value.
        at = time.time()
        try:
            if instance is None:
                instance = self._rebuild(run, at)
            outcomes = [self._outcome(step) for step in start.new_outcomes]
            commands = instance.activate(outcomes, _utc(at), cancel=cancel)
        except NonDeterminismError as exc:
            logger.error("%s is STUCK: %s", self._label, exc)
            self.store.park(self.run_id, run.turn, STUCK, encode_error(exc))
            return STUCK, False
        except Exception as exc:
            # Not the workflow's own exception (those fail the run inside activate): its
            # history could not be loaded or replayed here. Park it rather than retry
            # forever; it resumes on retry() or when a worker with fixed code starts.
            logger.exception("%s is STUCK: its history could not be replayed", self._label)
            self.store.park(self.run_id, run.turn, STUCK, encode_error(exc))
            return STUCK, False

        write = TurnWrite(
            turn=run.turn,
            at=at,
            delivered=[step.seq for step in start.new_outcomes],
            cancel_delivered=cancel,
        )
        plan = _Publish()
        self._plan(run, instance, commands, write, plan)

        try:
            committed = self.store.commit_turn(self.run_id, write)
        except HistoryWriteError as exc:
            # The database refuses this turn's writes and would refuse them again on
            # every retry: park the run with the reason instead of waking it forever.
            logger.error("%s is STUCK: %s", self._label, exc)
            instance.close()
            self.store.park(self.run_id, run.turn, STUCK, encode_error(exc))
            return STUCK, False
        if committed is None:
            # Another turn moved the run on first. It may not have seen what this one
            # saw, so make sure someone looks again.
            logger.info("%s: turn %d lost a race; waking the run again", self._label, run.turn)
            instance.close()
            publish_wake(self.app, self.workflow, self.run_id, run.options)
            return None, False

        if not instance.finished:
            cache.put(self.run_id, instance, self.settings.cache_size, run.seq_base)
        else:
            instance.close()  # tasks it left pending must not run at garbage collection
        self._publish(run, plan, committed)
        if write.status == FAILURE and write.error is not None:
            logger.info("%s failed: %s", self._label, write.error.get("message"))
        again = plan.local_steps or committed.ready_now or write.restart is not None
        return write.status, bool(again)

    # -- turning commands into a write and messages --------------------------------------

    def _plan(
        self,
        run: RunRecord,
        instance: WorkflowInstance,
        commands: list[Command],
        write: TurnWrite,
        plan: _Publish,
    ) -> None:
        new_steps: list[NewStep] = []
        progress: dict[str, Any] = {}
        cancelled: list[int] = []
        start = run.started_at or write.at
        for command in commands:
            if isinstance(command, ScheduleActivity):
                content_type, payload = command.payload
                dispatch_id = str(uuid.uuid4())
                new_steps.append(
                    NewStep(
                        command.seq, command.kind, command.name, content_type, payload, dispatch_id
                    )
                )
                plan.activities.append((command, dispatch_id))
            elif isinstance(command, StartTimer):
                new_steps.append(
                    NewStep(
                        command.seq,
                        command.kind,
                        command.name,
                        *_EMPTY,
                        dispatch_id=str(uuid.uuid4()),
                        due=start + command.when,
                    )
                )
            elif isinstance(command, WaitSignal):
                new_steps.append(
                    NewStep(command.seq, command.kind, command.name, *_EMPTY, str(uuid.uuid4()))
                )
            elif isinstance(command, RecordPatch):
                new_steps.append(
                    NewStep(
                        command.seq,
                        command.kind,
                        command.name,
                        *_EMPTY,
                        str(uuid.uuid4()),
                        state=DELIVERED,
                    )
                )
            elif isinstance(command, RunLocal):
                new_steps.append(self._run_local(command))
                plan.local_steps += 1
            elif isinstance(command, StartChild):
                content_type, payload = command.payload
                child_id = f"{self.run_id}/{command.seq}"
                new_steps.append(
                    NewStep(
                        command.seq,
                        command.kind,
                        command.name,
                        content_type,
                        payload,
                        str(uuid.uuid4()),
                        child_id=child_id,
                    )
                )
                args, kwargs, options = command.args, command.kwargs, command.options
                child_input = self.codec.dumps(
                    [list(args), dict(kwargs)], f"the arguments of child {child_id}"
                )
                driver_options = {k: v for k, v in options.items() if k in DRIVER_OPTION_KEYS}
                write.children = [
                    *write.children,
                    NewRun(
                        child_id,
                        command.name,
                        *child_input,
                        driver_options,
                        parent_id=self.run_id,
                        parent_seq=command.seq,
                    ),
                ]
                plan.children.append((child_id, command.name, driver_options))
            elif isinstance(command, CancelStep):
                cancelled.append(command.seq)
            elif isinstance(command, SetStatus):
                progress[command.key] = command.value
            elif isinstance(command, CompleteWorkflow):
                try:
                    write.result = self.codec.dumps(command.result, f"the result of {self._label}")
                    write.status = SUCCESS
                except WorkflowEncodeError as exc:
                    write.status, write.error = FAILURE, encode_error(exc)
            elif isinstance(command, FailWorkflow):
                if isinstance(command.error, asyncio.CancelledError):
                    write.status = CANCELLED
                    write.error = encode_error(
                        WorkflowCancelledError(f"{self._label} was cancelled")
                    )
                else:
                    write.status, write.error = FAILURE, encode_error(command.error)
            elif isinstance(command, ContinueAsNew):
                try:
                    write.restart = self.codec.dumps(
                        [list(command.args), dict(command.kwargs)],
                        f"the arguments given to continue_as_new by {self._label}",
                    )
                    write.status = RUNNING
                except WorkflowEncodeError as exc:
                    write.status, write.error = FAILURE, encode_error(exc)
        write.new_steps = new_steps
        write.cancelled = cancelled
        write.progress = progress or None

    def _run_local(self, command: RunLocal) -> NewStep:
        """Run a local step now and return it as a step that already has its outcome."""
        what = f"local step {command.seq} ({command.name}) of {self._label}"
        try:
            value = command.fn(*command.args, **command.kwargs)
            if inspect.isawaitable(value):
                value = asyncio.run(_awaited(value))
            content_type, result = self.codec.dumps(value, f"the result of {what}")
            return NewStep(
                command.seq,
                command.kind,
                command.name,
                content_type,
                _EMPTY[1],
                str(uuid.uuid4()),
                state=DONE,
                result=result,
            )
        except Exception as exc:
            return NewStep(
                command.seq,
                command.kind,
                command.name,
                *_EMPTY,
                str(uuid.uuid4()),
                state=DONE,
                error=encode_error(exc),
            )

    def _publish(self, run: RunRecord, plan: _Publish, committed: TurnCommitted) -> None:
        """Send what the committed turn implies. A message lost here is re-sent by a sweeper."""
        wakes = list(plan.children)
        if committed.parent is not None:
            wakes.append(committed.parent)
        to_cancel = [c for c in committed.cancelled if c.kind == "child" and c.child_id]
        to_revoke = [c.dispatch_id for c in committed.cancelled if c.kind == "activity"]
        if not (plan.activities or wakes or to_cancel or to_revoke):
            return
        count = len(plan.activities) + len(wakes)
        with self.app.producer_or_acquire() as producer, batched(producer, count):
            if plan.activities:
                headers = step_headers(self.run_id, 0, self.workflow, run.options)
                for command, dispatch_id in plan.activities:
                    publish_step(
                        self.app,
                        command.name,
                        command.args,
                        command.kwargs,
                        command.options,
                        dispatch_id,
                        {**headers, "durable_seq": command.seq},
                        producer=producer,
                    )
            for run_id, workflow, options in wakes:
                publish_wake(self.app, workflow, run_id, options, producer=producer)
        for step in to_cancel:
            assert step.child_id is not None
            wake = self.store.request_cancel(step.child_id, quiet=True)
            if wake is not None:
                publish_wake(self.app, wake[1], wake[0], wake[2])
        if to_revoke:
            # Best effort: a step that runs anyway has its outcome dropped.
            try:
                self.app.control.revoke(to_revoke)
            except Exception:
                logger.warning("%s: could not revoke cancelled steps", self._label, exc_info=True)

    # -- building the instance -----------------------------------------------------------

    def _new_instance(self, run: RunRecord, at: float) -> WorkflowInstance:
        args, kwargs = self.codec.loads(run.content_type, run.input)
        info = WorkflowInfo(
            workflow_id=run.id,
            name=self.workflow,
            start_time=_utc(run.started_at or at),
            attempt=run.attempt,
            parent_id=run.parent_id,
        )
        return WorkflowInstance(
            self.fn, args, kwargs, info, encode=self._encode_step, seq_base=run.seq_base
        )

    def _rebuild(self, run: RunRecord, at: float) -> WorkflowInstance:
        instance = self._new_instance(run, at)
        if run.turn == 0:
            return instance
        records = self.store.history(self.run_id)
        turn_times = {1: _utc(run.started_at or run.created_at)}
        if run.cancel_turn is not None and run.cancel_at is not None:
            turn_times[run.cancel_turn] = _utc(run.cancel_at)
        history = []
        for record in records:
            outcome = None
            if record.observed_turn is not None:
                outcome = self._outcome(record)
                if record.observed_at is not None:
                    turn_times.setdefault(record.observed_turn, _utc(record.observed_at))
            history.append(
                HistoryStep(
                    seq=record.seq,
                    kind=record.kind,
                    name=record.name,
                    created_turn=record.created_turn,
                    observed_turn=record.observed_turn,
                    outcome=outcome,
                )
            )
        replay(instance, history, run.turn, turn_times, cancel_turn=run.cancel_turn)
        return instance

    def _encode_step(self, command: ScheduleActivity | StartChild) -> tuple[str, bytes]:
        return self.codec.dumps(
            [list(command.args), dict(command.kwargs), dict(command.options)],
            f"the arguments of step {command.seq} ({command.name}) of {self._label}",
        )

    def _outcome(self, step: StepRecord) -> StepOutcome:
        if step.outcome == "error":
            return StepOutcome(step.seq, error=decode_error(step.error or {}))
        value = None if step.result is None else self.codec.loads(step.content_type, step.result)
        return StepOutcome(step.seq, value=value)


#: content_type and input of steps that have no input of their own.
_EMPTY = ("application/json", b"null")


class _Publish:
    """Messages a turn sends once its commit has landed."""

    def __init__(self) -> None:
        self.activities: list[tuple[ScheduleActivity, str]] = []
        self.children: list[tuple[str, str, Mapping[str, Any]]] = []
        self.local_steps = 0


async def _awaited(value: Awaitable[Any]) -> Any:
    return await value
