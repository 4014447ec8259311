"""One driver turn: load the run, bring its coroutine up to date, advance it, commit, publish.

A turn is what the workflow's Celery task does each time a wake message arrives. It holds
no lock while workflow code runs: the commit is fenced on the run's turn number, so when
two workers race on one run exactly one commit lands and the other turn does nothing.
Suspended coroutines are kept in a per-process cache so that the usual turn (the same
process that ran the previous turn) skips replaying history altogether.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from typing import Any

from celery import Celery

from ._codec import Codec, decode_error, encode_error
from ._commands import (
    ActivityResolved,
    CompleteWorkflow,
    FailWorkflow,
    HistoryStep,
    ScheduleActivity,
    WorkflowInfo,
)
from ._config import settings_for, store_for
from ._instance import WorkflowInstance
from ._messages import publish_step, publish_wake, step_headers
from ._replay import replay
from ._store import ACTIVE, FAILURE, RUNNING, STUCK, SUCCESS, NewStep, RunRecord, StepRecord, Store
from .errors import NonDeterminismError, WorkflowEncodeError

__all__ = ["DriverTurn", "InstanceCache"]

logger = logging.getLogger(__name__)


class InstanceCache:
    """Suspended workflow instances of this process, least recently used evicted first."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, WorkflowInstance] = OrderedDict()
        self._lock = threading.Lock()

    def take(self, run_id: str, turn: int) -> WorkflowInstance | None:
        """Remove and return the instance of ``run_id`` if it is exactly at ``turn``."""
        with self._lock:
            instance = self._items.pop(run_id, None)
        if instance is not None and instance.turn == turn:
            return instance
        return None

    def put(self, run_id: str, instance: WorkflowInstance, capacity: int) -> None:
        """Keep ``instance`` for the next turn of ``run_id``."""
        if capacity <= 0:
            return
        with self._lock:
            self._items[run_id] = instance
            self._items.move_to_end(run_id)
            while len(self._items) > capacity:
                self._items.popitem(last=False)

    def clear(self) -> None:
        """Forget every instance."""
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


#: The cache of this process; a forked child starts with the parent's copy, which stays
#: correct because instances are only reused at the exact turn the store reports.
cache = InstanceCache()


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


class DriverTurn:
    """Runs one turn of one run. Create one per wake message and call :meth:`run`."""

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
        """Do the turn; returns the run's status afterwards (None if there is no run)."""
        start = self.store.begin_turn(self.run_id)
        if start is None:
            logger.warning("%s: no such run in the store; wake ignored", self._label)
            return None
        run = start.run
        if run.status not in ACTIVE:
            return run.status
        if run.turn > 0 and not start.new_outcomes:
            return run.status  # a duplicate or coalesced wake: nothing new to deliver

        instance = cache.take(self.run_id, run.turn)
        # The turn's time; the first turn's becomes the run's start time, which replays
        # read back from the store, so the first execution must see the same value.
        at = time.time()
        try:
            if instance is None:
                instance = self._rebuild(run, at)
            outcomes = [self._outcome(step) for step in start.new_outcomes]
            commands = instance.activate(outcomes, _utc(at))
        except NonDeterminismError as exc:
            logger.error("%s is STUCK: %s", self._label, exc)
            self.store.park(self.run_id, run.turn, STUCK, encode_error(exc))
            return STUCK
        except Exception as exc:
            # Not the workflow's own exception (those fail the run inside activate): its
            # history could not be loaded or replayed here. Park it rather than retry
            # forever; it resumes on retry() or when a worker with fixed code starts.
            logger.exception("%s is STUCK: its history could not be replayed", self._label)
            self.store.park(self.run_id, run.turn, STUCK, encode_error(exc))
            return STUCK

        new_steps: list[NewStep] = []
        to_send: list[tuple[ScheduleActivity, str]] = []
        status, result, error = RUNNING, None, None
        for command in commands:
            if isinstance(command, ScheduleActivity):
                content_type, payload = command.payload
                dispatch_id = str(uuid.uuid4())
                new_steps.append(
                    NewStep(
                        command.seq,
                        command.kind,
                        command.name,
                        content_type,
                        payload,
                        dispatch_id,
                    )
                )
                to_send.append((command, dispatch_id))
            elif isinstance(command, CompleteWorkflow):
                try:
                    result = self.codec.dumps(command.result, f"the result of {self._label}")
                    status = SUCCESS
                except WorkflowEncodeError as exc:
                    status, error = FAILURE, encode_error(exc)
            elif isinstance(command, FailWorkflow):
                status, error = FAILURE, encode_error(command.error)

        delivered = [step.seq for step in start.new_outcomes]
        if not self.store.commit_turn(
            self.run_id, run.turn, delivered, new_steps, at, status, result, error
        ):
            # Another turn moved the run on first. It may not have seen what this one
            # saw, so make sure someone looks again.
            logger.info("%s: turn %d lost a race; waking the run again", self._label, run.turn)
            publish_wake(self.app, self.workflow, self.run_id, run.options)
            return None

        if not instance.finished:
            cache.put(self.run_id, instance, self.settings.cache_size)
        if to_send:
            headers = step_headers(self.run_id, 0, self.workflow, run.options)
            with self.app.producer_or_acquire() as producer:
                for command, dispatch_id in to_send:
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
        if status == FAILURE and error is not None:
            logger.info("%s failed: %s", self._label, error.get("message"))
        return status

    # -- building the instance -----------------------------------------------------------

    def _new_instance(self, run: RunRecord, at: float) -> WorkflowInstance:
        args, kwargs = self.codec.loads(run.content_type, run.input)
        info = WorkflowInfo(
            workflow_id=run.id,
            name=self.workflow,
            start_time=_utc(run.started_at or at),
        )
        return WorkflowInstance(self.fn, args, kwargs, info, encode=self._encode_step)

    def _rebuild(self, run: RunRecord, at: float) -> WorkflowInstance:
        instance = self._new_instance(run, at)
        if run.turn == 0:
            return instance
        records = self.store.history(self.run_id)
        turn_times = {1: _utc(run.started_at or run.created_at)}
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
        replay(instance, history, run.turn, turn_times)
        return instance

    def _encode_step(self, command: ScheduleActivity) -> tuple[str, bytes]:
        return self.codec.dumps(
            [list(command.args), dict(command.kwargs), dict(command.options)],
            f"the arguments of step {command.seq} ({command.name}) of {self._label}",
        )

    def _outcome(self, step: StepRecord) -> ActivityResolved:
        if step.outcome == "error":
            return ActivityResolved(step.seq, error=decode_error(step.error or {}))
        value = None if step.result is None else self.codec.loads(step.content_type, step.result)
        return ActivityResolved(step.seq, value=value)
