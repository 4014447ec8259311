"""Retention: deleting finished runs with their history, consumed signals nobody can
read any more, and the rows of workers long gone.

Everything is deleted in small batches, each one short transaction, so sweepers can do
it between their recovery passes. A run goes only with its whole family: the sweepers
pick finished top-level runs (no ``parent_id``) and take their children, grandchildren
and so on along, and only when every one of them has finished before the cutoff too. A
child never goes on its own, so a parent that is still running always finds its
children's results.

Many sweepers may purge at once (PostgreSQL): the top-level runs of a batch are taken
with ``FOR UPDATE SKIP LOCKED`` and their descendants likewise; a family with a row some
other transaction holds is left for a later batch. A sweeper never waits for a run's
row, and the families of two batches never overlap, so nothing is deleted twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import ColumnElement, Connection, Table, and_, delete, exists, func, select, tuple_

from . import _schema as s
from ._base import StoreBase
from ._records import CLAIMED, FINISHED

__all__ = ["PurgeMark", "Purged", "Retention"]

#: Where a batch stopped: the (finished_at, id) of the last top-level run it looked at.
PurgeMark = tuple[float, str]

#: How many signal ids one look for orphans covers.
SIGNAL_WINDOW = 2000


@dataclass(frozen=True)
class Purged:
    """What one batch deleted (or, for a dry run, would delete)."""

    runs: int = 0
    steps: int = 0
    signals: int = 0
    #: Where the next batch goes on from; None when this batch reached the end (the next
    #: one starts again with the oldest runs).
    resume_after: PurgeMark | None = None


@dataclass(frozen=True)
class _Family:
    """A finished top-level run and all its descendants."""

    root: str
    members: list[str]


class Retention(StoreBase):
    """Deleting what has expired, in batches."""

    def purge_finished(
        self, older_than: float, limit: int = 200, after: PurgeMark | None = None
    ) -> Purged:
        """Delete up to ``limit`` top-level runs that finished more than ``older_than``
        seconds ago, each with its descendants, their steps and signals, in one
        transaction.

        A family is kept while any of its runs is not finished (STUCK, still running)
        or finished more recently. ``after``: go on after the mark an earlier batch
        returned, so that families kept for now do not fill every batch.
        """
        before = self._now - older_than
        with self._transaction() as conn:
            families, mark = self._expired_families(conn, before, limit, after, lock=True)
            ids = sorted(run for family in families for run in family.members)
            if not ids:
                return Purged(resume_after=mark)
            # Each statement deletes by an index prefix: signals (run_id, ...), steps by
            # their key (run_id, seq), runs by id. The runs' rows are held already (the
            # lock order: a run before its steps).
            signals = conn.execute(delete(s.signals).where(s.signals.c.run_id.in_(ids))).rowcount
            steps = conn.execute(delete(s.steps).where(s.steps.c.run_id.in_(ids))).rowcount
            runs = conn.execute(delete(s.runs).where(s.runs.c.id.in_(ids))).rowcount
            return Purged(runs=runs, steps=steps, signals=signals, resume_after=mark)

    def count_expired(self, older_than: float, batch: int = 1000) -> Purged:
        """What :meth:`purge_finished` would delete of the runs finished more than
        ``older_than`` seconds ago, counted without deleting anything."""
        before = self._now - older_than
        runs = steps = signals = 0
        mark: PurgeMark | None = None
        while True:
            with self._read() as conn:
                families, mark = self._expired_families(conn, before, batch, mark, lock=False)
                ids = [run for family in families for run in family.members]
                runs += len(ids)
                for chunk in _chunks(ids, 500):
                    steps += _count(conn, s.steps.c.run_id.in_(chunk), s.steps)
                    signals += _count(conn, s.signals.c.run_id.in_(chunk), s.signals)
            if mark is None:
                return Purged(runs=runs, steps=steps, signals=signals)

    def purge_orphan_signals(
        self, after_id: int = 0, window: int = SIGNAL_WINDOW
    ) -> tuple[int, int]:
        """Delete consumed signals whose signal-wait step no longer exists, among the
        signals with ids in ``(after_id, after_id + window]``; returns how many it
        deleted and where the next look starts (0: it reached the newest signal).

        Continue-as-new deletes the old incarnation's steps and (since schema version
        6) the signals they consumed; this clears those that older versions left.
        """
        sg = s.signals.c
        orphan = and_(
            sg.id > after_id,
            sg.id <= after_id + window,
            sg.consumed_seq.is_not(None),
            ~exists().where(and_(s.steps.c.run_id == sg.run_id, s.steps.c.seq == sg.consumed_seq)),
        )
        with self._transaction() as conn:
            deleted = conn.execute(delete(s.signals).where(orphan)).rowcount
            newest = conn.execute(select(func.max(sg.id))).scalar_one_or_none() or 0
        nxt = after_id + window
        return deleted, (nxt if nxt < newest else 0)

    def forget_workers(self, unseen_for: float, limit: int = 100) -> int:
        """Delete the rows of workers not seen for ``unseen_for`` seconds that hold no
        claim; returns how many.

        A claim names its holder (``claimed_by``), and a stopped holder's claims are
        released by :meth:`~celery_durable.store.Store.release_expired_claims` through
        its row, so a worker's row stays while any step is claimed by it.
        """
        seen_before = self._now - unseen_for
        w = s.workers.c
        holds = exists().where(and_(s.steps.c.state == CLAIMED, s.steps.c.claimed_by == w.id))
        gone = select(w.id).where(and_(w.last_seen < seen_before, ~holds)).order_by(w.id)
        gone = gone.limit(limit)
        if self.dialect == "postgresql":
            # A worker coming back renews its row: skip it rather than wait for it.
            gone = gone.with_for_update(skip_locked=True)
        with self._transaction() as conn:
            ids = list(conn.execute(gone).scalars())
            if not ids:
                return 0
            return conn.execute(delete(s.workers).where(w.id.in_(ids))).rowcount

    def _expired_families(
        self,
        conn: Connection,
        before: ColumnElement[float],
        limit: int,
        after: PurgeMark | None,
        lock: bool,
    ) -> tuple[list[_Family], PurgeMark | None]:
        """The families of up to ``limit`` expired top-level runs after ``after``, those
        with every member finished before ``before``; and the mark to go on from.

        ``lock`` (PostgreSQL): take every row of the families returned for this
        transaction, skipping any family with a row another transaction holds.
        """
        r = s.runs.c
        expired = and_(r.status.in_(FINISHED), r.finished_at < before)
        # Only finished runs have finished_at (resuming or restarting clears it); the
        # status is checked on the rows found, since SQLite, without statistics, would
        # take the index on status for the query and sort every finished run.
        roots_query = select(r.id, r.finished_at, r.status).where(
            and_(r.parent_id.is_(None), r.finished_at < before)
        )
        if after is not None:
            at, run_id = after
            # A row comparison: both databases start the index scan at the mark.
            roots_query = roots_query.where(tuple_(r.finished_at, r.id) > tuple_(at, run_id))
        roots_query = roots_query.order_by(r.finished_at, r.id).limit(limit)
        locking = lock and self.dialect == "postgresql"
        if locking:
            roots_query = roots_query.with_for_update(skip_locked=True)
        found = conn.execute(roots_query).all()
        mark = (float(found[-1].finished_at), str(found[-1].id)) if len(found) == limit else None
        roots = [row for row in found if row.status in FINISHED]
        # Down the families one generation at a time: (run, its root), unlocked.
        root_of = {str(row.id): str(row.id) for row in roots}
        generation = list(root_of)
        while generation:
            children = conn.execute(
                select(r.id, r.parent_id).where(r.parent_id.in_(generation))
            ).all()
            generation = []
            for child in children:
                root_of[str(child.id)] = root_of[str(child.parent_id)]
                generation.append(str(child.id))
        descendants = sorted(run for run, root in root_of.items() if run != root)
        # The descendants' state, read again after taking their rows: a run resumed or
        # changed meanwhile is seen as it is now (PostgreSQL returns a locked row's
        # newest version).
        ready: set[str] = set()
        for chunk in _chunks(descendants, 500):
            query = select(r.id).where(and_(r.id.in_(chunk), expired))
            if locking:
                query = query.with_for_update(skip_locked=True)
            ready.update(str(run) for run in conn.execute(query).scalars())
        families: dict[str, _Family] = {root: _Family(root, [root]) for root in root_of.values()}
        kept: set[str] = set()
        for run in descendants:
            root = root_of[run]
            if run in ready:
                families[root].members.append(run)
            else:
                kept.add(root)  # not finished, too recent, or held by another transaction
        return [f for root, f in families.items() if root not in kept], mark


def _chunks(items: Sequence[str], size: int) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _count(conn: Connection, condition: ColumnElement[bool], table: Table) -> int:
    return int(conn.execute(select(func.count()).select_from(table).where(condition)).scalar_one())
