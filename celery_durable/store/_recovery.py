"""What the sweepers read and take: heartbeats, claims of dead workers, messages that
look lost, runs whose wake looks lost, stuck runs, and due timers.

Many sweepers may run at once: each item is taken by one of them in a fenced update.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    false,
    func,
    insert,
    or_,
    select,
    true,
    update,
)

from ..errors import UnknownWorkflowError
from . import _schema as s
from ._base import RunWake, load_dispatches, step_is
from ._records import (
    ACTIVE,
    CLAIMED,
    DONE,
    PENDING,
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
        steps, workers = s.steps.c, s.workers.c
        holder = s.workers.alias("holder")
        # Looked up by the holder's key for each claim (the claims are the steps in
        # flight, a few per worker), never by reading every worker that ever stopped.
        stopped = (
            select(holder.c.id)
            .where(holder.c.id == steps.claimed_by, holder.c.stopped_at.is_not(None))
            .exists()
        )
        clean = (
            select(workers.id)
            .where(workers.id == steps.claimed_by, workers.clean_stop.is_(True))
            .exists()
        )
        expired = func.coalesce(steps.renewed_at, steps.claimed_at) < cutoff if leases else false()
        with self._read() as conn:
            rows = conn.execute(
                select(steps.run_id, steps.seq, clean.label("clean"))
                .where(steps.state == CLAIMED, or_(stopped, expired))
                .order_by(steps.claimed_at, steps.run_id, steps.seq)
                .limit(limit)
            ).all()
        wakes = []
        for run_id, seq, was_clean in rows:
            # A worker that stopped cleanly finished every step it ran: what it still
            # holds are messages it never started, which are no loss of the step.
            wake = self.release_step(run_id, seq, policy, lost=not was_clean)
            if wake is not None:
                wakes.append(wake)
        return wakes

    def take_due_steps(
        self, limit: int = 1000, workflows: Collection[str] | None = None
    ) -> list[Dispatch]:
        """Task steps whose backoff after a lost worker has passed, taken for sending."""
        at = self._now
        # Read first: on most polls nothing is due, and a write transaction would queue
        # behind SQLite's writer lock for nothing.
        with self._read() as conn:
            rows = conn.execute(_due_steps("activity", at, workflows, limit)).all()
        if not rows:
            return []
        values = {"due_at": None, "dispatched_at": at, "stall_from": at}
        taken = self._take_each(
            [(run_id, seq, values) for run_id, seq in rows],
            lambda run_id, seq: and_(step_is(run_id, seq, SCHEDULED), s.steps.c.due_at <= at),
        )
        return self._dispatches(taken)

    def stale_dispatches(self, older_than: float, limit: int = 1000) -> list[Dispatch]:
        """Steps published but never claimed for a while, taken for re-publishing.

        Each step is taken by one sweeper only, and waits twice as long before its next
        re-publish (up to 64 times ``older_than``), so a long queue is not flooded with
        copies. The copies share the dispatch id, so whichever is received first runs and
        the others are dropped.

        The backoff is stored (``stall_from`` moves later with each copy), so the steps
        due are one range of an index, found before the limit: steps nobody consumes (a
        mistyped queue) back off without holding back anybody else's lost message.
        """
        now = self._now
        cutoff = now - older_than
        steps = s.steps.c
        with self._read() as conn:
            rows = conn.execute(
                select(steps.run_id, steps.seq, steps.redispatches)
                # Only a task step SCHEDULED with its message out has a stall_from:
                # timers, signal waits and children wait on purpose, a step backing off
                # after a lost worker has not been sent yet, and claiming, recording or
                # cancelling a step clears it. So this is the partial index's range and
                # nothing else (a condition on state would let SQLite's planner pick an
                # index by state instead); the update below checks the state.
                .where(steps.stall_from < cutoff)
                .order_by(steps.stall_from, steps.run_id, steps.seq)
                .limit(limit)
            ).all()
        # Copy number n + 1 goes stale older_than * 2**n after it was sent (n at most 6).
        items = [
            (
                run_id,
                seq,
                {
                    "dispatched_at": now,
                    "stall_from": now + older_than * (2 ** min(int(sent) + 1, 6) - 1),
                    "redispatches": int(sent) + 1,
                },
            )
            for run_id, seq, sent in rows
        ]
        taken = self._take_each(
            items,
            lambda run_id, seq: and_(step_is(run_id, seq, SCHEDULED), steps.stall_from < cutoff),
        )
        return self._dispatches(taken)

    def _take_each(
        self,
        items: Sequence[tuple[str, int, dict[str, Any]]],
        still_due: Callable[[str, int], ColumnElement[bool]],
    ) -> list[tuple[str, int]]:
        """Write each step of ``items`` (run id, seq, values) that is ``still_due``, in a
        statement of its own; returns those taken.

        Each update commits by itself (PostgreSQL), so a sweeper never holds one step's
        row while it waits for another's: a turn or a termination holding a run and its
        steps may be waiting for the row this sweeper holds. (SQLite has one writer at a
        time: one transaction.)
        """
        taken = []
        with self._each_statement_commits() as conn:
            for run_id, seq, values in items:
                moved = conn.execute(
                    update(s.steps).where(still_due(run_id, seq)).values(**values)
                ).rowcount
                if moved:
                    taken.append((run_id, seq))
        return taken

    def _dispatches(self, taken: list[tuple[str, int]]) -> list[Dispatch]:
        """The dispatches of the steps ``taken`` (run id, seq) that are still scheduled."""
        if not taken:
            return []
        wanted = set(taken)
        with self._read() as conn:
            return [
                d
                for d in load_dispatches(conn, s.steps.c.state == SCHEDULED, taken)
                if (d.run_id, d.seq) in wanted
            ]

    def runs_to_wake(
        self,
        older_than: float,
        limit: int = 1000,
        workflows: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> list[RunRecord]:
        """Active runs with work to do whose wake looks lost; each taken by one sweeper.

        Three kinds, each found in a range of its own index (so a sweep costs what is
        due, not how many runs wait): runs never driven, runs with an outcome nobody
        delivered, and runs asked to cancel that have not seen it. ``workflows`` limits
        it to runs of those workflows (the ones the caller can route a wake for);
        ``exclude`` leaves those out.
        """
        now = self._now
        cutoff = now - older_than
        runs, steps = s.runs.c, s.steps.c
        ours = and_(
            true() if workflows is None else runs.workflow.in_(list(workflows)),
            true() if not exclude else runs.workflow.not_in(list(exclude)),
        )
        not_woken = or_(runs.wake_sent_at.is_(None), runs.wake_sent_at < cutoff)
        never_driven = (
            select(runs.id)
            .where(
                runs.status == PENDING,
                runs.updated_at < cutoff,
                runs.turn == 0,
                not_woken,
                # A run never driven is most often just queued behind a burst of starts.
                # Waiting as long again as it has waited (up to 64 periods) before each
                # new wake keeps a backlog from being flooded with copies of its wakes.
                or_(
                    runs.wake_sent_at - runs.created_at <= now - runs.wake_sent_at,
                    runs.wake_sent_at < now - 64 * older_than,
                ),
                ours,
            )
            .order_by(runs.updated_at)
            .limit(limit)
        )
        # Outcomes not delivered are steps DONE: few, whatever the history holds.
        has_outcome = (
            select(steps.run_id)
            .join(s.runs, runs.id == steps.run_id)
            .where(
                steps.state == DONE,
                steps.completed_at < cutoff,
                runs.status.in_(ACTIVE),
                not_woken,
                ours,
            )
            .order_by(steps.completed_at)
            .limit(limit)
        )
        cancel_pending = (
            select(runs.id)
            .where(
                runs.cancel_requested == true(),
                runs.status.in_(ACTIVE),
                runs.updated_at < cutoff,
                runs.cancel_turn.is_(None),
                not_woken,
                ours,
            )
            .order_by(runs.updated_at)
            .limit(limit)
        )
        # Read first: on most sweeps no run is due, and the write transaction would
        # queue behind SQLite's writer lock for nothing.
        found: list[str] = []
        with self._read() as conn:
            for query in (never_driven, has_outcome, cancel_pending):
                found.extend(conn.execute(query).scalars())
        ids = sorted(set(found))
        if not ids:
            return []
        candidates = select(s.runs).where(runs.id.in_(ids), runs.status.in_(ACTIVE), not_woken)
        if self.dialect == "postgresql":
            # A sweeper never waits for a run's row: skipping one another transaction
            # holds (a turn, a termination locking a parent and its children) means it
            # can never be part of a deadlock. A skipped run is found next sweep.
            candidates = candidates.with_for_update(skip_locked=True, key_share=True)
        with self._transaction() as conn:
            rows = conn.execute(candidates).all()
            if not rows:
                return []
            taken = {
                row.id
                for row in conn.execute(
                    update(s.runs)
                    .where(runs.id.in_([row.id for row in rows]), not_woken)
                    .values(wake_sent_at=now, wake_pending=True)
                    .returning(runs.id)
                )
            }
            return [run_record(row) for row in rows if row.id in taken]

    def stuck_runs(
        self, limit: int = 1000, unknown_to: Collection[str] | None = None
    ) -> list[RunRecord]:
        """Runs parked as STUCK (retried when new code starts), the longest stuck first.

        ``unknown_to``: only those parked because no worker knew their workflow, of the
        workflows named (the ones the caller knows).
        """
        runs = s.runs.c
        query = select(s.runs).where(runs.status == STUCK)
        if unknown_to is not None:
            query = query.where(
                runs.workflow.in_(list(unknown_to)),
                runs.error["type"].as_string() == UnknownWorkflowError.__name__,
            )
        with self._read() as conn:
            rows = conn.execute(query.order_by(runs.updated_at, runs.id).limit(limit))
            return [run_record(r) for r in rows]

    def fire_due_timers(
        self, limit: int = 1000, workflows: Collection[str] | None = None
    ) -> list[RunWake]:
        """Complete timers whose deadline has passed, oldest first; returns the runs to
        wake.

        ``workflows``: only timers of runs of these workflows (those the caller can
        route wakes for); None: every timer.

        Each run's row is taken before its timers' (the lock order of every transaction
        that touches a run and its steps), and only if no other transaction holds it: a
        timer of a run in the middle of a commit fires at the next poll.
        """
        at = self._now
        # Read first: on most polls nothing is due (a write transaction would queue
        # behind SQLite's writer lock for nothing).
        with self._read() as conn:
            due = conn.execute(_due_steps("timer", at, workflows, limit)).all()
        if not due:
            return []
        run_ids = sorted({run_id for run_id, _seq in due})
        locked = select(s.runs.c.id).where(s.runs.c.id.in_(run_ids)).order_by(s.runs.c.id)
        if self.dialect == "postgresql":
            locked = locked.with_for_update(skip_locked=True, key_share=True)
        wakes = []
        with self._transaction() as conn:
            held = list(conn.execute(locked).scalars())
            if not held:
                return []
            fired = conn.execute(
                update(s.steps)
                .where(
                    s.steps.c.run_id.in_(held),
                    s.steps.c.state == SCHEDULED,
                    s.steps.c.kind == "timer",
                    s.steps.c.due_at <= at,
                )
                .values(state=DONE, outcome="ok", completed_at=at)
                .returning(s.steps.c.run_id)
            ).scalars()
            for run_id in sorted(set(fired)):
                wake = self._flag_wake(conn, run_id, locked=True)
                if wake is not None:
                    wakes.append(wake)
        return wakes


def _due_steps(
    kind: str, at: ColumnElement[float], workflows: Collection[str] | None, limit: int
) -> Select[str, int]:
    """Scheduled steps of ``kind`` due by ``at``, of runs of ``workflows`` (None: all),
    the earliest first: one range of ``ix_durable_steps_state_kind_due``."""
    steps = s.steps.c
    query = select(steps.run_id, steps.seq).where(
        steps.state == SCHEDULED, steps.kind == kind, steps.due_at <= at
    )
    if workflows is not None:
        # Correlated, so that each due step looks its run up by key: an IN over the runs
        # of these workflows would read every one of them.
        ours = (
            select(s.runs.c.id)
            .where(s.runs.c.id == steps.run_id, s.runs.c.workflow.in_(list(workflows)))
            .exists()
        )
        query = query.where(ours)
    return query.order_by(steps.due_at, steps.run_id, steps.seq).limit(limit)
