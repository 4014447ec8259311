"""What the store reads and writes: statuses, records, and their rows.

Frozen dataclasses (and one mutable :class:`TurnWrite`, filled in while a turn is
planned) are what cross the boundary between the store and its callers; no dict with
magic keys does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = [
    "ACTIVE",
    "CANCELLED",
    "CLAIMED",
    "DELIVERED",
    "DONE",
    "FAILURE",
    "FINISHED",
    "NOT_FINISHED",
    "OPEN_STEP_STATES",
    "PENDING",
    "RUNNING",
    "SCHEDULED",
    "STEP_CANCELLED",
    "STUCK",
    "SUCCESS",
    "TERMINATED",
    "CancelledStep",
    "Dispatch",
    "ErrorInfo",
    "LossPolicy",
    "NewRun",
    "NewStep",
    "RunRecord",
    "SignalRecord",
    "StepRecord",
    "Termination",
    "TurnCommitted",
    "TurnStart",
    "TurnWrite",
    "WorkerInfo",
    "run_record",
    "run_row",
    "step_record",
    "step_row",
]

#: An exception described as JSON data: type, module, message, args, traceback.
ErrorInfo = dict[str, Any]

# Run statuses (Celery's names where the meaning matches).
PENDING, RUNNING, SUCCESS, FAILURE, STUCK = "PENDING", "RUNNING", "SUCCESS", "FAILURE", "STUCK"
CANCELLED, TERMINATED = "CANCELLED", "TERMINATED"
ACTIVE = (PENDING, RUNNING)
FINISHED = (SUCCESS, FAILURE, CANCELLED, TERMINATED)
#: A run that can still be cancelled or terminated (a STUCK run resumes some day).
NOT_FINISHED = (*ACTIVE, STUCK)

# Step states. CANCELLED: nobody waits for the step any more.
SCHEDULED, CLAIMED, DONE, DELIVERED = "SCHEDULED", "CLAIMED", "DONE", "DELIVERED"
STEP_CANCELLED = "CANCELLED"
OPEN_STEP_STATES = (SCHEDULED, CLAIMED, DONE)


@dataclass(frozen=True)
class NewRun:
    """A run to create."""

    id: str
    workflow: str
    content_type: str
    input: bytes
    options: Mapping[str, Any] = field(default_factory=dict)
    parent_id: str | None = None
    parent_seq: int | None = None


@dataclass(frozen=True)
class RunRecord:
    """A run as stored."""

    id: str
    workflow: str
    status: str
    turn: int
    content_type: str
    input: bytes
    result: bytes | None
    error: ErrorInfo | None
    options: Mapping[str, Any]
    created_at: float
    started_at: float | None
    updated_at: float
    finished_at: float | None
    parent_id: str | None = None
    parent_seq: int | None = None
    attempt: int = 1
    #: Steps of the current incarnation are numbered from ``seq_base + 1``.
    seq_base: int = 0
    #: How many times the run started over: continued as new, or was resumed or retried
    #: (0 for the first incarnation). With ``turn``, the fence of every commit.
    incarnation: int = 0
    cancel_requested: bool = False
    cancel_turn: int | None = None
    cancel_at: float | None = None
    progress: Mapping[str, Any] | None = None
    #: Events written for the run so far, and how many the last committed turn saw.
    events: int = 0
    taken: int = 0


@dataclass(frozen=True)
class NewStep:
    """A step a driver turn schedules.

    Most steps start SCHEDULED; a local step starts DONE with its outcome, a patch marker
    DELIVERED. A timer is due ``due_in`` seconds after its turn commits, by the
    database's clock (the host running the turn may be minutes off).
    """

    seq: int
    kind: str
    name: str
    content_type: str
    input: bytes
    dispatch_id: str
    state: str = SCHEDULED
    result: bytes | None = None
    error: ErrorInfo | None = None
    due_in: float | None = None
    child_id: str | None = None


@dataclass
class TurnWrite:
    """Everything one driver turn records, committed together and fenced on the run's
    ``(incarnation, turn)``."""

    turn: int
    at: float
    #: The run's incarnation the turn started from (see ``RunRecord.incarnation``).
    incarnation: int = 0
    delivered: Sequence[int] = ()
    new_steps: Sequence[NewStep] = ()
    cancelled: Sequence[int] = ()
    progress: Mapping[str, Any] | None = None
    cancel_delivered: bool = False
    status: str = RUNNING
    result: tuple[str, bytes] | None = None
    error: ErrorInfo | None = None
    children: Sequence[NewRun] = ()
    #: Continue-as-new: the new input; the run's history is cleared.
    restart: tuple[str, bytes] | None = None
    #: The process that ran the turn and keeps the run's coroutine (``driver._local``);
    #: None when it keeps none that another process could reach.
    driver: str | None = None
    #: The run's event count the turn read (``RunRecord.events``): what it has seen.
    seen: int = 0
    #: Whether the run is a child run (``RunRecord.parent_id``, set once at its
    #: creation): a finishing child's commit locks its parent's row first.
    child: bool = True


class Recorded(NamedTuple):
    """What :meth:`~celery_durable.store.Store.record_outcome` did."""

    #: This call stored the outcome (False: it was there already, or the step is gone).
    recorded: bool
    #: This caller set the run's wake flag, so it, and no other, wakes the run.
    woken: bool
    #: The process that ran the run's last turn (``TurnWrite.driver``), when woken.
    driver: str | None = None
    #: The run's event count with this one, when woken (its only unseen event then).
    events: int | None = None


@dataclass(frozen=True)
class CancelledStep:
    """A step a turn cancelled, with what is needed to stop it."""

    seq: int
    kind: str
    dispatch_id: str
    child_id: str | None


@dataclass(frozen=True)
class TurnCommitted:
    """What a committed turn leaves the driver to do after the commit."""

    #: The commit gave buffered signals to waits it opened: another turn can run now.
    signals_matched: bool
    cancelled: list[CancelledStep]
    #: A finished child's parent, to wake: (run id, workflow, driver options).
    parent: tuple[str, str, Mapping[str, Any]] | None
    #: Events arrived after the turn read the run: nobody else will wake it for them,
    #: so the driver runs another turn.
    pending: bool = False
    #: Child runs of cancelled child steps that this commit asked to cancel and whose
    #: wake flag it set, to wake (a wake lost here is re-sent by the sweeper).
    cancelled_children: list[tuple[str, str, Mapping[str, Any]]] = field(default_factory=list)


@dataclass(frozen=True)
class Termination:
    """What :meth:`Store.terminate` ended in its one transaction, for the caller to
    follow up on (best effort: nothing here is needed for the runs to stay ended)."""

    #: The run and each descendant it terminated, parents before their children.
    runs: list[str]
    #: The open steps of all of them, now cancelled (tasks to revoke).
    cancelled: list[CancelledStep]
    #: The terminated run's parent, to wake: its child step now holds the termination.
    parent: tuple[str, str, Mapping[str, Any]] | None


@dataclass(frozen=True)
class StepRecord:
    """A step as stored."""

    run_id: str
    seq: int
    kind: str
    name: str
    created_turn: int
    state: str
    dispatch_id: str
    attempts: int
    content_type: str
    input: bytes
    outcome: str | None
    result: bytes | None
    error: ErrorInfo | None
    dispatched_at: float
    completed_at: float | None
    observed_turn: int | None
    observed_at: float | None
    claimed_by: str | None
    child_id: str | None = None
    #: When the step's next action is due: a timer's deadline, or when a step lost with
    #: its worker is sent again (UNIX seconds); None when nothing waits.
    due_at: float | None = None
    #: How many times the step was lost with its worker.
    losses: int = 0


@dataclass(frozen=True)
class SignalRecord:
    """A signal sent to a run that no wait has taken yet (buffered)."""

    id: int
    run_id: str
    name: str
    content_type: str
    payload: bytes
    #: When it was sent (UNIX seconds, the database's clock).
    created_at: float


@dataclass(frozen=True)
class LossPolicy:
    """What happens to a step whose worker was lost (died, or lost the message).

    It is sent again after ``backoff * 2 ** (losses - 1)`` seconds (at most a minute),
    up to ``max_losses`` times; the next loss fails the step with ``StepLostError``.
    """

    max_losses: int = 3
    backoff: float = 1.0

    def delay(self, losses: int) -> float:
        """Seconds to wait before sending a step again after its ``losses``-th loss."""
        return float(min(self.backoff * 2 ** max(losses - 1, 0), 60.0))


@dataclass(frozen=True)
class WorkerInfo:
    """A worker process as the store knows it.

    ``id`` names this one process and is never used again (node name, pid and a random
    part). ``node`` is Celery's node name, which several live workers may share.
    ``machine`` names the operating system instance and pid namespace the process runs
    in, and ``process_start`` when that process started, as the kernel counts it: with
    ``pid`` they let a worker on the same machine tell whether this one is still alive
    (None where the platform cannot say; such a worker is only ever given up on when its
    leases expire).
    """

    id: str
    node: str
    pid: int
    machine: str | None = None
    process_start: str | None = None


@dataclass(frozen=True)
class Dispatch:
    """What is needed to (re)publish one step's message."""

    run_id: str
    seq: int
    name: str
    dispatch_id: str
    content_type: str
    input: bytes
    workflow: str
    driver_options: Mapping[str, Any]


