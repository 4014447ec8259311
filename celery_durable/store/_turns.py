"""Driver turns: take a run's wake and its new outcomes, then commit what the turn decided.

A turn's commit is fenced: it lands only if the run is still at the incarnation and turn
the driver started from, so of two drivers racing on one run exactly one writes history,
and a driver that stalled before a continue-as-new, a retry or a resume never writes
into what came after.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import (
    JSON,
    Connection,
    Float,
    Insert,
    Select,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import DataError, IntegrityError

from ..errors import HistoryWriteError
from . import _schema as s
from ._base import RunWake, StoreBase, step_is
from ._records import (
    DONE,
    FINISHED,
    NOT_FINISHED,
    OPEN_STEP_STATES,
    PENDING,
    SCHEDULED,
    STEP_CANCELLED,
    SUCCESS,
    CancelledStep,
    TurnCommitted,
    TurnStart,
    TurnWrite,
    run_record,
    run_row,
    step_record,
    step_row,
)

__all__ = ["TurnWrites"]

#: The kind of a step that started a child run.
CHILD = "child"


class TurnWrites(StoreBase):
    """The reads that begin a turn and the one transaction that commits it."""

    def begin_turn(self, run_id: str) -> TurnStart | None:
        """Read the run and the outcomes not yet delivered (no write, no lock)."""
        # One snapshot: every outcome counted in the events read is among the steps
        # read (an outcome and its event commit together).
        with self._read() as conn:
            rows = conn.execute(self._hot.turn_start, {"b_run": run_id}).all()
        if not rows:
            return None
        outcomes = [step_record(_StepColumns(r)) for r in rows if r.step_seq is not None]
        return TurnStart(run_record(rows[0]), outcomes)

    def take_events(self, run_id: str, seen: int) -> bool:
        """Mark the run's first ``seen`` events as seen by a turn that found nothing to
        do; returns whether more have come since (then drive it again)."""
        row = self._each_statement(self._hot.take_events, {"b_run": run_id, "b_seen": seen})
        return row is not None and (row.events or 0) > seen

    def commit_turn(self, run_id: str, write: TurnWrite) -> TurnCommitted | None:
        """Record a driver turn (see :meth:`_commit_turn`).

        Raises:
            HistoryWriteError: the database refused the turn's data (a constraint or a
                value it cannot store), which a retry would not change.
        """
        try:
            return self._commit_turn(run_id, write)
        except (IntegrityError, DataError) as exc:
            raise HistoryWriteError(
                f"workflow run {run_id}: the store refused turn {write.turn + 1}: "
                f"{exc.orig}. Fix the workflow (or the value it produced) and retry the run."
            ) from exc

    def _commit_turn(self, run_id: str, write: TurnWrite) -> TurnCommitted | None:
        """Record turn ``write.turn + 1`` if the run is still at ``write.turn`` of
        ``write.incarnation``.

        Returns None when another turn moved the run first (nothing is written). In one
        transaction: delivered steps are marked, new steps inserted (signal waits matched
        with buffered signals), cancelled steps closed and the child runs of cancelled
        child steps asked to cancel, child runs created, the run's status, progress and
        result set, and a finished child's outcome recorded on its parent's step.

        Rows are locked parent run, this run, its steps, then its children's runs (see
        :meth:`_lock_parent_of`); the parent's row only when the run finishes.
        """
        turn, at = write.turn, write.at
        # Turn and status are bound parameters of the prebuilt fenced update; only a turn
        # that changes more adds values to it. ``at`` is the turn's own time (what
        # workflow.now() said, read back by replays); every time the sweepers compare is
        # the database's.
        extra: dict[str, Any] = {}
        if turn == 0:
            extra["started_at"] = at
        if write.status in FINISHED:
            # Retention compares it with the database's clock: it is the database's too.
            extra["finished_at"] = self._now
        if write.result is not None:
            extra["content_type"], extra["result"] = write.result
        if write.error is not None:
            extra["error"] = write.error
        if write.cancel_delivered:
            extra["cancel_turn"] = turn + 1
            extra["cancel_at"] = at
        key = {"b_run": run_id, "b_turn": turn, "b_next": turn + 1, "b_at": at}
        advance = self._hot.advance.values(**extra) if extra else self._hot.advance
        fence = {"b_incarnation": write.incarnation, "b_driver": write.driver, "b_seen": write.seen}
        finishing = write.status in FINISHED
        params = {**key, **fence, "b_status": write.status}
        if self.dialect == "postgresql" and _plain(write):
            return self._commit_plain_turn(run_id, write, extra, params)
        with self._transaction() as conn:
            if finishing and write.child:
                # This commit may complete the parent's step and flag its wake.
                self._lock_parent_of(conn, run_id)
            advance_result = conn.execute(advance, {**key, **fence, "b_status": write.status})
            row = advance_result.first()
            if row is None:
                conn.rollback()
                return None
            if write.progress:
                progress = {**(row.progress or {}), **write.progress}
                conn.execute(update(s.runs).where(s.runs.c.id == run_id).values(progress=progress))
            if write.delivered:
                conn.execute(self._hot.deliver, {**key, "b_seqs": list(write.delivered)})
            if write.new_steps:
                conn.execute(
                    self._hot.insert_steps,
                    [step_row(run_id, turn + 1, at, n) for n in write.new_steps],
                )
            for child in write.children:
                conn.execute(insert(s.runs).values(**run_row(child, self._now)))
            cancelled = self._cancel_steps(conn, run_id, write.cancelled)
            # In this commit, not after it: a crash between the two would leave the
            # children running with nobody waiting for them.
            cancelled_children = self._cancel_children(conn, cancelled)
            # Matching reads every step of the run, so only a turn that adds a wait, or
            # gives a cancelled wait's signal back, does it: a signal that finds its wait
            # already there is matched by send_signal.
            signals_matched = False
            if any(n.kind == "signal" for n in write.new_steps) or any(
                c.kind == "signal" for c in cancelled
            ):
                signals_matched = self._match_signals(conn, run_id)
            parent = None
            if finishing and row.parent_id is not None:
                parent = self._complete_parent_step(conn, row.parent_id, row.parent_seq, write)
            if write.restart is not None:
                self._restart(conn, run_id, write.restart)
        return TurnCommitted(
            pending=(row.events or 0) > write.seen,
            signals_matched=signals_matched,
            cancelled=cancelled,
            parent=parent,
            cancelled_children=cancelled_children,
        )

    def _commit_plain_turn(
        self, run_id: str, write: TurnWrite, extra: dict[str, Any], params: dict[str, Any]
    ) -> TurnCommitted | None:
        """The usual turn (steps delivered, steps added, nothing else) as one PostgreSQL
        statement: one round trip instead of five, the same writes in the same order.

        Each part is conditional on the fenced update of the run's row, which takes the
        row's lock before any step's (the lock order).
        """
        shape = (tuple(sorted(extra)), bool(write.delivered), bool(write.new_steps))
        statement = self._plain_turns.get(shape)
        if statement is None:
            statement = self._plain_turns[shape] = self._plain_turn(*shape)
        # The finishing time is the database's, computed in the statement.
        params.update({f"x_{name}": v for name, v in extra.items() if name != "finished_at"})
        if write.delivered:
            params["b_seqs"] = list(write.delivered)
        if write.new_steps:
            rows = [step_row(run_id, write.turn + 1, write.at, n) for n in write.new_steps]
            params.update(_step_arrays(rows))
        row = self._each_statement(statement, params)
        if row is None:
            return None
        return TurnCommitted(
            pending=(row.events or 0) > write.seen, signals_matched=False, cancelled=[], parent=None
        )

    def _plain_turn(self, extra: tuple[str, ...], delivers: bool, inserts: bool) -> Select[Any]:
        """The statement of :meth:`_commit_plain_turn` for one shape of turn, built once:
        building and keying a statement this size costs more than running it."""
        advance = self._hot.advance
        if extra:
            values: dict[str, Any] = {name: bindparam(f"x_{name}") for name in extra}
            if "finished_at" in values:
                values["finished_at"] = self._now
            advance = advance.values(**values)
        advanced = advance.cte("advanced")
        landed = exists(select(advanced.c.events))
        parts = []
        if delivers:
            parts.append(self._hot.deliver.where(landed).cte("delivered"))
        if inserts:
            parts.append(_insert_steps(self._now, landed).cte("inserted"))
        return select(advanced.c.events).add_cte(*parts)

    def _cancel_steps(
        self, conn: Connection, run_id: str, seqs: Sequence[int]
    ) -> list[CancelledStep]:
        if not seqs:
            return []
        rows = conn.execute(
            update(s.steps)
            .where(
                and_(
                    s.steps.c.run_id == run_id,
                    s.steps.c.seq.in_(list(seqs)),
                    s.steps.c.state.in_(OPEN_STEP_STATES),
                )
            )
            .values(state=STEP_CANCELLED, completed_at=self._now, stall_from=None)
            .returning(s.steps.c.seq, s.steps.c.kind, s.steps.c.dispatch_id, s.steps.c.child_id)
        ).all()
        # A signal a cancelled wait had already taken goes back to the buffer for the next.
        signal_seqs = [r.seq for r in rows if r.kind == "signal"]
        if signal_seqs:
            conn.execute(
                update(s.signals)
                .where(
                    and_(s.signals.c.run_id == run_id, s.signals.c.consumed_seq.in_(signal_seqs))
                )
                .values(consumed_seq=None)
            )
        return [CancelledStep(r.seq, r.kind, r.dispatch_id, r.child_id) for r in rows]

    def _cancel_children(
        self, conn: Connection, cancelled: Sequence[CancelledStep]
    ) -> list[RunWake]:
        """Ask the child run of each cancelled child step to cancel; returns the wakes.

        The caller holds the parent's row, so each child's row is taken after it (parent
        before child, see :meth:`_lock_parent_of`), and siblings in id order.
        """
        wakes = []
        for child_id in sorted({c.child_id for c in cancelled if c.kind == CHILD and c.child_id}):
            _asked, wake = self._ask_to_cancel(conn, child_id)
            if wake is not None:
                wakes.append(wake)
        return wakes

    def _ask_to_cancel(self, conn: Connection, run_id: str) -> tuple[bool, RunWake | None]:
        """Set the run's cancel request and its wake flag, unless it has finished or was
        asked already; returns whether it was asked now, and the wake to publish."""
        asked = conn.execute(
            update(s.runs)
            .where(
                and_(
                    s.runs.c.id == run_id,
                    s.runs.c.status.in_(NOT_FINISHED),
                    s.runs.c.cancel_requested.is_not(True),
                )
            )
            .values(cancel_requested=True, updated_at=self._now)
        ).rowcount
        if not asked:
            return False, None
        # The update above holds the row. A driver whose turn read the run before this
        # commit cleared the flag first, so the flag is set again here and it (or the
        # sweeper, should the wake be lost) delivers the cancellation in a later turn.
        return True, self._flag_wake(conn, run_id, locked=True)

    def _match_signals(self, conn: Connection, run_id: str) -> bool:
        """Give buffered signals to waiting steps of the same name, oldest to oldest."""
        waits = conn.execute(
            select(s.steps.c.seq, s.steps.c.name)
            .where(
                and_(
                    s.steps.c.run_id == run_id,
                    s.steps.c.kind == "signal",
                    s.steps.c.state == SCHEDULED,
                )
            )
            .order_by(s.steps.c.seq)
        ).all()
        if not waits:
            return False
        buffered = conn.execute(
            select(s.signals)
            .where(
                and_(
                    s.signals.c.run_id == run_id,
                    s.signals.c.consumed_seq.is_(None),
                    s.signals.c.name.in_({w.name for w in waits}),
                )
            )
            .order_by(s.signals.c.id)
        ).all()
        matched = False
        queues: dict[str, list[Any]] = {}
        for signal in buffered:
            queues.setdefault(signal.name, []).append(signal)
        for wait in waits:
            queue = queues.get(wait.name)
            if not queue:
                continue
            signal = queue.pop(0)
            conn.execute(
                update(s.signals).where(s.signals.c.id == signal.id).values(consumed_seq=wait.seq)
            )
            self._give_signal(conn, run_id, wait.seq, signal.content_type, signal.payload)
            matched = True
        return matched

    def _give_signal(
        self, conn: Connection, run_id: str, seq: int, content_type: str, payload: bytes
    ) -> None:
        """Complete signal-wait step ``seq`` with a signal's payload as its outcome."""
        conn.execute(
            update(s.steps)
            .where(step_is(run_id, seq))
            .values(
                state=DONE,
                outcome="ok",
                content_type=content_type,
                result=payload,
                completed_at=self._now,
            )
        )

    def _complete_parent_step(
        self, conn: Connection, parent_id: str, parent_seq: int | None, write: TurnWrite
    ) -> RunWake | None:
        """Record a finished child's end on its parent's step and flag the parent's wake.

        The caller has locked the parent's row first (:meth:`_lock_parent_of`).
        """
        values: dict[str, Any] = {"state": DONE, "completed_at": self._now}
        if write.status == SUCCESS and write.result is not None:
            values.update(outcome="ok", content_type=write.result[0], result=write.result[1])
        else:
            values.update(outcome="error", error=write.error or {})
        moved = conn.execute(
            update(s.steps).where(step_is(parent_id, parent_seq, SCHEDULED)).values(**values)
        ).rowcount
        if not moved:
            return None
        return self._flag_wake(conn, parent_id, locked=True)

    def _restart(self, conn: Connection, run_id: str, new_input: tuple[str, bytes]) -> None:
        top = conn.execute(
            select(func.max(s.steps.c.seq)).where(s.steps.c.run_id == run_id)
        ).scalar_one_or_none()
        base = conn.execute(select(s.runs.c.seq_base).where(s.runs.c.id == run_id)).scalar_one()
        conn.execute(delete(s.steps).where(s.steps.c.run_id == run_id))
        # The signals those waits consumed went into their steps' outcomes, which are
        # gone now; buffered ones (consumed_seq NULL) are the new incarnation's.
        conn.execute(
            delete(s.signals).where(
                and_(s.signals.c.run_id == run_id, s.signals.c.consumed_seq.is_not(None))
            )
        )
        conn.execute(
            update(s.runs)
            .where(s.runs.c.id == run_id)
            .values(
                status=PENDING,
                turn=0,
                content_type=new_input[0],
                input=new_input[1],
                # Steps of the new incarnation get numbers no message of the old one can
                # carry, so a late outcome of an old step never lands on a new one.
                seq_base=max(top or 0, base or 0),
                incarnation=func.coalesce(s.runs.c.incarnation, 0) + 1,
                started_at=None,
                finished_at=None,
                result=None,
                error=None,
                cancel_turn=None,
                cancel_at=None,
                # A cancel requested while this turn ran has not been delivered to any
                # code yet: the new run gets it (one already delivered stays with the old).
                cancel_requested=case(
                    (s.runs.c.cancel_turn.is_(None), s.runs.c.cancel_requested), else_=None
                ),
                wake_pending=True,
                wake_sent_at=self._now,
            )
        )


