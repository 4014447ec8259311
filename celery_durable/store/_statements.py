"""The statements of the hot path, built once per store.

Building an SQLAlchemy statement and its cache key costs about as much client time as
executing it; these run several times per step, so they take their values as bound
parameters (``b_*``) instead of being built per call. Each statement that two operations
share is defined here once. Times the store compares come from the database's clock in
the statement itself (``now``, see ``_clock``); ``b_at`` is only ever a turn's own time.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Float,
    Insert,
    Integer,
    Select,
    String,
    Update,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    or_,
    select,
    true,
    update,
)

from . import _schema as s
from ._records import ACTIVE, CLAIMED, DELIVERED, DONE, SCHEDULED

__all__ = ["HotStatements", "incarnation_is", "wake_flag_update", "woke"]


def incarnation_is(incarnation: ColumnElement[int] | int) -> ColumnElement[bool]:
    """The run is in ``incarnation`` (NULL, in rows older than schema version 4, is 0)."""
    return func.coalesce(s.runs.c.incarnation, 0) == incarnation


def wake_flag_update(no_disk_wait: ColumnElement[bool], now: ColumnElement[float]) -> Update:
    """Count one more event that wants a turn of the run; returns its routing, its
    driver and both counts.

    Every such event is counted, under the run's row lock. The writer whose event is
    the first the last committed turn did not see (``events - 1 == taken`` in the row
    returned: :func:`woke`) wakes the run; the others leave it to that turn's
    successor, whose commit tells it whether events came after its read.
    """
    runs = s.runs.c
    events, taken = func.coalesce(runs.events, 0), func.coalesce(runs.taken, 0)
    return (
        update(s.runs)
        .where(
            and_(
                runs.id == bindparam("b_run", type_=String()),
                runs.status.in_(ACTIVE),
                no_disk_wait,
            )
        )
        .values(
            events=events + 1,
            wake_pending=True,
            # When the run began waiting for a turn: the sweeper's backoff counts from it.
            wake_sent_at=case((events == taken, now), else_=runs.wake_sent_at),
        )
        .returning(runs.workflow, runs.options, runs.driver_id, runs.events, runs.taken)
    )


def _recording(record: Update, count: Update) -> Select[Any]:
    """``record`` (an outcome's update) and the event it makes, in one PostgreSQL
    statement: one round trip, one commit. Returns one row: ``recorded`` (0 or 1) and
    the event's row (all NULL when none was counted: the run is not active)."""
    runs = s.runs.c
    # The lock order: the run's row first, then its step's (the EXISTS below is
    # evaluated before the step's row is updated).
    lock = (
        select(runs.id)
        .where(runs.id == bindparam("b_run", type_=String()))
        .with_for_update(key_share=True)
        .cte("run_lock")
    )
    rec = record.where(exists(select(lock.c.id))).returning(s.steps.c.run_id).cte("recorded")
    retrying = bindparam("b_retrying", type_=Boolean())
    flag = count.where(or_(exists(select(rec.c.run_id)), retrying)).cte("counted")
    return select(
        select(func.count()).select_from(rec).scalar_subquery().label("recorded"),
        *(select(c).scalar_subquery().label(c.name) for c in flag.c),
    )


def woke(row: Any) -> bool:
    """Whether the writer of an event (a row of :func:`wake_flag_update`) wakes the run."""
    return bool((row.events or 0) - 1 == (row.taken or 0))


class HotStatements:
    """The statements run for every step or turn.

    Args:
        no_disk_wait: a condition that is always true and, on PostgreSQL, lets its
            statement commit without waiting for the disk (see ``Store._no_disk_wait``).
        now: the database's clock (see ``_clock.db_now``).
    """

    def __init__(self, no_disk_wait: ColumnElement[bool], now: ColumnElement[float]) -> None:
        steps, runs = s.steps.c, s.runs.c
        run_id = bindparam("b_run", type_=String())
        seq = bindparam("b_seq", type_=Integer())
        at = bindparam("b_at", type_=Float())
        retries = bindparam("b_retries", type_=Integer())
        # Losing a claim in a database crash costs at worst one duplicate run of the
        # step, so it need not wait for the disk. It runs in the worker's consumer loop
        # for every step message: one statement, one round trip.
        self.claim = (
            update(s.steps)
            .where(
                and_(
                    steps.run_id == run_id,
                    steps.seq == seq,
                    steps.dispatch_id == bindparam("b_dispatch"),
                    or_(
                        steps.state == SCHEDULED,
                        and_(steps.state == CLAIMED, steps.claimed_retries < retries),
                    ),
                    no_disk_wait,
                )
            )
            .values(
                state=CLAIMED,
                claimed_by=bindparam("b_worker"),
                claimed_at=now,
                renewed_at=now,
                claimed_retries=retries,
                attempts=steps.attempts + 1,
                # Only messages out and unclaimed keep a stall_from (see the schema).
                stall_from=None,
            )
        )
        open_step = and_(
            steps.run_id == run_id, steps.seq == seq, steps.state.in_((SCHEDULED, CLAIMED))
        )
        self.record_ok = (
            update(s.steps)
            .where(open_step)
            .values(
                state=DONE,
                completed_at=now,
                outcome="ok",
                content_type=bindparam("b_type"),
                result=bindparam("b_result"),
                stall_from=None,
            )
        )
        self.record_error = (
            update(s.steps)
            .where(open_step)
            .values(
                state=DONE,
                completed_at=now,
                outcome="error",
                error=bindparam("b_error"),
                stall_from=None,
            )
        )
        # An event is counted in the transaction of what it reports (an outcome, a
        # signal, a timer), which waits for the disk.
        self.flag_wake = wake_flag_update(true(), now)
        # PostgreSQL: each outcome and its event in one statement.
        self.record_ok_counted = _recording(self.record_ok, self.flag_wake)
        self.record_error_counted = _recording(self.record_error, self.flag_wake)
        # What a turn reads first, in one statement (one snapshot): the run's row and its
        # outcomes not yet delivered (through their partial index), step columns
        # prefixed with ``step_``.
        self.turn_start = (
            select(s.runs, *(c.label(f"step_{c.name}") for c in s.steps.c))
            .select_from(
                s.runs.outerjoin(s.steps, and_(steps.run_id == runs.id, steps.state == DONE))
            )
            .where(runs.id == run_id)
            .order_by(steps.seq)
        )
        seen = bindparam("b_seen", type_=Integer())
        # A turn with nothing to deliver still takes the events it saw (an outcome an
        # earlier turn already delivered, a retried write counted twice), or the next
        # event would not see itself as the first and wake.
        self.take_events = (
            update(s.runs)
            .where(and_(runs.id == run_id, func.coalesce(runs.taken, 0) < seen, no_disk_wait))
            .values(taken=seen, wake_pending=func.coalesce(runs.events, 0) > seen)
            .returning(runs.events)
        )
        self.status = select(runs.status).where(runs.id == run_id)
        # For a client waiting on the run: its status and its age by the database's clock.
        self.status_and_age = select(runs.status, (now - runs.created_at).label("age")).where(
            runs.id == run_id
        )
        # The fenced update of every turn; a turn that changes more than turn and status
        # adds its values with ``.values(...)``. The turn number alone repeats (a
        # continue-as-new starts again at 0, a retry goes back one), so the fence is
        # (incarnation, turn), which every restart moves on.
        self.advance = (
            update(s.runs)
            .where(
                and_(
                    runs.id == run_id,
                    runs.turn == bindparam("b_turn", type_=Integer()),
                    incarnation_is(bindparam("b_incarnation", type_=Integer())),
                    runs.status.in_(ACTIVE),
                )
            )
            .values(
                turn=bindparam("b_next", type_=Integer()),
                status=bindparam("b_status", type_=String()),
                updated_at=now,
                driver_id=bindparam("b_driver", type_=String()),
                # Evaluated on the row as locked, so events written after the turn's
                # read are seen here (see wake_flag_update).
                taken=seen,
                wake_pending=func.coalesce(runs.events, 0) > seen,
            )
            .returning(
                runs.workflow,
                runs.parent_id,
                runs.parent_seq,
                runs.progress,
                runs.seq_base,
                runs.events,
            )
        )
        # The new steps of a turn (rows from ``step_row``). Their times count from the
        # database's clock at the commit: a timer's deadline is ``b_due_in`` seconds
        # after it, whatever the clock of the host that ran the turn says. An offset of
        # None (no deadline, not yet completed) leaves the column NULL.
        self.insert_steps: Insert = insert(s.steps).values(
            dispatched_at=now,
            due_at=now + bindparam("b_due_in", type_=Float()),
            completed_at=now + bindparam("b_done_in", type_=Float()),
            stall_from=now + bindparam("b_stall_in", type_=Float()),
        )
        # The observed time of a delivery is the turn's own (replay reads it back).
        self.deliver = (
            update(s.steps)
            .where(
                and_(
                    steps.run_id == run_id,
                    steps.seq.in_(bindparam("b_seqs", expanding=True)),
                    steps.state == DONE,
                )
            )
            .values(
                state=DELIVERED, observed_turn=bindparam("b_next", type_=Integer()), observed_at=at
            )
        )
