"""What the sweepers read and take: heartbeats, claims of dead workers, messages that
look lost, runs whose wake looks lost, stuck runs, and due timers.

Many sweepers may run at once: each item is taken by one of them in a fenced update.
"""

from __future__ import annotations

from collections.abc import Collection

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    false,
    func,
    insert,
    or_,
    select,
    true,
    update,
)

from . import _schema as s
from ._base import RunWake, load_dispatches, step_is
from ._records import (
    ACTIVE,
    CLAIMED,
    DONE,
    SCHEDULED,
    STUCK,
    Dispatch,
    LossPolicy,
    RunRecord,
    WorkerInfo,
    run_record,
)
from ._steps import StepClaims

__all__ = ["Recovery"]


class Recovery(StepClaims):
    """Liveness of workers and the recovery queries of the sweeper."""

    def heartbeat(self, worker: WorkerInfo) -> None:
        """Record that ``worker`` is alive now (registering it the first time).

        A worker is known by its id, which no other process ever has; its node name is
        not unique (Celery only warns about two live workers of one name), so a worker
        starting under a name never decides by the name alone that an older one is gone:
        see :meth:`live_workers_named` and :meth:`retire_workers`.
        """
        with self._transaction() as conn:
            seen = conn.execute(
                update(s.workers)
                .where(s.workers.c.id == worker.id)
                .values(last_seen=self._now, stopped_at=None, clean_stop=None)
            ).rowcount
            if not seen:
                conn.execute(
                    insert(s.workers).values(
                        id=worker.id,
                        hostname=worker.node,
                        pid=worker.pid,
                        machine=worker.machine,
                        process_start=worker.process_start,
                        started_at=self._now,
                        last_seen=self._now,
                    )
                )

    def live_workers_named(self, worker: WorkerInfo) -> list[WorkerInfo]:
        """The other workers of ``worker``'s node name and machine not known to have
        stopped: its predecessors, if it was restarted, or twins running alongside it."""
        if worker.machine is None:
            return []
        with self._read() as conn:
            rows = conn.execute(
                select(s.workers).where(
                    s.workers.c.hostname == worker.node,
                    s.workers.c.machine == worker.machine,
                    s.workers.c.id != worker.id,
                    s.workers.c.stopped_at.is_(None),
                )
            ).all()
        return [WorkerInfo(r.id, r.hostname, r.pid, r.machine, r.process_start) for r in rows]

    def retire_workers(self, worker_ids: Collection[str]) -> int:
        """Record that these workers are gone (they died without a clean stop), so that
        their claims are released at the next sweep; returns how many were live."""
        if not worker_ids:
            return 0
        with self._transaction() as conn:
            return int(
                conn.execute(
                    update(s.workers)
                    .where(
                        s.workers.c.id.in_(sorted(worker_ids)),
                        s.workers.c.stopped_at.is_(None),
                    )
                    .values(stopped_at=self._now)
                ).rowcount
            )

    def worker_stopped(self, worker: str) -> None:
        """Record a clean shutdown of ``worker`` (its pool has drained)."""
        with self._transaction() as conn:
            conn.execute(
                update(s.workers)
                .where(s.workers.c.id == worker)
                .values(stopped_at=self._now, clean_stop=True)
            )

    def release_expired_claims(
        self,
        dead_after: float,
        policy: LossPolicy,
        limit: int = 1000,
        leases: bool = True,
    ) -> list[RunWake]:
        """Give new dispatches to steps whose claim expired; returns runs to wake (for
        steps that failed because they were lost once too often).

        A claim expires when its worker stopped, or when nobody renewed it for
        ``dead_after`` seconds: its worker died, or lost the message (a broker restart
        took what it had prefetched), or lost the outcome. The steps are sent again by
        the due poller once their backoff has passed (:meth:`take_due_steps`).

        ``leases=False`` releases only the claims of stopped workers: a caller that has
        just lost touch with the store knows that nobody could renew a lease meanwhile.
        """
        cutoff = self._now - dead_after
        stopped = select(s.workers.c.id).where(s.workers.c.stopped_at.is_not(None))
        clean = select(s.workers.c.id).where(s.workers.c.clean_stop.is_(True))
        expired = (
            func.coalesce(s.steps.c.renewed_at, s.steps.c.claimed_at) < cutoff
            if leases
            else false()
        )
        holder_stopped = s.steps.c.claimed_by.in_(stopped)
        with self._read() as conn:
            rows = conn.execute(
                select(
                    s.steps.c.run_id,
                    s.steps.c.seq,
                    s.steps.c.claimed_by.in_(clean).label("clean"),
                )
                .where(s.steps.c.state == CLAIMED, or_(holder_stopped, expired))
                .order_by(s.steps.c.claimed_at)
                .limit(limit)
            ).all()
        wakes = []
        for run_id, seq, clean in rows:
            # A worker that stopped cleanly finished every step it ran: what it still
            # holds are messages it never started, which are no loss of the step.
            wake = self.release_step(run_id, seq, policy, lost=not clean)
            if wake is not None:
                wakes.append(wake)
        return wakes

    def take_due_steps(
        self, limit: int = 1000, workflows: Collection[str] | None = None
    ) -> list[Dispatch]:
        """Task steps whose backoff after a lost worker has passed, taken for sending."""
        due = _due("activity", self._now, workflows)
        # Read first: on most polls nothing is due, and a write transaction would queue
        # behind SQLite's writer lock for nothing.
        with self._read() as conn:
            rows = conn.execute(
                select(s.steps.c.run_id, s.steps.c.seq)
                .where(due)
                .order_by(s.steps.c.due_at)
                .limit(limit)
            ).all()
        if not rows:
            return []
        with self._transaction() as conn:
            taken = []
            for run_id, seq in rows:
                moved = conn.execute(
                    update(s.steps)
                    .where(step_is(run_id, seq, SCHEDULED), s.steps.c.due_at <= self._now)
                    .values(due_at=None, dispatched_at=self._now)
                ).rowcount
                if moved:
                    taken.append((run_id, seq))
            return _dispatches_of(conn, taken)

    def stale_dispatches(self, older_than: float, limit: int = 1000) -> list[Dispatch]:
        """Steps published but never claimed for a while, taken for re-publishing.

        Each step is taken by one sweeper only, and waits twice as long before its next
        re-publish, so a long queue is not flooded with copies. The copies share the
        dispatch id, so whichever is received first runs and the others are dropped.
        """
        now = self._now
        with self._transaction() as conn:
            rows = conn.execute(
                select(s.steps.c.run_id, s.steps.c.seq, s.steps.c.redispatches)
                .where(
                    and_(
                        s.steps.c.state == SCHEDULED,
                        s.steps.c.dispatched_at < now - older_than,
                        # Timers, signal waits and children wait on purpose; only task
                        # messages can be lost. A step backing off after a lost worker
                        # has not been sent yet.
                        s.steps.c.kind == "activity",
                        s.steps.c.due_at.is_(None),
                    )
                )
                .order_by(s.steps.c.dispatched_at)
                .limit(limit)
            ).all()
            taken = []
            for run_id, seq, redispatches in rows:
                wait = older_than * (2 ** min(int(redispatches), 6))
                moved = conn.execute(
                    update(s.steps)
                    .where(step_is(run_id, seq, SCHEDULED), s.steps.c.dispatched_at < now - wait)
                    .values(dispatched_at=now, redispatches=s.steps.c.redispatches + 1)
                ).rowcount
                if moved:
                    taken.append((run_id, seq))
            return _dispatches_of(conn, taken)

    def runs_to_wake(
        self,
        older_than: float,
        limit: int = 1000,
        workflows: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> list[RunRecord]:
        """Active runs with work to do whose wake looks lost; each taken by one sweeper.

        ``workflows`` limits it to runs of those workflows (the ones the caller can route
        a wake for); ``exclude`` leaves those out.
        """
        now = self._now
        cutoff = now - older_than
        has_outcome = (
            select(s.steps.c.run_id)
            .where(and_(s.steps.c.state == DONE, s.steps.c.completed_at < cutoff))
            .scalar_subquery()
        )
        candidates = (
            select(s.runs)
            .where(
                and_(
                    s.runs.c.status.in_(ACTIVE),
                    or_(s.runs.c.wake_sent_at.is_(None), s.runs.c.wake_sent_at < cutoff),
                    or_(
                        and_(
                            s.runs.c.turn == 0,
                            s.runs.c.updated_at < cutoff,
                            # A run never driven is most often just queued behind a
                            # burst of starts. Waiting as long again as it has waited
                            # (up to 64 periods) before each new wake keeps a backlog
                            # from being flooded with copies of its own wakes.
                            or_(
                                s.runs.c.wake_sent_at - s.runs.c.created_at
                                <= now - s.runs.c.wake_sent_at,
                                s.runs.c.wake_sent_at < now - 64 * older_than,
                            ),
                        ),
                        s.runs.c.id.in_(has_outcome),
                        and_(
                            s.runs.c.cancel_requested.is_(True),
                            s.runs.c.cancel_turn.is_(None),
                            s.runs.c.updated_at < cutoff,
                        ),
                    ),
                    true() if workflows is None else s.runs.c.workflow.in_(list(workflows)),
                    true() if not exclude else s.runs.c.workflow.not_in(list(exclude)),
                )
            )
            .limit(limit)
        )
        if self.dialect == "postgresql":
            # The runs are taken in the order found, which is no lock order: skipping a
            # row another transaction holds (a turn, a termination locking a parent and
            # its children) means this sweeper never waits while holding other runs, so
            # it can never be part of a deadlock. A skipped run is found next sweep.
            candidates = candidates.with_for_update(skip_locked=True, key_share=True)
        with self._transaction() as conn:
            rows = conn.execute(candidates).all()
            taken = []
            for row in rows:
                moved = conn.execute(
                    update(s.runs)
                    .where(
                        and_(
                            s.runs.c.id == row.id,
                            or_(s.runs.c.wake_sent_at.is_(None), s.runs.c.wake_sent_at < cutoff),
                        )
                    )
                    .values(wake_sent_at=now, wake_pending=True)
                ).rowcount
                if moved:
                    taken.append(run_record(row))
            return taken

    def stuck_runs(self, limit: int = 1000) -> list[RunRecord]:
        """Runs parked as STUCK (retried when new code starts)."""
        with self._read() as conn:
            rows = conn.execute(select(s.runs).where(s.runs.c.status == STUCK).limit(limit))
            return [run_record(r) for r in rows]

    def fire_due_timers(
        self, limit: int = 1000, workflows: Collection[str] | None = None
    ) -> list[RunWake]:
        """Complete timers whose deadline has passed; returns the runs to wake.

        ``workflows``: only timers of runs of these workflows (those the caller can
        route wakes for); None: every timer.
        """
        with self._transaction() as conn:
            due_now = _due("timer", self._now, workflows)
            due = select(s.steps.c.run_id, s.steps.c.seq).where(due_now).limit(limit)
            if self.dialect == "postgresql":
                due = due.with_for_update(skip_locked=True)
            rows = conn.execute(due).all()
            if not rows:
                return []
            fired: set[str] = set()
            for run_id, seq in rows:
                moved = conn.execute(
                    update(s.steps)
                    .where(step_is(run_id, seq, SCHEDULED))
                    .values(state=DONE, outcome="ok", completed_at=self._now)
                ).rowcount
                if moved:
                    fired.add(run_id)
            wakes = []
            for run_id in sorted(fired):
                wake = self._flag_wake(conn, run_id)
                if wake is not None:
                    wakes.append(wake)
            return wakes


def _due(
    kind: str, now: ColumnElement[float], workflows: Collection[str] | None
) -> ColumnElement[bool]:
    """Scheduled steps of ``kind`` due by ``now``, of runs of ``workflows`` (None: all)."""
    due = and_(s.steps.c.state == SCHEDULED, s.steps.c.due_at <= now, s.steps.c.kind == kind)
    if workflows is None:
        return due
    ours = select(s.runs.c.id).where(s.runs.c.workflow.in_(list(workflows)))
    return and_(due, s.steps.c.run_id.in_(ours))


def _dispatches_of(conn: Connection, taken: list[tuple[str, int]]) -> list[Dispatch]:
    """The dispatches of the scheduled steps ``taken`` (run id, seq) by this transaction."""
    if not taken:
        return []
    wanted = set(taken)
    return [
        d
        for d in load_dispatches(conn, s.steps.c.state == SCHEDULED, taken)
        if (d.run_id, d.seq) in wanted
    ]
