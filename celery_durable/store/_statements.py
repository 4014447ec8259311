"""The statements of the hot path, built once per store.

Building an SQLAlchemy statement and its cache key costs about as much client time as
executing it; these run several times per step, so they take their values as bound
parameters (``b_*``) instead of being built per call. Each statement that two operations
share is defined here once. Times the store compares come from the database's clock in
the statement itself (``now``, see ``_clock``); ``b_at`` is only ever a turn's own time.
"""

from __future__ import annotations

from sqlalchemy import (
    ColumnElement,
    Float,
    Insert,
    Integer,
    String,
    Update,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    true,
    update,
)

from . import _schema as s
from ._records import ACTIVE, CLAIMED, DELIVERED, DONE, SCHEDULED

__all__ = ["HotStatements", "incarnation_is", "wake_flag_update"]


def incarnation_is(incarnation: ColumnElement[int] | int) -> ColumnElement[bool]:
    """The run is in ``incarnation`` (NULL, in rows older than schema version 4, is 0)."""
    return func.coalesce(s.runs.c.incarnation, 0) == incarnation


def wake_flag_update(no_disk_wait: ColumnElement[bool], now: ColumnElement[float]) -> Update:
    """Set a run's wake flag unless it is set already; returns the run's routing.

    A row comes back only when this statement set the flag: that caller, and no other,
    sends the wake message.
    """
    runs = s.runs.c
    return (
        update(s.runs)
        .where(
            and_(
                runs.id == bindparam("b_run", type_=String()),
                runs.wake_pending.is_(False),
                runs.status.in_(ACTIVE),
                no_disk_wait,
            )
        )
        .values(wake_pending=True, wake_sent_at=now)
        .returning(runs.workflow, runs.options, runs.driver_id)
    )


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
        # Lost in a database crash, a set flag only delays the sweeper's wake. Inside a
        # transaction that must be durable (a signal, a timer) the flag waits for the disk.
        self.flag_wake_fast = wake_flag_update(no_disk_wait, now)
        self.flag_wake = wake_flag_update(true(), now)
        # A clear lost in a database crash leaves the flag set with no wake in flight;
        # the sweeper wakes such a run.
        self.take_wake = (
            update(s.runs)
            .where(and_(runs.id == run_id, no_disk_wait))
            .values(wake_pending=False)
            .returning(*s.runs.c)
        )
        self.outcomes = (
            select(s.steps)
            .where(and_(steps.run_id == run_id, steps.state == DONE))
            .order_by(steps.seq)
        )
        self.status = select(runs.status).where(runs.id == run_id)
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
            )
            .returning(runs.workflow, runs.parent_id, runs.parent_seq, runs.progress, runs.seq_base)
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
