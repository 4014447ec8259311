"""The activity side: a worker claims a step's message, renews its claim while it holds
the message, records the outcome, or gives the step back when the worker lost it.

A claim is a lease. The worker holding a step's message renews it on every heartbeat
(:meth:`StepClaims.renew_leases`); a claim nobody renews expires and the sweeper gives
the step a new dispatch (see ``_recovery``). A step lost with its worker is sent again
after a backoff, a bounded number of times (:class:`~._records.LossPolicy`).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection

from sqlalchemy import ColumnElement, Connection, and_, func, select, tuple_, update

from ..errors import StepLostError
from . import _schema as s
from ._base import RunWake, StoreBase, step_is
from ._records import CLAIMED, DONE, SCHEDULED, ErrorInfo, LossPolicy, Recorded
from ._statements import woke

__all__ = ["StepClaims", "lost_error"]


def lost_error(run_id: str, seq: int, name: str, losses: int, attempts: int) -> ErrorInfo:
    """The :class:`StepLostError` a step gets when its worker was lost too often."""
    message = (
        f"step {seq} ({name}) of workflow run {run_id} was lost with its worker {losses} "
        f"times ({attempts} attempts): the task may be killing the process running it "
        "(os._exit, a segfault, the OOM killer). Fix the task and retry the run, or raise "
        "durable_max_redeliveries."
    )
    return {
        "type": StepLostError.__qualname__,
        "module": StepLostError.__module__,
        "message": message,
        "args": [message],
        "traceback": "",
    }


class StepClaims(StoreBase):
    """Claims and outcomes of steps, each a statement or two on the hot path."""

    def claim_step(
        self, run_id: str, seq: int, dispatch_id: str, worker: str, retries: int
    ) -> bool:
        """Let the message ``dispatch_id`` run step ``seq``; False means drop the message.

        A step is claimed once per dispatch; a Celery retry of the same message (more
        ``retries``) may claim it again, a duplicate delivery may not.
        """
        params = {
            "b_run": run_id,
            "b_seq": seq,
            "b_dispatch": dispatch_id,
            "b_retries": retries,
            "b_worker": worker,
        }
        with self._each_statement_commits() as conn:
            return bool(conn.execute(self._hot.claim, params).rowcount == 1)

    def renew_leases(self, worker: str, dispatch_ids: Collection[str]) -> int:
        """Renew ``worker``'s claims on the steps of these dispatches; returns how many."""
        if not dispatch_ids:
            return 0
        renewed = 0
        ids = sorted(dispatch_ids)
        with self._each_statement_commits() as conn:
            for start in range(0, len(ids), 500):
                held: tuple[ColumnElement[bool], ...] = (
                    s.steps.c.state == CLAIMED,
                    s.steps.c.claimed_by == worker,
                    s.steps.c.dispatch_id.in_(ids[start : start + 500]),
                )
                if self.dialect == "postgresql":
                    # One statement renewing many steps must not wait for a step's row
                    # while it holds others: a turn cancelling two of them holds their
                    # run and one step and may wait for the other. A step skipped (it is
                    # being changed) is renewed at the next heartbeat, well within its
                    # lease.
                    free = (
                        select(s.steps.c.run_id, s.steps.c.seq)
                        .where(*held)
                        .with_for_update(skip_locked=True)
                    )
                    held = (tuple_(s.steps.c.run_id, s.steps.c.seq).in_(free),)
                renew = update(s.steps).where(*held).values(renewed_at=self._now)
                renewed += conn.execute(renew).rowcount
        return renewed

    def record_outcome(
        self,
        run_id: str,
        seq: int,
        result: tuple[str, bytes] | None = None,
        error: ErrorInfo | None = None,
        retrying: bool = False,
    ) -> Recorded:
        """Record a step's outcome once.

        ``woken`` is True for exactly one of the outcomes that arrive while no wake is in
        flight, so the caller wakes the run once for a burst of them; ``driver`` then
        names the process that holds the run's suspended coroutine, if one does.
        ``retrying``: an earlier try of this call may have recorded the outcome and lost
        the answer: count the event again (a spare turn costs less than a lost wake).
        """
        key = {"b_run": run_id, "b_seq": seq}
        hot = self._hot
        if error is not None:
            record, counted = hot.record_error, hot.record_error_counted
            values = {**key, "b_error": error}
        else:
            assert result is not None
            record, counted = hot.record_ok, hot.record_ok_counted
            values = {**key, "b_type": result[0], "b_result": result[1]}
        if self.dialect == "postgresql":
            # One statement, one round trip: lock the run, store the outcome, count it.
            row = self._each_statement(counted, {**values, "b_retrying": retrying})
            assert row is not None
            if row.events is None:
                return Recorded(bool(row.recorded), False)
            return Recorded(bool(row.recorded), woke(row), row.driver_id, row.events)
        # The outcome and its event commit together: a turn's read sees both or neither,
        # and its commit sees every event counted before it (see wake_flag_update).
        with self._transaction() as conn:
            self._lock_run(conn, run_id)
            recorded = conn.execute(record, values).rowcount == 1
            if not recorded and not retrying:
                return Recorded(False, False)
            wake = conn.execute(self._hot.flag_wake, key).first()
            if wake is None:
                return Recorded(recorded, False)
            return Recorded(recorded, woke(wake), wake.driver_id, wake.events)

    def release_step(
        self,
        run_id: str,
        seq: int,
        policy: LossPolicy,
        holder: str | None = None,
        dispatch_id: str | None = None,
        lost: bool = True,
    ) -> RunWake | None:
        """Give a claimed step a new dispatch, sent by the sweeper's due poller
        (``take_due_steps``) after the policy's backoff.

        ``holder`` and ``dispatch_id``: only if this worker holds the claim, for this
        dispatch. ``lost=False``: the holder gave the step back unstarted (it stopped
        cleanly): no loss counted, sent at once. Returns the run to wake when the loss
        was one too many and failed the step with ``StepLostError`` instead.
        """
        with self._transaction() as conn:
            self._lock_run(conn, run_id)
            claimed = step_is(run_id, seq, CLAIMED)
            if holder is not None:
                claimed = and_(claimed, s.steps.c.claimed_by == holder)
            if dispatch_id is not None:
                claimed = and_(claimed, s.steps.c.dispatch_id == dispatch_id)
            row = conn.execute(
                select(s.steps.c.name, s.steps.c.losses, s.steps.c.attempts).where(claimed)
            ).first()
            if row is None:
                return None
            losses = (row.losses or 0) + (1 if lost else 0)
            if losses > policy.max_losses:
                return self._fail_lost(conn, run_id, seq, row.name, losses, row.attempts)
            conn.execute(
                update(s.steps)
                .where(claimed)
                .values(
                    state=SCHEDULED,
                    dispatch_id=str(uuid.uuid4()),
                    dispatched_at=self._now,
                    due_at=self._now + (policy.delay(losses) if lost else 0.0),
                    # Not sent until its backoff has passed (take_due_steps): not stale.
                    stall_from=None,
                    claimed_by=None,
                    claimed_retries=None,
                    renewed_at=None,
                    losses=losses,
                    redispatches=func.coalesce(s.steps.c.redispatches, 0) + 1,
                )
            )
            return None

    def _fail_lost(
        self,
        conn: Connection,
        run_id: str,
        seq: int,
        name: str,
        losses: int,
        attempts: int,
    ) -> RunWake | None:
        """Fail a step lost once too often (the run's row is locked); returns its wake."""
        conn.execute(
            update(s.steps)
            .where(step_is(run_id, seq, CLAIMED))
            .values(
                state=DONE,
                outcome="error",
                error=lost_error(run_id, seq, name, losses, attempts),
                completed_at=self._now,
                losses=losses,
                claimed_by=None,
                renewed_at=None,
            )
        )
        return self._flag_wake(conn, run_id, locked=True)