@dataclass(frozen=True)
class TurnStart:
    """What a driver turn reads first: the run and the outcomes not yet delivered."""

    run: RunRecord
    new_outcomes: list[StepRecord]


def step_row(run_id: str, turn: int, at: float, step: NewStep) -> dict[str, Any]:
    """The parameters of ``HotStatements.insert_steps`` for ``step``, scheduled by
    ``turn`` at the turn's time ``at`` (which only a delivered patch marker keeps)."""
    return {
        "run_id": run_id,
        "seq": step.seq,
        "kind": step.kind,
        "name": step.name,
        "created_turn": turn,
        "state": step.state,
        "dispatch_id": step.dispatch_id,
        "b_due_in": step.due_in,
        # A task step's message is sent right after this commit; it goes stale from then.
        "b_stall_in": 0.0 if step.kind == "activity" and step.state == SCHEDULED else None,
        "losses": 0,
        "redispatches": 0,
        "attempts": 0,
        "content_type": step.content_type,
        "input": step.input,
        "outcome": None if step.state == SCHEDULED else ("error" if step.error else "ok"),
        "result": step.result,
        "error": step.error,
        "b_done_in": None if step.state == SCHEDULED else 0.0,
        "observed_turn": turn if step.state == DELIVERED else None,
        "observed_at": at if step.state == DELIVERED else None,
        "child_id": step.child_id,
    }