class _StepColumns:
    """A row of ``HotStatements.turn_start`` seen as a step's row (``step_`` columns)."""

    def __init__(self, row: Any) -> None:
        self._mapping = row._mapping

    def __getattr__(self, name: str) -> Any:
        return self._mapping[f"step_{name}"]


def _plain(write: TurnWrite) -> bool:
    """Whether a turn only delivers and adds steps (no signal waits), or finishes a run
    that is nobody's child (whose commit has no parent's step to complete)."""
    return (
        (write.status not in FINISHED or not write.child)
        and not write.progress
        and not write.children
        and not write.cancelled
        and write.restart is None
        and not any(n.kind == "signal" for n in write.new_steps)
    )


#: Columns of a new step given as they are; the times are computed in the statement.
_STEP_COLUMNS = [
    c for c in s.steps.c if c.name not in ("dispatched_at", "due_at", "completed_at", "stall_from")
]
_OFFSETS = {"due_at": "b_due_in", "completed_at": "b_done_in", "stall_from": "b_stall_in"}


def _array_type(kind: Any) -> Any:
    # JSON travels as text and is cast back: an array of JSON has no adapter of its own.
    return ARRAY(Text() if isinstance(kind, JSON) else kind)


def _insert_steps(now: Any, landed: Any) -> Insert:
    """``HotStatements.insert_steps`` as one INSERT ... SELECT FROM unnest(arrays), one
    array per column (parameters ``n_<column>``), only if the run's row was advanced
    (``landed``). Arrays keep the statement's text the same for any number of steps,
    so it is compiled once and prepared by the server."""
    arrays = [bindparam(f"n_{c.name}", type_=_array_type(c.type)) for c in _STEP_COLUMNS]
    arrays += [bindparam(f"n_{name}", type_=ARRAY(Float())) for name in _OFFSETS]
    names = [c.name for c in _STEP_COLUMNS] + list(_OFFSETS)
    rows = func.unnest(*arrays).table_valued(*names).render_derived()
    chosen = [cast(rows.c[c.name], c.type).label(c.name) for c in _STEP_COLUMNS]
    times = [now.label("dispatched_at")] + [(now + rows.c[name]).label(name) for name in _OFFSETS]
    columns = [c.name for c in _STEP_COLUMNS] + ["dispatched_at", *_OFFSETS]
    return insert(s.steps).from_select(columns, select(*chosen, *times).where(landed))


def _step_arrays(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The parameters of :func:`_insert_steps` for ``rows`` (of ``step_row``)."""
    params = {}
    for c in _STEP_COLUMNS:
        cells = [row.get(c.name) for row in rows]
        if isinstance(c.type, JSON):
            cells = [None if v is None else json.dumps(v) for v in cells]
        params[f"n_{c.name}"] = cells
    for name, offset in _OFFSETS.items():
        params[f"n_{name}"] = [row[offset] for row in rows]
    return params
