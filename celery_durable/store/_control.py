"""What people and parent runs do to a run from outside: signal, cancel, terminate,
park and resume it."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from sqlalchemy import ColumnElement, Connection, and_, case, func, insert, select, update

from ..errors import DurableError, SignalError, WorkflowNotFoundError
from . import _schema as s
from ._base import RunWake, load_dispatches, step_is
from ._records import (
    ACTIVE,
    DONE,
    FAILURE,
    FINISHED,
    NOT_FINISHED,
    OPEN_STEP_STATES,
    PENDING,
    RUNNING,
    SCHEDULED,
    STUCK,
    TERMINATED,
    CancelledStep,
    Dispatch,
    ErrorInfo,
    RunRecord,
    Termination,
    TurnWrite,
    run_record,
)
from ._statements import incarnation_is
from ._turns import CHILD, TurnWrites

__all__ = ["RunControl"]


class RunControl(TurnWrites):
    """Signals, cancellation, termination, parking and resuming of runs."""

    def send_signal(
        self, run_id: str, name: str, content_type: str, payload: bytes
    ) -> RunWake | None:
        """Buffer a signal for a run and match it to a waiting step.

        Returns the run to wake (id, workflow, options) when a wait took it.

        Raises:
            SignalError: the run does not exist or has finished.
        """
        with self._transaction() as conn:
            # Taking the run's row first orders this against a turn inserting a wait.
            row = conn.execute(
                update(s.runs)
                .where(s.runs.c.id == run_id)
                .values(updated_at=s.runs.c.updated_at)
                .returning(s.runs.c.status, s.runs.c.workflow)
            ).first()
            if row is None:
                raise SignalError(
                    f"cannot signal {name!r} to workflow run {run_id!r}: no such run; check "
                    "the workflow id"
                )
            if row.status not in (*ACTIVE, STUCK):
                raise SignalError(
                    f"cannot signal {name!r} to workflow {row.workflow}[{run_id}]: it has "
                    f"finished ({row.status}); nothing would ever read the signal"
                )
            # No committed state has a signal buffered while a wait of its name is open
            # (a turn adding or cancelling a wait matches before it commits, under this
            # same row lock), so the new signal goes to the oldest open wait of its name,
            # or to the buffer: no need to read the buffer.
            wait = conn.execute(
                select(s.steps.c.seq)
                .where(
                    and_(
                        s.steps.c.run_id == run_id,
                        s.steps.c.kind == "signal",
                        s.steps.c.state == SCHEDULED,
                        s.steps.c.name == name,
                    )
                )
                .order_by(s.steps.c.seq)
                .limit(1)
            ).scalar_one_or_none()
            conn.execute(
                insert(s.signals).values(
                    run_id=run_id,
                    name=name,
                    content_type=content_type,
                    payload=payload,
                    created_at=self._now,
                    consumed_seq=wait,
                )
            )
            if wait is None:
                return None
            self._give_signal(conn, run_id, wait, content_type, payload)
            return self._flag_wake(conn, run_id, locked=True)

    def request_cancel(self, run_id: str) -> RunWake | None:
        """Ask a run to cancel; returns it to wake (None if a wake is already pending or
        it was asked before).

        Raises:
            WorkflowNotFoundError: no such run.
            DurableError: the run has already finished.
        """
        with self._transaction() as conn:
            asked, wake = self._ask_to_cancel(conn, run_id)
            if asked:
                return wake
            row = conn.execute(
                select(s.runs.c.status, s.runs.c.workflow).where(s.runs.c.id == run_id)
            ).first()
            if row is None:
                raise WorkflowNotFoundError(f"no workflow run with id {run_id!r} to cancel")
            if row.status in FINISHED:
                raise DurableError(
                    f"workflow {row.workflow}[{run_id}] has already finished ({row.status}); "
                    "there is nothing to cancel"
                )
            return None  # asked before: that request's wake (or the sweeper) delivers it

    def terminate(
        self,
        run_id: str,
        error: ErrorInfo,
        descendant_error: Callable[[RunRecord], ErrorInfo] | None = None,
    ) -> Termination:
        """End a run and every open descendant now, without running their code.

        In one transaction: the run and its descendants (children, their children, and
        so on) become TERMINATED, their open steps CANCELLED, and the terminated run's
        step in its parent (if it is a child) completes with ``error``. The caller is
        left to revoke tasks and wake the parent, both best effort: nothing is left for
        a crash to lose. ``descendant_error`` describes a descendant's termination
        (default: ``error``).

        Rows are locked parent run, the run, its steps, then each generation of
        descendants in id order (parent before child, see :meth:`_lock_parent_of`).

        Raises:
            WorkflowNotFoundError: no such run.
            DurableError: the run has already finished.
        """
        with self._transaction() as conn:
            self._lock_parent_of(conn, run_id)
            row = conn.execute(
                update(s.runs)
                .where(and_(s.runs.c.id == run_id, s.runs.c.status.in_(NOT_FINISHED)))
                .values(status=TERMINATED, error=error, finished_at=self._now, updated_at=self._now)
                .returning(s.runs.c.turn, s.runs.c.parent_id, s.runs.c.parent_seq)
            ).first()
            if row is None:
                self._refuse_to_terminate(conn, run_id)
            cancelled = self._cancel_open_steps(conn, run_id)
            ended = [run_id]
            generation = [run_id]
            while generation:
                generation = self._terminate_children(
                    conn, generation, descendant_error or (lambda _run: error), cancelled
                )
                ended.extend(generation)
            parent = None
            if row.parent_id is not None:
                # No driver turn: no workflow time to record (the write only carries the end).
                write = TurnWrite(turn=row.turn, at=0.0, status=TERMINATED, error=error)
                parent = self._complete_parent_step(conn, row.parent_id, row.parent_seq, write)
            return Termination(runs=ended, cancelled=cancelled, parent=parent)

    @staticmethod
    def _refuse_to_terminate(conn: Connection, run_id: str) -> NoReturn:
        row = conn.execute(
            select(s.runs.c.status, s.runs.c.workflow).where(s.runs.c.id == run_id)
        ).first()
        if row is None:
            raise WorkflowNotFoundError(f"no workflow run with id {run_id!r} to terminate")
        raise DurableError(
            f"workflow {row.workflow}[{run_id}] has already finished ({row.status}); "
            "there is nothing to terminate"
        )

    def _cancel_open_steps(self, conn: Connection, run_id: str) -> list[CancelledStep]:
        open_seqs = (
            conn.execute(
                select(s.steps.c.seq).where(
                    and_(s.steps.c.run_id == run_id, s.steps.c.state.in_(OPEN_STEP_STATES))
                )
            )
            .scalars()
            .all()
        )
        return self._cancel_steps(conn, run_id, list(open_seqs))

    def _terminate_children(
        self,
        conn: Connection,
        parents: Sequence[str],
        error_for: Callable[[RunRecord], ErrorInfo],
        cancelled: list[CancelledStep],
    ) -> list[str]:
        """Terminate the open child runs of ``parents`` (already terminated in this
        transaction) and cancel their open steps (added to ``cancelled``); returns them.

        Children are found through their parents' child steps in any state: a child whose
        step was cancelled earlier may still be running its cleanup.
        """
        started = select(s.steps.c.child_id).where(
            and_(s.steps.c.run_id.in_(list(parents)), s.steps.c.kind == CHILD)
        )
        rows = conn.execute(
            select(s.runs).where(and_(s.runs.c.id.in_(started), s.runs.c.status.in_(NOT_FINISHED)))
        ).all()
        ended = []
        # One conditional update per child, in id order: siblings are locked in the same
        # order by every transaction that takes more than one of them.
        for child in sorted(rows, key=lambda r: str(r.id)):
            moved = conn.execute(
                update(s.runs)
                .where(and_(s.runs.c.id == child.id, s.runs.c.status.in_(NOT_FINISHED)))
                .values(
                    status=TERMINATED,
                    error=error_for(run_record(child)),
                    finished_at=self._now,
                    updated_at=self._now,
                )
            ).rowcount
            if moved:
                cancelled.extend(self._cancel_open_steps(conn, child.id))
                ended.append(str(child.id))
        return ended

    def park(
        self, run_id: str, turn: int, status: str, error: ErrorInfo, incarnation: int = 0
    ) -> bool:
        """Stop a run at ``turn`` of ``incarnation`` (without recording a new turn),
        keeping its history; False if the run has moved on meanwhile."""
        with self._transaction() as conn:
            return (
                conn.execute(
                    update(s.runs)
                    .where(
                        and_(
                            s.runs.c.id == run_id,
                            s.runs.c.turn == turn,
                            incarnation_is(incarnation),
                            s.runs.c.status.in_(ACTIVE),
                        )
                    )
                    .values(status=status, error=error, updated_at=self._now)
                ).rowcount
                == 1
            )

    def park_unreadable(self, run_id: str, error: ErrorInfo) -> bool:
        """Park a run as STUCK, whatever its turn, because a row of its history cannot be
        read (a payload in a content type the app refuses); False if it is not active.

        A sweeper calls this when it cannot decode a step it was to send again: that run
        stops with the reason, and the sweep goes on with the others.
        """
        with self._transaction() as conn:
            moved = conn.execute(
                update(s.runs)
                .where(and_(s.runs.c.id == run_id, s.runs.c.status.in_(ACTIVE)))
                .values(status=STUCK, error=error, updated_at=self._now)
            ).rowcount
            return bool(moved)

    def resume(self, run_id: str) -> str:
        """Put a STUCK or FAILED run back to RUNNING; returns the status it had.

        A failed run goes back to the turn before the one that failed: the outcomes that
        turn delivered are delivered again, and steps that failed are scheduled again.
        Either way the run starts a new incarnation, so a driver still busy with a turn
        from before (which may have read the same turn number) can never commit into it.
        Returns the previous status; the caller publishes a wake.

        Raises:
            WorkflowNotFoundError: no such run.
            DurableError: the run is not STUCK or FAILURE, or cannot be rewound.
        """
        at = self._now
        with self._transaction() as conn:
            # Locked while deciding: a termination or a late turn waits, then finds the
            # run in the state this decides (and the update below checks it is the same).
            row = conn.execute(
                select(s.runs).where(s.runs.c.id == run_id).with_for_update()
            ).first()
            if row is None:
                raise WorkflowNotFoundError(f"no workflow run with id {run_id!r} to retry")
            run = run_record(row)
            label = f"workflow {run.workflow}[{run_id}]"
            if run.status not in (STUCK, FAILURE):
                raise DurableError(
                    f"{label} is {run.status}; only STUCK or FAILURE runs can be retried"
                )
            turn = run.turn
            if run.status == FAILURE:
                self._rewind_failed_turn(conn, run, at)
                turn = run.turn - 1
            values: dict[str, Any] = {
                "status": RUNNING if turn else PENDING,
                "turn": turn,
                "incarnation": run.incarnation + 1,
                "attempt": func.coalesce(s.runs.c.attempt, 1) + 1,
                "error": None,
                "finished_at": None,
                "updated_at": at,
            }
            moved = conn.execute(
                update(s.runs)
                .where(
                    and_(
                        s.runs.c.id == run_id,
                        s.runs.c.status == run.status,
                        s.runs.c.turn == run.turn,
                        incarnation_is(run.incarnation),
                    )
                )
                .values(**values)
            ).rowcount
            if not moved:
                # Only where the lock above is no lock (SQLite serialises writers anyway).
                raise DurableError(f"{label} changed while it was being retried; retry again")
            return run.status

    def _rewind_failed_turn(
        self, conn: Connection, run: RunRecord, at: ColumnElement[float]
    ) -> None:
        """Reopen what the failed run's last turn delivered; its failed steps run again."""
        run_id = run.id
        created_last = conn.execute(
            select(func.count())
            .select_from(s.steps)
            .where(and_(s.steps.c.run_id == run_id, s.steps.c.created_turn == run.turn))
        ).scalar_one()
        if created_last:
            raise DurableError(
                f"workflow {run.workflow}[{run_id}] scheduled steps in the turn that "
                "failed, so it cannot be rewound; start a new run instead"
            )
        last = run.turn
        failed = conn.execute(
            select(s.steps.c.seq).where(
                and_(
                    s.steps.c.run_id == run_id,
                    s.steps.c.observed_turn == last,
                    s.steps.c.outcome == "error",
                )
            )
        ).scalars()
        for seq in list(failed):
            conn.execute(
                update(s.steps)
                .where(step_is(run_id, seq))
                .values(
                    state=SCHEDULED,
                    outcome=None,
                    error=None,
                    result=None,
                    observed_turn=None,
                    observed_at=None,
                    completed_at=None,
                    claimed_by=None,
                    claimed_retries=None,
                    renewed_at=None,
                    due_at=None,
                    losses=0,
                    dispatch_id=str(uuid.uuid4()),
                    dispatched_at=at,
                    # Sent again by the caller after this commit.
                    stall_from=case((s.steps.c.kind == "activity", at), else_=None),
                )
            )
        conn.execute(
            update(s.steps)
            .where(and_(s.steps.c.run_id == run_id, s.steps.c.observed_turn == last))
            .values(state=DONE, observed_turn=None, observed_at=None)
        )

    def dispatches_to_resend(self, run_id: str) -> list[Dispatch]:
        """Steps of a run scheduled but not yet claimed, for publishing after a retry."""
        with self._read() as conn:
            return load_dispatches(
                conn,
                and_(
                    s.steps.c.run_id == run_id,
                    s.steps.c.state == SCHEDULED,
                    s.steps.c.kind == "activity",
                ),
            )