def run_row(new: NewRun, now: Any) -> dict[str, Any]:
    """The values of a new run's row; ``now``: the database's clock (an SQL expression)."""
    return {
        "id": new.id,
        "workflow": new.workflow,
        "status": PENDING,
        "turn": 0,
        "wake_pending": True,
        "wake_sent_at": now,
        "content_type": new.content_type,
        "input": new.input,
        "options": dict(new.options),
        "created_at": now,
        "updated_at": now,
        "parent_id": new.parent_id,
        "parent_seq": new.parent_seq,
        "attempt": 1,
        "seq_base": 0,
        "incarnation": 0,
    }


def run_record(row: Any) -> RunRecord:
    return RunRecord(
        id=row.id,
        workflow=row.workflow,
        status=row.status,
        turn=row.turn,
        content_type=row.content_type,
        input=row.input,
        result=row.result,
        error=row.error,
        options=row.options or {},
        created_at=row.created_at,
        started_at=row.started_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        parent_id=row.parent_id,
        parent_seq=row.parent_seq,
        attempt=row.attempt or 1,
        seq_base=row.seq_base or 0,
        incarnation=row.incarnation or 0,
        cancel_requested=bool(row.cancel_requested),
        cancel_turn=row.cancel_turn,
        cancel_at=row.cancel_at,
        progress=row.progress,
        events=row.events or 0,
        taken=row.taken or 0,
    )


def step_record(row: Any) -> StepRecord:
    return StepRecord(
        run_id=row.run_id,
        seq=row.seq,
        kind=row.kind,
        name=row.name,
        created_turn=row.created_turn,
        state=row.state,
        dispatch_id=row.dispatch_id,
        attempts=row.attempts,
        content_type=row.content_type,
        input=row.input,
        outcome=row.outcome,
        result=row.result,
        error=row.error,
        dispatched_at=row.dispatched_at,
        completed_at=row.completed_at,
        observed_turn=row.observed_turn,
        observed_at=row.observed_at,
        claimed_by=row.claimed_by,
        child_id=row.child_id,
        due_at=row.due_at,
        losses=row.losses or 0,
    )
