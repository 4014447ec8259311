"""Driving a run: each turn loads the run, brings its coroutine up to date, advances
it, commits, and publishes.

A wake message runs the workflow's Celery task, which drives the run through the turns
that are ready (usually one). A turn holds no lock while workflow code runs: the commit
is fenced on the run's incarnation and turn, so when two workers race on one run exactly
one commit lands and the other turn does nothing. Suspended coroutines are kept in a
per-process cache (``_cache``) so that the usual turn skips replaying history.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from datetime import datetime, timezone
from typing import Any

from celery import Celery

from .._codec import Codec, decode_error, encode_error
from .._config import settings_for, store_for
from ..errors import HistoryWriteError, NonDeterminismError, StoreUnavailableError
from ..runtime import (
    ACTIVITY,
    HistoryStep,
    ScheduleActivity,
    StartChild,
    StepOutcome,
    WorkflowInfo,
    WorkflowInstance,
    replay,
)
from ..store import (
    ACTIVE,
    DONE,
    FAILURE,
    STUCK,
    ErrorInfo,
    RunRecord,
    StepRecord,
    Store,
    TurnCommitted,
    TurnStart,
    TurnWrite,
)
from ..worker import OutcomeHint, batched, publish_step, publish_wake, step_headers
from ._cache import cache
from ._plan import Messages, TurnPlan

__all__ = ["MAX_TURNS_IN_ONE_TASK", "RunDriver"]

logger = logging.getLogger(__name__)


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone.utc)


#: Turns a driver may run back to back in one task, when local steps or buffered
#: signals make the next turn ready at once.
MAX_TURNS_IN_ONE_TASK = 100


class RunDriver:
    """Drives one run through the turns that are ready: one per wake message, then
    :meth:`drive`."""

    def __init__(
        self,
        app: Celery,
        workflow: str,
        fn: Callable[..., Coroutine[Any, Any, Any]],
        run_id: str,
        holder: str | None = None,
        hint: OutcomeHint | None = None,
    ) -> None:
        self.app = app
        #: The outcome whose recording woke the run, from its recorder (``_local``).
        self._hint = hint
        self.holder = holder
        self.workflow = workflow
        self.fn = fn
        self.run_id = run_id
        self.settings = settings_for(app)
        self.codec: Codec = self.settings.codec
        self.store: Store = store_for(app)
        #: Whether the last turn only took in outcomes (it sent nothing, nor finished):
        #: a fan-in with steps still coming in.
        self.absorbed = False
        #: What the next turn would read, when this driver's own commit decided it.
        self._known: TurnStart | None = None

    @property
    def _label(self) -> str:
        return f"workflow {self.workflow}[{self.run_id}]"

    def drive(self) -> str | None:
        """Run the turns that are ready; returns the run's status (None if there is no run)."""
        status: str | None = None
        for _ in range(MAX_TURNS_IN_ONE_TASK):
            status, again = self._turn()
            if again and self.absorbed:
                # A fan-in (a gather, a chord) with more outcomes still arriving: one
                # turn per outcome would spend more than the steps. A wake queued
                # behind their messages lets them gather and be taken in one turn.
                self.wake_later(status)
                return status
            if not again:
                return status
        # Still more to do: let another task (maybe another worker) carry on.
        run = self.store.get_run(self.run_id)
        if run is not None:
            publish_wake(self.app, self.workflow, self.run_id, run.options)
        return status

    def wake_later(self, status: str | None) -> None:
        """Have the run driven again by a wake sent through the broker."""
        if status is None or status in ACTIVE:
            run = self.store.get_run(self.run_id)
            if run is not None:
                publish_wake(self.app, self.workflow, self.run_id, run.options)

    def _turn(self) -> tuple[str | None, bool]:
        start, self._known = (
            self._known or self._hinted() or self.store.begin_turn(self.run_id),
            None,
        )
        if start is None:
            logger.warning("%s: no such run in the store; wake ignored", self._label)
            return None, False
        run = start.run
        if run.status not in ACTIVE:
            return run.status, False
        cancel = run.cancel_requested and run.cancel_turn is None
        if run.turn > 0 and not start.new_outcomes and not cancel:
            # A duplicate or coalesced wake, or an event with nothing to deliver (a
            # signal no wait wants yet): nothing new. Its events are seen all the same.
            again = run.events > run.taken and self.store.take_events(self.run_id, run.events)
            return run.status, again

        instance = cache.take(self.run_id, run.turn, run.incarnation)
        # The turn's time; the first turn's becomes the run's start time, which replays
        # read back from the store, so the first execution must see the same value.
        at = time.time()
        try:
            if instance is None:
                instance = self._rebuild(run, at)
            outcomes = [self._outcome(step) for step in start.new_outcomes]
            commands = instance.activate(outcomes, _utc(at), cancel=cancel)
        except StoreUnavailableError:
            # Loading the history failed for want of the store, not because of it: the
            # turn is tried again (a wake, or the sweeper), never parked for that.
            if instance is not None:
                instance.close()
            raise
        except NonDeterminismError as exc:
            logger.error("%s is STUCK: %s", self._label, exc)
            self.store.park(self.run_id, run.turn, STUCK, encode_error(exc), run.incarnation)
            return STUCK, False
        except Exception as exc:
            # Not the workflow's own exception (those fail the run inside activate): its
            # history could not be loaded or replayed here. Park it rather than retry
            # forever; it resumes on retry() or when a worker with fixed code starts.
            logger.exception("%s is STUCK: its history could not be replayed", self._label)
            self.store.park(self.run_id, run.turn, STUCK, encode_error(exc), run.incarnation)
            return STUCK, False

        write = TurnWrite(
            turn=run.turn,
            incarnation=run.incarnation,
            at=at,
            delivered=[step.seq for step in start.new_outcomes],
            cancel_delivered=cancel,
            driver=self.holder if not instance.finished else None,
            seen=run.events,
            child=run.parent_id is not None,
        )
        plan = TurnPlan(self.run_id, self._label, self.codec, write).add(commands)

        try:
            committed = self.store.commit_turn(self.run_id, write)
        except HistoryWriteError as exc:
            # The database refuses this turn's writes and would refuse them again on
            # every retry: park the run with the reason instead of waking it forever.
            logger.error("%s is STUCK: %s", self._label, exc)
            instance.close()
            self.store.park(self.run_id, run.turn, STUCK, encode_error(exc), run.incarnation)
            return STUCK, False
        if committed is None:
            # Another turn moved the run on first. It may not have seen what this one
            # saw, so make sure someone looks again.
            logger.info("%s: turn %d lost a race; waking the run again", self._label, run.turn)
            instance.close()
            publish_wake(self.app, self.workflow, self.run_id, run.options)
            return None, False

        self.absorbed = not commands and not instance.finished
        after = None
        if not (committed.signals_matched or committed.pending or write.restart):
            # Nothing else has happened since the read (an event would have made the
            # commit pending): the run is as this commit left it.
            after = self._after(run, write, at)
        if not instance.finished:
            kept = after.run if after is not None and not after.new_outcomes else None
            cache.put(self.run_id, instance, self.settings.cache_size, run.incarnation, kept)
        else:
            instance.close()  # tasks it left pending must not run at garbage collection
        self._publish(run, plan.messages, committed)
        if write.status == FAILURE and write.error is not None:
            logger.info("%s failed: %s", self._label, write.error.get("message"))
        more = (
            plan.messages.local_steps
            or committed.signals_matched
            or committed.pending
            or write.restart is not None
        )
        if more and after is not None:
            # Only this turn's local steps are new: the next turn starts from what this
            # one committed, without reading it back.
            self._known = after
        return write.status, bool(more)

    def _hinted(self) -> TurnStart | None:
        """The turn's start from the outcome that woke the run, if that was the only
        event since this process's last commit of the run (which then is all a read
        would return): no read."""
        hint, self._hint = self._hint, None
        if hint is None:
            return None
        run = cache.committed(self.run_id)
        if run is None or run.events != run.taken or hint.events != run.events + 1:
            return None
        content_type, result = hint.result or ("", None)
        step = _done_step(
            self.run_id,
            hint.seq,
            ACTIVITY,
            hint.name,
            run.turn,
            content_type,
            result,
            hint.error,
            None,
        )
        return TurnStart(replace(run, events=hint.events), [step])

    def _after(self, run: RunRecord, write: TurnWrite, at: float) -> TurnStart:
        """The run and its undelivered outcomes as ``write`` (just committed) left them."""
        cancelled = write.cancel_delivered
        after = replace(
            run,
            turn=run.turn + 1,
            status=write.status,
            taken=write.seen,
            started_at=run.started_at if run.turn > 0 else at,
            cancel_turn=run.turn + 1 if cancelled else run.cancel_turn,
            cancel_at=at if cancelled else run.cancel_at,
        )
        done = [
            _done_step(
                self.run_id,
                n.seq,
                n.kind,
                n.name,
                run.turn + 1,
                n.content_type,
                n.result,
                n.error,
                at,
                dispatch_id=n.dispatch_id,
                input=n.input,
            )
            for n in write.new_steps
            if n.state == DONE
        ]
        return TurnStart(after, done)

    # -- after the commit ------------------------------------------------------------------

    def _publish(self, run: RunRecord, plan: Messages, committed: TurnCommitted) -> None:
        """Send what the committed turn implies. A message lost here is re-sent by a sweeper."""
        # Children of cancelled child steps were asked to cancel in the commit itself;
        # only their wakes are left to send.
        wakes = [*plan.children, *committed.cancelled_children]
        if committed.parent is not None:
            wakes.append(committed.parent)
        to_revoke = [c.dispatch_id for c in committed.cancelled if c.kind == "activity"]
        if not (plan.activities or wakes or to_revoke):
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
        if to_revoke:
            # Best effort: a step that runs anyway has its outcome dropped.
            try:
                self.app.control.revoke(to_revoke)
            except Exception:
                logger.warning("%s: could not revoke cancelled steps", self._label, exc_info=True)

    # -- building the instance -----------------------------------------------------------

    def _new_instance(self, run: RunRecord, at: float) -> WorkflowInstance:
        args, kwargs = self.codec.loads(run.content_type, run.input, f"the input of {self._label}")
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
        # Rare once a run has a holder (see ``_local``): worth seeing when it is not.
        logger.info(
            "%s: replaying %d steps (not suspended in this process)", self._label, len(records)
        )
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
        if step.result is None:
            return StepOutcome(step.seq, value=None)
        what = f"the outcome of step {step.seq} ({step.name}) of {self._label}"
        return StepOutcome(step.seq, value=self.codec.loads(step.content_type, step.result, what))


def _done_step(
    run_id: str,
    seq: int,
    kind: str,
    name: str,
    turn: int,
    content_type: str,
    result: bytes | None,
    error: ErrorInfo | None,
    at: float | None,
    dispatch_id: str = "",
    input: bytes = b"",
) -> StepRecord:
    """A step done (created by ``turn``, completed ``at``) and not yet delivered, as a
    turn's read would return it: the part of a row that delivering it uses."""
    return StepRecord(
        run_id=run_id,
        seq=seq,
        kind=kind,
        name=name,
        created_turn=turn,
        state=DONE,
        dispatch_id=dispatch_id,
        attempts=0,
        content_type=content_type,
        input=input,
        outcome="error" if error else "ok",
        result=result,
        error=error,
        dispatched_at=at or 0.0,
        completed_at=at,
        observed_turn=None,
        observed_at=None,
        claimed_by=None,
    )
