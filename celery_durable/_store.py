"""The store: every durable fact about runs and steps, in SQL, behind one class.

:class:`Store` knows SQLAlchemy and nothing of Celery. Each method is one short
transaction; the methods that move a run forward are fenced on the run's ``turn`` so two
drivers racing on one run can never both write history. SQLite (WAL, ``BEGIN
IMMEDIATE``) and PostgreSQL (psycopg 3) are supported.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    Float,
    Integer,
    String,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    inspect,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import (
    DataError,
    IntegrityError,
    OperationalError,
    SQLAlchemyError,
)

from . import _schema as s
from ._codec import ErrorInfo
from ._engine import fork_gate, live_stores, make_engine, safe_url
from ._records import (
    ACTIVE,
    CANCELLED,
    CLAIMED,
    DELIVERED,
    DONE,
    FAILURE,
    FINISHED,
    OPEN_STEP_STATES,
    PENDING,
    RUNNING,
    SCHEDULED,
    STEP_CANCELLED,
    STUCK,
    SUCCESS,
    TERMINATED,
    CancelledStep,
    Dispatch,
    NewRun,
    NewStep,
    RunRecord,
    StepRecord,
    TurnCommitted,
    TurnStart,
    TurnWrite,
    run_record,
    run_row,
    step_record,
    step_row,
)
from .errors import (
    DurableError,
    HistoryWriteError,
    SignalError,
    StoreUnavailableError,
    WorkflowNotFoundError,
)

# The records and statuses are re-exported: callers think of them as the store's.
__all__ = [
    "ACTIVE",
    "CANCELLED",
    "CLAIMED",
    "DELIVERED",
    "DONE",
    "FAILURE",
    "FINISHED",
    "PENDING",
    "RUNNING",
    "SCHEDULED",
    "STUCK",
    "SUCCESS",
    "TERMINATED",
    "CancelledStep",
    "Dispatch",
    "NewRun",
    "NewStep",
    "RunRecord",
    "StepRecord",
    "Store",
    "TurnCommitted",
    "TurnStart",
    "TurnWrite",
]

logger = logging.getLogger(__name__)


def _now() -> float:
    return time.time()


class _HotStatements:
    """The statements run for every step or turn, built once per store.

    Building an SQLAlchemy statement and its cache key costs about as much client time
    as executing it; these run several times per step, so they take their values as
    bound parameters (``b_*``) instead of being built per call.
    """

    def __init__(self, no_disk_wait: ColumnElement[bool]) -> None:
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
                claimed_at=at,
                claimed_retries=retries,
                attempts=steps.attempts + 1,
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
                completed_at=at,
                outcome="ok",
                content_type=bindparam("b_type"),
                result=bindparam("b_result"),
            )
        )
        self.record_error = (
            update(s.steps)
            .where(open_step)
            .values(state=DONE, completed_at=at, outcome="error", error=bindparam("b_error"))
        )
        # Lost in a database crash, a set flag only delays the sweeper's wake.
        self.flag_wake = (
            update(s.runs)
            .where(
                and_(
                    runs.id == run_id,
                    runs.wake_pending.is_(False),
                    runs.status.in_(ACTIVE),
                    no_disk_wait,
                )
            )
            .values(wake_pending=True, woken_at=at)
        )
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
        # The fenced update of a turn that only moves the run on (the usual one).
        self.advance = (
            update(s.runs)
            .where(
                and_(
                    runs.id == run_id,
                    runs.turn == bindparam("b_turn", type_=Integer()),
                    runs.status.in_(ACTIVE),
                )
            )
            .values(
                turn=bindparam("b_next", type_=Integer()),
                status=bindparam("b_status", type_=String()),
                updated_at=at,
            )
            .returning(runs.workflow, runs.parent_id, runs.parent_seq, runs.progress, runs.seq_base)
        )
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


class Store:
    """Runs and steps in SQL. Thread-safe; one per database URL per process is enough.

    Args:
        url: an SQLAlchemy URL, e.g. ``sqlite:///celery_durable.sqlite3`` or
            ``postgresql+psycopg://127.0.0.1/app``.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._ready = False
        self._ready_lock = threading.Lock()
        self._hot = _HotStatements(self._no_disk_wait())
        live_stores.add(self)

    # -- plumbing ------------------------------------------------------------------------

    @contextmanager
    def _tx(self, readonly: bool = False) -> Iterator[Connection]:
        if readonly and self.dialect == "postgresql":
            # Every read-only method is one SELECT, which needs no BEGIN and COMMIT
            # round trips around it to see one snapshot.
            with self._autocommit() as conn:
                yield conn
            return
        self.ensure_schema()
        with self._fork_gate():
            conn = self._connect()
            with conn:
                if readonly:
                    conn = conn.execution_options(durable_readonly=True)
                with conn.begin():
                    yield conn

    @contextmanager
    def _autocommit(self) -> Iterator[Connection]:
        """A connection on which each statement commits by itself (PostgreSQL).

        For methods whose statements need not commit together: one round trip per
        statement instead of BEGIN, the statements and COMMIT. Each such method says why
        its order of commits is safe. SQLite serialises writers anyway; there the
        statements share one ordinary transaction.
        """
        if self.dialect != "postgresql":
            with self._tx() as conn:
                yield conn
            return
        self.ensure_schema()
        with self._connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def _no_disk_wait(self) -> ColumnElement[bool]:
        """A condition that is always true and lets its statement commit without waiting
        for the disk (PostgreSQL; on SQLite it is just true).

        For single statements on an :meth:`_autocommit` connection whose loss in a
        database crash the sweeper repairs. ``SET LOCAL synchronous_commit`` would need a
        transaction of three round trips; this makes the setting inside the statement. A
        row is written only once every condition held, this one included, so no write of
        the statement waits for the disk.
        """
        if self.dialect != "postgresql":
            return true()
        return func.set_config("synchronous_commit", "off", True) == "off"

    def _connect(self) -> Connection:
        try:
            return self.engine.connect()
        except OperationalError as exc:
            raise StoreUnavailableError(
                f"cannot reach the workflow store at {safe_url(self.url)}: {exc.orig}. "
                "Check app.conf.durable_database_url and that the database server is "
                "running."
            ) from exc

    def _fork_gate(self) -> AbstractContextManager[None]:
        # Only SQLite needs it: psycopg connections already ignore a fork.
        return fork_gate.held() if self.dialect == "sqlite" else nullcontext()

    def ensure_schema(self) -> None:
        """Create the tables if they are missing and check the schema version."""
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            try:
                with self._fork_gate():
                    self._create_schema()
            except OperationalError as exc:
                raise StoreUnavailableError(
                    f"cannot reach the workflow store at {safe_url(self.url)}: {exc.orig}. "
                    "Check app.conf.durable_database_url and that the database server is "
                    "running."
                ) from exc
            self._ready = True

    def _create_schema(self) -> None:
        for attempt in range(5):
            try:
                s.metadata.create_all(self.engine, checkfirst=True)
                break
            except (IntegrityError, OperationalError, SQLAlchemyError) as exc:
                # Several processes creating the tables at once: one wins, the others
                # see "already exists" and simply look again.
                if attempt == 4 or "exist" not in str(exc).lower():
                    raise
                time.sleep(0.05 * (attempt + 1))
        with self.engine.begin() as conn:
            row = conn.execute(
                select(s.meta.c.value).where(s.meta.c.key == "schema_version")
            ).scalar_one_or_none()
            if row is None:
                with suppress(IntegrityError):
                    conn.execute(
                        insert(s.meta).values(key="schema_version", value=str(s.SCHEMA_VERSION))
                    )
            elif int(row) > s.SCHEMA_VERSION:
                raise DurableError(
                    f"the workflow store at {safe_url(self.url)} has schema version {row}, "
                    f"newer than this celery_durable understands ({s.SCHEMA_VERSION}); "
                    "upgrade celery_durable on this machine"
                )
            elif int(row) < s.SCHEMA_VERSION:
                self._upgrade(conn, int(row))

    def _upgrade(self, conn: Connection, version: int) -> None:
        """Bring a store from ``version`` to the current schema, in this transaction."""
        # Lock the version row so that processes starting together upgrade once.
        locked = select(s.meta.c.value).where(s.meta.c.key == "schema_version")
        if self.dialect == "postgresql":
            locked = locked.with_for_update()
        version = int(conn.execute(locked).scalar_one())
        existing = {
            table: {c["name"] for c in inspect(conn).get_columns(table)}
            for table in ("durable_runs", "durable_steps")
        }
        for target in range(version + 1, s.SCHEMA_VERSION + 1):
            for table, column in s.ADDED_COLUMNS.get(target, []):
                if column in existing[table]:
                    continue
                col = s.metadata.tables[table].c[column]
                kind = col.type.compile(dialect=self.engine.dialect)
                conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            logger.warning("upgraded the workflow store to schema version %d", target)
        conn.execute(
            update(s.meta)
            .where(s.meta.c.key == "schema_version")
            .values(value=str(s.SCHEMA_VERSION))
        )

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    # -- starting and reading runs -------------------------------------------------------

    def create_run(self, new: NewRun) -> bool:
        """Insert ``new`` unless a run with its id exists; True when it was created."""
        # One statement that skips an existing id, committing by itself (and durably):
        # no read first and no BEGIN/COMMIT round trips, which made up about a third of
        # the time to start a run on PostgreSQL.
        dialect_insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        statement = (
            dialect_insert(s.runs)
            .values(**run_row(new, _now()))
            .on_conflict_do_nothing(index_elements=[s.runs.c.id])
            .returning(s.runs.c.id)
        )
        with self._autocommit() as conn:
            return conn.execute(statement).first() is not None

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or None."""
        with self._tx(readonly=True) as conn:
            row = conn.execute(select(s.runs).where(s.runs.c.id == run_id)).first()
        return None if row is None else run_record(row)

    def require_run(self, run_id: str) -> RunRecord:
        """The run with this id, or :class:`WorkflowNotFoundError`."""
        run = self.get_run(run_id)
        if run is None:
            raise WorkflowNotFoundError(
                f"no workflow run with id {run_id!r} in the store at {safe_url(self.url)}; "
                "check the id and that this process uses the same durable_database_url"
            )
        return run

    def get_status(self, run_id: str) -> str | None:
        """Just the status of a run (cheap, for polling)."""
        with self._tx(readonly=True) as conn:
            return conn.execute(self._hot.status, {"b_run": run_id}).scalar_one_or_none()

    def list_runs(
        self, status: str | None = None, workflow: str | None = None, limit: int = 50
    ) -> list[RunRecord]:
        """Most recent runs first, optionally filtered."""
        query = select(s.runs).order_by(s.runs.c.created_at.desc()).limit(limit)
        if status:
            query = query.where(s.runs.c.status == status)
        if workflow:
            query = query.where(s.runs.c.workflow == workflow)
        with self._tx(readonly=True) as conn:
            return [run_record(r) for r in conn.execute(query)]

    def history(self, run_id: str) -> list[StepRecord]:
        """Every step of a run, in order."""
        with self._tx(readonly=True) as conn:
            rows = conn.execute(
                select(s.steps).where(s.steps.c.run_id == run_id).order_by(s.steps.c.seq)
            )
            return [step_record(r) for r in rows]

    # -- driver turns --------------------------------------------------------------------

    def begin_turn(self, run_id: str) -> TurnStart | None:
        """Take the run's pending wake and read the outcomes not yet delivered."""
        # The flag is cleared (and committed) before the outcomes are read, and
        # record_outcome commits an outcome before it looks at the flag: so either this
        # read sees the outcome, or the flag was already clear and the recorder sends a
        # new wake. Nothing here needs to commit together.
        with self._autocommit() as conn:
            row = conn.execute(self._hot.take_wake, {"b_run": run_id}).first()
            if row is None:
                return None
            outcomes = conn.execute(self._hot.outcomes, {"b_run": run_id})
            return TurnStart(run_record(row), [step_record(r) for r in outcomes])

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
        """Record turn ``write.turn + 1`` if the run is still at ``write.turn``.

        Returns None when another turn moved the run first (nothing is written). In one
        transaction: delivered steps are marked, new steps inserted (signal waits matched
        with buffered signals), cancelled steps closed, child runs created, the run's
        status, progress and result set, and a finished child's outcome recorded on its
        parent's step.
        """
        turn, at = write.turn, write.at
        values: dict[str, Any] = {"turn": turn + 1, "status": write.status, "updated_at": at}
        if turn == 0:
            values["started_at"] = at
        if write.status in FINISHED:
            values["finished_at"] = at
        if write.result is not None:
            values["content_type"], values["result"] = write.result
        if write.error is not None:
            values["error"] = write.error
        if write.cancel_delivered:
            values["cancel_turn"] = turn + 1
            values["cancel_at"] = at
        key = {"b_run": run_id, "b_turn": turn, "b_next": turn + 1, "b_at": at}
        with self._tx() as conn:
            if values.keys() == {"turn", "status", "updated_at"}:
                advance = conn.execute(self._hot.advance, {**key, "b_status": write.status})
            else:
                advance = conn.execute(
                    update(s.runs)
                    .where(
                        and_(
                            s.runs.c.id == run_id,
                            s.runs.c.turn == turn,
                            s.runs.c.status.in_(ACTIVE),
                        )
                    )
                    .values(**values)
                    .returning(
                        s.runs.c.workflow,
                        s.runs.c.parent_id,
                        s.runs.c.parent_seq,
                        s.runs.c.progress,
                        s.runs.c.seq_base,
                    )
                )
            row = advance.first()
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
                    insert(s.steps), [step_row(run_id, turn + 1, at, n) for n in write.new_steps]
                )
            for child in write.children:
                conn.execute(insert(s.runs).values(**run_row(child, at)))
            cancelled = self._cancel_steps(conn, run_id, write.cancelled, at)
            # Matching reads every step of the run, so only a turn that adds a wait, or
            # gives a cancelled wait's signal back, does it: a signal that finds its wait
            # already there is matched by send_signal.
            ready_now = False
            if any(n.kind == "signal" for n in write.new_steps) or any(
                c.kind == "signal" for c in cancelled
            ):
                ready_now = self._match_signals(conn, run_id, at)
            parent = None
            if write.status in FINISHED and row.parent_id is not None:
                parent = self._complete_parent_step(conn, row.parent_id, row.parent_seq, write, at)
            if write.restart is not None:
                self._restart(conn, run_id, write.restart, at)
        return TurnCommitted(ready_now=ready_now, cancelled=cancelled, parent=parent)

    def _cancel_steps(
        self, conn: Connection, run_id: str, seqs: Sequence[int], at: float
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
            .values(state=STEP_CANCELLED, completed_at=at)
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

    def _match_signals(self, conn: Connection, run_id: str, at: float) -> bool:
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
            self._give_signal(conn, run_id, wait.seq, signal.content_type, signal.payload, at)
            matched = True
        return matched

    @staticmethod
    def _give_signal(
        conn: Connection, run_id: str, seq: int, content_type: str, payload: bytes, at: float
    ) -> None:
        """Complete signal-wait step ``seq`` with a signal's payload as its outcome."""
        conn.execute(
            update(s.steps)
            .where(_step_is(run_id, seq))
            .values(
                state=DONE,
                outcome="ok",
                content_type=content_type,
                result=payload,
                completed_at=at,
            )
        )

    def _complete_parent_step(
        self, conn: Connection, parent_id: str, parent_seq: int | None, write: TurnWrite, at: float
    ) -> tuple[str, str, Mapping[str, Any]] | None:
        values: dict[str, Any] = {"state": DONE, "completed_at": at}
        if write.status == SUCCESS and write.result is not None:
            values.update(outcome="ok", content_type=write.result[0], result=write.result[1])
        else:
            values.update(outcome="error", error=write.error or {})
        moved = conn.execute(
            update(s.steps).where(_step_is(parent_id, parent_seq, SCHEDULED)).values(**values)
        ).rowcount
        if not moved:
            return None
        return self._flag_wake(conn, parent_id, at)

    def _flag_wake(
        self, conn: Connection, run_id: str, at: float, locked: bool = False
    ) -> tuple[str, str, Mapping[str, Any]] | None:
        """Set the run's wake flag; returns what to publish if it was not already set.

        ``locked``: this transaction already holds the run's row (it updated it).
        """
        # The caller has just completed a step in this same transaction, which no driver
        # can see before the commit. Hold the run's row until then: a driver clearing the
        # flag meanwhile waits and reads the step afterwards. Without the lock it could
        # clear the flag and read the steps in between (READ COMMITTED), miss the step,
        # and the flag seen set here would promise a wake that never comes.
        if not locked:
            conn.execute(
                select(s.runs.c.id).where(s.runs.c.id == run_id).with_for_update(key_share=True)
            )
        row = conn.execute(
            update(s.runs)
            .where(
                and_(
                    s.runs.c.id == run_id,
                    s.runs.c.wake_pending.is_(False),
                    s.runs.c.status.in_(ACTIVE),
                )
            )
            .values(wake_pending=True, woken_at=at)
            .returning(s.runs.c.workflow, s.runs.c.options)
        ).first()
        return None if row is None else (run_id, row.workflow, row.options or {})

    def _restart(
        self, conn: Connection, run_id: str, new_input: tuple[str, bytes], at: float
    ) -> None:
        top = conn.execute(
            select(func.max(s.steps.c.seq)).where(s.steps.c.run_id == run_id)
        ).scalar_one_or_none()
        base = conn.execute(select(s.runs.c.seq_base).where(s.runs.c.id == run_id)).scalar_one()
        conn.execute(delete(s.steps).where(s.steps.c.run_id == run_id))
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
                woken_at=at,
            )
        )

    # -- signals, timers, cancellation ----------------------------------------------------

    def send_signal(
        self, run_id: str, name: str, content_type: str, payload: bytes
    ) -> tuple[str, str, Mapping[str, Any]] | None:
        """Buffer a signal for a run and match it to a waiting step.

        Returns the run to wake (id, workflow, options) when a wait took it.

        Raises:
            SignalError: the run does not exist or has finished.
        """
        at = _now()
        with self._tx() as conn:
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
                    created_at=at,
                    consumed_seq=wait,
                )
            )
            if wait is None:
                return None
            self._give_signal(conn, run_id, wait, content_type, payload, at)
            return self._flag_wake(conn, run_id, at, locked=True)

    def fire_due_timers(
        self, limit: int = 1000, workflows: Collection[str] | None = None
    ) -> list[tuple[str, str, Mapping[str, Any]]]:
        """Complete timers whose deadline has passed; returns the runs to wake.

        ``workflows``: only timers of runs of these workflows (those the caller can
        route wakes for); None: every timer.
        """
        at = _now()
        with self._tx() as conn:
            due_now = and_(
                s.steps.c.state == SCHEDULED,
                s.steps.c.dispatched_at <= at,
                s.steps.c.kind == "timer",
            )
            if workflows is not None:
                ours = select(s.runs.c.id).where(s.runs.c.workflow.in_(list(workflows)))
                due_now = and_(due_now, s.steps.c.run_id.in_(ours))
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
                    .where(_step_is(run_id, seq, SCHEDULED))
                    .values(state=DONE, outcome="ok", completed_at=at)
                ).rowcount
                if moved:
                    fired.add(run_id)
            wakes = []
            for run_id in sorted(fired):
                wake = self._flag_wake(conn, run_id, at)
                if wake is not None:
                    wakes.append(wake)
            return wakes

    def request_cancel(
        self, run_id: str, quiet: bool = False
    ) -> tuple[str, str, Mapping[str, Any]] | None:
        """Ask a run to cancel; returns it to wake (None if a wake is already pending).

        With ``quiet`` (a parent cancelling its child), a finished or missing run is not
        an error: there is simply nothing to do.

        Raises:
            WorkflowNotFoundError: no such run.
            DurableError: the run has already finished.
        """
        at = _now()
        with self._tx() as conn:
            row = conn.execute(select(s.runs).where(s.runs.c.id == run_id)).first()
            if quiet and (row is None or row.status in FINISHED):
                return None
            if row is None:
                raise WorkflowNotFoundError(f"no workflow run with id {run_id!r} to cancel")
            if row.status in FINISHED:
                raise DurableError(
                    f"workflow {row.workflow}[{run_id}] has already finished ({row.status}); "
                    "there is nothing to cancel"
                )
            if row.cancel_requested:
                return None
            conn.execute(
                update(s.runs)
                .where(s.runs.c.id == run_id)
                .values(cancel_requested=True, updated_at=at)
            )
            return self._flag_wake(conn, run_id, at)

    def terminate(
        self, run_id: str, error: ErrorInfo
    ) -> tuple[list[CancelledStep], tuple[str, str, Mapping[str, Any]] | None]:
        """End a run now without running its code; returns its open steps and parent wake.

        Raises:
            WorkflowNotFoundError: no such run.
            DurableError: the run has already finished.
        """
        at = _now()
        with self._tx() as conn:
            row = conn.execute(select(s.runs).where(s.runs.c.id == run_id)).first()
            if row is None:
                raise WorkflowNotFoundError(f"no workflow run with id {run_id!r} to terminate")
            if row.status in FINISHED:
                raise DurableError(
                    f"workflow {row.workflow}[{run_id}] has already finished ({row.status}); "
                    "there is nothing to terminate"
                )
            conn.execute(
                update(s.runs)
                .where(s.runs.c.id == run_id)
                .values(status=TERMINATED, error=error, finished_at=at, updated_at=at)
            )
            open_seqs = (
                conn.execute(
                    select(s.steps.c.seq).where(
                        and_(s.steps.c.run_id == run_id, s.steps.c.state.in_(OPEN_STEP_STATES))
                    )
                )
                .scalars()
                .all()
            )
            cancelled = self._cancel_steps(conn, run_id, list(open_seqs), at)
            parent = None
            if row.parent_id is not None:
                write = TurnWrite(turn=row.turn, at=at, status=TERMINATED, error=error)
                parent = self._complete_parent_step(conn, row.parent_id, row.parent_seq, write, at)
            return cancelled, parent

    def park(self, run_id: str, turn: int, status: str, error: ErrorInfo) -> bool:
        """Stop a run at ``turn`` (without recording a new turn), keeping its history."""
        at = _now()
        with self._tx() as conn:
            return (
                conn.execute(
                    update(s.runs)
                    .where(
                        and_(
                            s.runs.c.id == run_id,
                            s.runs.c.turn == turn,
                            s.runs.c.status.in_(ACTIVE),
                        )
                    )
                    .values(status=status, error=error, updated_at=at)
                ).rowcount
                == 1
            )

    def resume(self, run_id: str) -> str:
        """Put a STUCK or FAILED run back to RUNNING; returns the status it had.

        A failed run goes back to the turn before the one that failed: the outcomes that
        turn delivered are delivered again, and steps that failed are scheduled again.
        Returns the previous status; the caller publishes a wake.
        """
        at = _now()
        with self._tx() as conn:
            row = conn.execute(select(s.runs).where(s.runs.c.id == run_id)).first()
            if row is None:
                raise WorkflowNotFoundError(f"no workflow run with id {run_id!r} to retry")
            run = run_record(row)
            if run.status == STUCK:
                conn.execute(
                    update(s.runs)
                    .where(s.runs.c.id == run_id)
                    .values(
                        status=RUNNING if run.turn else PENDING,
                        error=None,
                        updated_at=at,
                        attempt=func.coalesce(s.runs.c.attempt, 1) + 1,
                    )
                )
                return STUCK
            if run.status != FAILURE:
                raise DurableError(
                    f"workflow {run.workflow}[{run_id}] is {run.status}; only STUCK or "
                    "FAILURE runs can be retried"
                )
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
                    .where(_step_is(run_id, seq))
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
                        dispatch_id=str(uuid.uuid4()),
                        dispatched_at=at,
                    )
                )
            conn.execute(
                update(s.steps)
                .where(and_(s.steps.c.run_id == run_id, s.steps.c.observed_turn == last))
                .values(state=DONE, observed_turn=None, observed_at=None)
            )
            conn.execute(
                update(s.runs)
                .where(s.runs.c.id == run_id)
                .values(
                    status=RUNNING if last > 1 else PENDING,
                    turn=last - 1,
                    attempt=func.coalesce(s.runs.c.attempt, 1) + 1,
                    error=None,
                    finished_at=None,
                    updated_at=at,
                )
            )
            return FAILURE

    def dispatches_to_resend(self, run_id: str) -> list[Dispatch]:
        """Steps of a run scheduled but not yet claimed, for publishing after a retry."""
        with self._tx(readonly=True) as conn:
            return _dispatches(
                conn,
                and_(
                    s.steps.c.run_id == run_id,
                    s.steps.c.state == SCHEDULED,
                    s.steps.c.kind == "activity",
                ),
            )

    # -- the activity side ---------------------------------------------------------------

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
            "b_at": _now(),
        }
        with self._autocommit() as conn:
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
        at = _now()
        key = {"b_run": run_id, "b_seq": seq, "b_at": at}
        if error is not None:
            record, values = self._hot.record_error, {**key, "b_error": error}
        else:
            assert result is not None
            record = self._hot.record_ok
            values = {**key, "b_type": result[0], "b_result": result[1]}
        with self._autocommit() as conn:
            recorded = conn.execute(record, values).rowcount
            if recorded != 1:
                return False, False
            # The outcome is committed before the flag is looked at. Were both in one
            # transaction (PostgreSQL, READ COMMITTED), a driver could clear the flag and
            # read the outcomes between this look and this commit: it would miss the
            # outcome while this recorder counted on it, and the run would wait for the
            # sweeper. Now a flag seen set belongs to a turn whose read comes later and
            # sees the outcome; a flag seen clear is set here and a wake is sent.
            wake = conn.execute(self._hot.flag_wake, key).rowcount
            return True, wake == 1

    def release_step(self, run_id: str, seq: int) -> Dispatch | None:
        """Give a claimed step a new dispatch id (its worker died); the caller republishes."""
        new_id = str(uuid.uuid4())
        with self._tx() as conn:
            moved = conn.execute(
                update(s.steps)
                .where(_step_is(run_id, seq, CLAIMED))
                .values(
                    state=SCHEDULED,
                    dispatch_id=new_id,
                    dispatched_at=_now(),
                    claimed_by=None,
                    claimed_retries=None,
                    redispatches=s.steps.c.redispatches + 1,
                )
            ).rowcount
            if moved != 1:
                return None
            found = _dispatches(conn, _step_is(run_id, seq))
            return found[0] if found else None

    # -- workers and the sweeper ---------------------------------------------------------

    def heartbeat(self, worker: str, hostname: str, pid: int) -> None:
        """Record that ``worker`` is alive now (registering it the first time)."""
        at = _now()
        with self._tx() as conn:
            seen = conn.execute(
                update(s.workers)
                .where(s.workers.c.id == worker)
                .values(last_seen=at, stopped_at=None)
            ).rowcount
            if not seen:
                conn.execute(
                    insert(s.workers).values(
                        id=worker, hostname=hostname, pid=pid, started_at=at, last_seen=at
                    )
                )
                # A worker starting under a node name means any older instance with that
                # name is gone (Celery refuses two live workers with one name).
                conn.execute(
                    update(s.workers)
                    .where(
                        and_(
                            s.workers.c.hostname == hostname,
                            s.workers.c.id != worker,
                            s.workers.c.stopped_at.is_(None),
                        )
                    )
                    .values(stopped_at=at)
                )

    def worker_stopped(self, worker: str) -> None:
        """Record a clean shutdown of ``worker``."""
        with self._tx() as conn:
            conn.execute(
                update(s.workers).where(s.workers.c.id == worker).values(stopped_at=_now())
            )

    def release_dead_claims(self, dead_after: float) -> list[Dispatch]:
        """New dispatches for steps claimed by workers that stopped or went silent."""
        cutoff = _now() - dead_after
        dead = select(s.workers.c.id).where(
            or_(s.workers.c.stopped_at.is_not(None), s.workers.c.last_seen < cutoff)
        )
        # A claim by a worker that never registered (started without the bootstep) has
        # no heartbeat to go silent; it counts as dead once it is as old as the timeout.
        unknown = and_(
            s.steps.c.claimed_by.not_in(select(s.workers.c.id)),
            s.steps.c.claimed_at < cutoff,
        )
        with self._tx() as conn:
            rows = conn.execute(
                select(s.steps.c.run_id, s.steps.c.seq).where(
                    and_(
                        s.steps.c.state == CLAIMED,
                        or_(s.steps.c.claimed_by.in_(dead), unknown),
                    )
                )
            ).all()
        released = []
        for run_id, seq in rows:
            dispatch = self.release_step(run_id, seq)
            if dispatch is not None:
                released.append(dispatch)
        return released

    def stale_dispatches(self, older_than: float, limit: int = 1000) -> list[Dispatch]:
        """Steps published but never claimed for a while, taken for re-publishing.

        Each step is taken by one sweeper only, and waits twice as long before its next
        re-publish, so a long queue is not flooded with copies. The copies share the
        dispatch id, so whichever is received first runs and the others are dropped.
        """
        now = _now()
        with self._tx() as conn:
            rows = conn.execute(
                select(s.steps.c.run_id, s.steps.c.seq, s.steps.c.redispatches)
                .where(
                    and_(
                        s.steps.c.state == SCHEDULED,
                        s.steps.c.dispatched_at < now - older_than,
                        # Timers, signal waits and children wait on purpose; only task
                        # messages can be lost.
                        s.steps.c.kind == "activity",
                    )
                )
                .limit(limit)
            ).all()
            taken = []
            for run_id, seq, redispatches in rows:
                wait = older_than * (2 ** min(int(redispatches), 6))
                moved = conn.execute(
                    update(s.steps)
                    .where(_step_is(run_id, seq, SCHEDULED), s.steps.c.dispatched_at < now - wait)
                    .values(dispatched_at=now, redispatches=s.steps.c.redispatches + 1)
                ).rowcount
                if moved:
                    taken.append((run_id, seq))
            if not taken:
                return []
            return [
                d
                for d in _dispatches(conn, s.steps.c.state == SCHEDULED, taken)
                if (d.run_id, d.seq) in set(taken)
            ]

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
        now = _now()
        cutoff = now - older_than
        has_outcome = (
            select(s.steps.c.run_id)
            .where(and_(s.steps.c.state == DONE, s.steps.c.completed_at < cutoff))
            .scalar_subquery()
        )
        with self._tx() as conn:
            rows = conn.execute(
                select(s.runs)
                .where(
                    and_(
                        s.runs.c.status.in_(ACTIVE),
                        or_(s.runs.c.woken_at.is_(None), s.runs.c.woken_at < cutoff),
                        or_(
                            and_(
                                s.runs.c.turn == 0,
                                s.runs.c.updated_at < cutoff,
                                # A run never driven is most often just queued behind a
                                # burst of starts. Waiting as long again as it has waited
                                # (up to 64 periods) before each new wake keeps a backlog
                                # from being flooded with copies of its own wakes.
                                or_(
                                    s.runs.c.woken_at - s.runs.c.created_at
                                    <= now - s.runs.c.woken_at,
                                    s.runs.c.woken_at < now - 64 * older_than,
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
            ).all()
            taken = []
            for row in rows:
                moved = conn.execute(
                    update(s.runs)
                    .where(
                        and_(
                            s.runs.c.id == row.id,
                            or_(s.runs.c.woken_at.is_(None), s.runs.c.woken_at < cutoff),
                        )
                    )
                    .values(woken_at=now, wake_pending=True)
                ).rowcount
                if moved:
                    taken.append(run_record(row))
            return taken

    def stuck_runs(self, limit: int = 1000) -> list[RunRecord]:
        """Runs parked as STUCK (retried when new code starts)."""
        with self._tx(readonly=True) as conn:
            rows = conn.execute(select(s.runs).where(s.runs.c.status == STUCK).limit(limit))
            return [run_record(r) for r in rows]

    def forget_workers(self, older_than: float) -> None:
        """Delete worker rows long gone and holding no claims."""
        cutoff = _now() - older_than
        claimed = select(s.steps.c.claimed_by).where(s.steps.c.state == CLAIMED)
        with self._tx() as conn:
            conn.execute(
                delete(s.workers).where(
                    and_(s.workers.c.last_seen < cutoff, s.workers.c.id.not_in(claimed))
                )
            )


def _step_is(run_id: str, seq: int | None, *states: str) -> ColumnElement[bool]:
    """The condition "step ``seq`` of run ``run_id``", in one of ``states`` if any given."""
    condition = and_(s.steps.c.run_id == run_id, s.steps.c.seq == seq)
    if states:
        condition = and_(condition, s.steps.c.state.in_(states))
    return condition


def _dispatches(
    conn: Connection, condition: Any, keys: Sequence[tuple[str, int]] | None = None
) -> list[Dispatch]:
    query = (
        select(
            s.steps.c.run_id,
            s.steps.c.seq,
            s.steps.c.name,
            s.steps.c.dispatch_id,
            s.steps.c.content_type,
            s.steps.c.input,
            s.runs.c.workflow,
            s.runs.c.options,
        )
        .join(s.runs, s.runs.c.id == s.steps.c.run_id)
        .where(condition)
        .order_by(s.steps.c.run_id, s.steps.c.seq)
    )
    if keys is not None:
        query = query.where(s.steps.c.run_id.in_(sorted({k[0] for k in keys})))
    return [
        Dispatch(
            run_id=r.run_id,
            seq=r.seq,
            name=r.name,
            dispatch_id=r.dispatch_id,
            content_type=r.content_type,
            input=r.input,
            workflow=r.workflow,
            driver_options=r.options or {},
        )
        for r in conn.execute(query)
    ]
