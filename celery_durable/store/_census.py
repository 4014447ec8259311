"""Counting what the store holds, for monitoring (Flower's ``/metrics``).

A census is a handful of grouped reads in one short transaction: runs by workflow and
status, open steps by kind and state, outcomes waiting for their turn, timers overdue.
Nothing names a run, so what it returns grows with the number of workflows, not of
runs. The steps are read through the ranges of the indexes the sweeper uses (open steps
by ``state``; outcomes by ``(state, completed_at)``; timers by ``(state, kind,
due_at)``), so they cost what is in flight; the run count reads the runs table once.
On PostgreSQL the reads are cancelled after ``time_limit`` seconds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from sqlalchemy import Connection, and_, case, func, select

from . import _schema as s
from ._base import StoreBase
from ._records import CLAIMED, DONE, SCHEDULED

__all__ = ["Census", "RunCensus", "RunCount"]


@dataclass(frozen=True)
class RunCount:
    """How many runs of one workflow have one status."""

    workflow: str
    status: str
    count: int
    #: When the latest of them finished (UNIX seconds, the database's clock); None for
    #: statuses that are not finished.
    last_finished_at: float | None = None


@dataclass(frozen=True)
class Census:
    """What the store holds, in numbers; see :meth:`RunCensus.census`."""

    #: Runs by workflow and status, the largest groups first (at most the limit).
    runs: list[RunCount] = field(default_factory=list)
    #: Steps not finished, by ``(kind, state)``: task steps SCHEDULED (sent, not yet
    #: taken) or CLAIMED (held by a worker), timers, signal waits and child runs.
    open_steps: dict[tuple[str, str], int] = field(default_factory=dict)
    #: Open task steps sent again because their worker was lost (``losses``).
    redelivered_lost_worker: int = 0
    #: Open task steps sent again because their message was never taken.
    redelivered_lost_message: int = 0
    #: Outcomes recorded and not yet delivered to a turn of their run.
    outcomes_waiting: int = 0
    #: Seconds the oldest of them has waited (0 when none waits).
    oldest_outcome_age: float = 0.0
    #: Seconds the most overdue open timer is past its deadline (0 when none is).
    most_overdue_timer: float = 0.0


class RunCensus(StoreBase):
    """The counts monitoring reads."""

    def census(self, limit: int = 1000, time_limit: float = 2.0) -> Census:
        """Count runs and open steps (see :class:`Census`).

        Args:
            limit: the most (workflow, status) groups returned.
            time_limit: seconds after which PostgreSQL cancels the reads.

        Raises:
            StoreUnavailableError: the database cannot be reached.
            sqlalchemy.exc.OperationalError: PostgreSQL cancelled a read that took longer.
        """
        r, st = s.runs.c, s.steps.c
        count = func.count()
        runs_query = (
            select(r.workflow, r.status, count, func.max(r.finished_at))
            .group_by(r.workflow, r.status)
            .order_by(count.desc(), r.workflow, r.status)
            .limit(limit)
        )
        task = st.kind == "activity"
        steps_query = (
            select(
                st.kind,
                st.state,
                count,
                func.sum(case((and_(task, st.losses > 0), 1), else_=0)),
                func.sum(case((and_(task, st.redispatches > 0), 1), else_=0)),
            )
            .where(st.state.in_((SCHEDULED, CLAIMED)))
            .group_by(st.kind, st.state)
        )
        outcomes_query = select(count, func.min(st.completed_at), self._now).where(st.state == DONE)
        timers_query = select(func.min(st.due_at), self._now).where(
            and_(st.state == SCHEDULED, st.kind == "timer")
        )
        with self._limited_read(time_limit) as conn:
            runs = [
                RunCount(w, status, int(n), finished)
                for w, status, n, finished in conn.execute(runs_query)
            ]
            open_steps: dict[tuple[str, str], int] = {}
            lost_worker = lost_message = 0
            for kind, state, n, by_worker, by_message in conn.execute(steps_query):
                open_steps[(kind, state)] = int(n)
                lost_worker += int(by_worker or 0)
                lost_message += int(by_message or 0)
            waiting, oldest, now = conn.execute(outcomes_query).one()
            due, now_t = conn.execute(timers_query).one()
        return Census(
            runs=runs,
            open_steps=open_steps,
            redelivered_lost_worker=lost_worker,
            redelivered_lost_message=lost_message,
            outcomes_waiting=int(waiting),
            oldest_outcome_age=max(0.0, now - oldest) if oldest is not None else 0.0,
            most_overdue_timer=max(0.0, now_t - due) if due is not None else 0.0,
        )

    @contextmanager
    def _limited_read(self, time_limit: float) -> Iterator[Connection]:
        if self.dialect != "postgresql":
            with self._read() as conn:
                yield conn
            return
        self.ensure_schema()
        with self._lost_connections(), self._connect() as conn, conn.begin():
            # Local to this transaction: the pooled connection keeps no limit afterwards.
            conn.execute(
                select(func.set_config("statement_timeout", str(int(time_limit * 1000)), True))
            )
            yield conn
