"""The activity side: a worker claims a step's message, then records its outcome."""

from __future__ import annotations

import uuid

from sqlalchemy import update

from . import _clock
from . import _schema as s
from ._base import StoreBase, load_dispatches, step_is
from ._records import CLAIMED, SCHEDULED, Dispatch, ErrorInfo

__all__ = ["StepClaims"]


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
            "b_at": _clock.now(),
        }
        with self._each_statement_commits() as conn:
            return bool(conn.execute(self._hot.claim, params).rowcount == 1)

    def record_outcome(
        self,
        run_id: str,
        seq: int,
        result: tuple[str, bytes] | None = None,
        error: ErrorInfo | None = None,
    ) -> tuple[bool, bool]:
        """Record a step's outcome once; returns ``(recorded, wake_needed)``.

        ``wake_needed`` is True for exactly one of the outcomes that arrive while no wake
        is in flight, so the caller publishes one driver message for a burst of them.
        """
        at = _clock.now()
        key = {"b_run": run_id, "b_seq": seq, "b_at": at}
        if error is not None:
            record, values = self._hot.record_error, {**key, "b_error": error}
        else:
            assert result is not None
            record = self._hot.record_ok
            values = {**key, "b_type": result[0], "b_result": result[1]}
        with self._each_statement_commits() as conn:
            recorded = conn.execute(record, values).rowcount
            if recorded != 1:
                return False, False
            # The outcome is committed before the flag is looked at. Were both in one
            # transaction (PostgreSQL, READ COMMITTED), a driver could clear the flag and
            # read the outcomes between this look and this commit: it would miss the
            # outcome while this recorder counted on it, and the run would wait for the
            # sweeper. Now a flag seen set belongs to a turn whose read comes later and
            # sees the outcome; a flag seen clear is set here and a wake is sent.
            wake = conn.execute(self._hot.flag_wake_fast, key).first()
            return True, wake is not None

    def release_step(self, run_id: str, seq: int) -> Dispatch | None:
        """Give a claimed step a new dispatch id (its worker died); the caller republishes."""
        new_id = str(uuid.uuid4())
        with self._transaction() as conn:
            moved = conn.execute(
                update(s.steps)
                .where(step_is(run_id, seq, CLAIMED))
                .values(
                    state=SCHEDULED,
                    dispatch_id=new_id,
                    dispatched_at=_clock.now(),
                    claimed_by=None,
                    claimed_retries=None,
                    redispatches=s.steps.c.redispatches + 1,
                )
            ).rowcount
            if moved != 1:
                return None
            found = load_dispatches(conn, step_is(run_id, seq))
            return found[0] if found else None
