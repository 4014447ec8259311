"""What every part of the store stands on: the engine, its three kinds of connection,
and the few conditions and reads that several operations share.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from sqlalchemy import ColumnElement, Connection, Row, and_, func, select, true
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.sql import Executable

from ..errors import StoreUnavailableError
from . import _clock, _migrations
from . import _schema as s
from ._engine import fork_gate, live_stores, make_engine, safe_url
from ._records import Dispatch
from ._statements import HotStatements, woke

__all__ = ["RunWake", "StoreBase", "is_unreachable", "load_dispatches", "step_is"]

#: A run to wake: (run id, workflow name, driver routing options).
RunWake = tuple[str, str, Mapping[str, Any]]


class StoreBase:
    """The engine and connections of a store; the operations are in the mixins of
    :class:`~celery_durable.store.Store`.

    Three kinds of connection, each named for what its caller may rely on:

    * :meth:`_transaction`: one atomic write transaction (``BEGIN IMMEDIATE`` on SQLite).
    * :meth:`_read`: a single read query; PostgreSQL runs it without BEGIN/COMMIT.
    * :meth:`_each_statement_commits`: on PostgreSQL each statement commits by itself
      (one round trip each); SQLite, which serialises writers anyway, runs them in one
      transaction. Callers say why their order of commits is safe.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self.dialect = self.engine.dialect.name
        self._ready = False
        self._ready_lock = threading.Lock()
        #: The database's clock, read inside each statement that writes or compares a
        #: time (never this host's: see ``_clock``).
        self._now = _clock.db_now(self.dialect)
        self._hot = HotStatements(self._no_disk_wait(), self._now)
        #: The one-statement turn commits, by shape, built on first use (``_turns``).
        self._plain_turns: dict[Any, Any] = {}
        live_stores.add(self)

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        self.ensure_schema()
        with self._fork_gate(), self._lost_connections():
            conn = self._connect()
            with conn, conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        if self.dialect == "postgresql":
            # One SELECT sees one snapshot without a BEGIN and COMMIT around it.
            with self._each_statement_commits() as conn:
                yield conn
            return
        self.ensure_schema()
        with self._fork_gate():
            conn = self._connect()
            with conn:
                # A deferred transaction: readers do not queue behind SQLite's writer lock.
                conn = conn.execution_options(durable_readonly=True)
                with conn.begin():
                    yield conn

    @contextmanager
    def _each_statement_commits(self) -> Iterator[Connection]:
        if self.dialect != "postgresql":
            with self._transaction() as conn:
                yield conn
            return
        self.ensure_schema()
        with self._lost_connections(), self._connect() as conn:
            yield conn.execution_options(isolation_level="AUTOCOMMIT")

    def _each_statement(self, statement: Executable, values: dict[str, Any]) -> Row[Any] | None:
        """Run one statement that commits by itself; its first row."""
        with self._each_statement_commits() as conn:
            return conn.execute(statement, values).first()

    @contextmanager
    def _lost_connections(self) -> Iterator[None]:
        """Report a database server that went away mid-statement (a restart, a failover,
        a cut connection) as :class:`StoreUnavailableError`, like one that cannot be
        reached at all; SQLite's own errors (a locked file) are left as they are."""
        try:
            yield
        except (OperationalError, InterfaceError) as exc:
            if not _lost_connection(exc, self.dialect):
                raise
            raise self._unavailable(exc) from exc

    def _no_disk_wait(self) -> ColumnElement[bool]:
        """A condition that is always true and lets its statement commit without waiting
        for the disk (PostgreSQL; on SQLite it is just true).

        For single statements on an :meth:`_each_statement_commits` connection whose
        loss in a database crash the sweeper repairs. ``SET LOCAL synchronous_commit``
        would need a transaction of three round trips; this makes the setting inside the
        statement. A row is written only once every condition held, this one included,
        so no write of the statement waits for the disk.
        """
        if self.dialect != "postgresql":
            return true()
        return func.set_config("synchronous_commit", "off", True) == "off"

    def _connect(self) -> Connection:
        try:
            return self.engine.connect()
        except OperationalError as exc:
            raise self._unavailable(exc) from exc

    def _unavailable(self, exc: DBAPIError) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"cannot reach the workflow store at {safe_url(self.url)}: {exc.orig}. "
            "Check app.conf.durable_database_url and that the database server is running."
        )

    def _fork_gate(self) -> AbstractContextManager[None]:
        # Only SQLite needs it: psycopg connections already ignore a fork.
        return fork_gate.held() if self.dialect == "sqlite" else nullcontext()

    def ensure_schema(self) -> None:
        """Create the tables if they are missing, or upgrade them, once per process."""
        if self._ready:
            return
        with self._ready_lock:
            if self._ready:
                return
            try:
                with self._fork_gate():
                    _migrations.prepare(self.engine, safe_url(self.url))
            except OperationalError as exc:
                raise self._unavailable(exc) from exc
            self._ready = True

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def _lock_run(self, conn: Connection, run_id: str) -> None:
        """Lock the run's row for the rest of the transaction (the lock order: the run
        first, then its steps)."""
        conn.execute(
            select(s.runs.c.id).where(s.runs.c.id == run_id).with_for_update(key_share=True)
        )

    def _lock_parent_of(self, conn: Connection, run_id: str) -> None:
        """Lock the row of the run's parent (if it has one) before the run's own row.

        Between runs the lock order is parent before child: a parent's turn that cancels
        a child holds the parent's row when it takes the child's, so a child's last
        commit (which completes the parent's step and flags its wake) and a termination
        take the parent's row first too. Otherwise each could hold one row and wait for
        the other's. SQLite has one writer at a time and no row locks to order.
        """
        if self.dialect != "postgresql":
            return
        # parent_id is written once, when the run is created: reading it unlocked is safe.
        parent = select(s.runs.c.parent_id).where(s.runs.c.id == run_id).scalar_subquery()
        conn.execute(
            select(s.runs.c.id).where(s.runs.c.id == parent).with_for_update(key_share=True)
        )

    def _flag_wake(self, conn: Connection, run_id: str, locked: bool = False) -> RunWake | None:
        """Count an event of the run in this transaction; returns what to publish if
        this event is the one that wakes it (see ``wake_flag_update``).

        ``locked``: this transaction already holds the run's row (it updated it).
        """
        # Lock order: the run's row before its steps' (the caller may go on to them).
        if not locked:
            self._lock_run(conn, run_id)
        row = conn.execute(self._hot.flag_wake, {"b_run": run_id}).first()
        if row is None or not woke(row):
            return None
        return (run_id, row.workflow, row.options or {})


def _lost_connection(exc: DBAPIError, dialect: str) -> bool:
    """Whether ``exc`` says the connection to the server is gone (not, say, a deadlock
    or a lock timeout, which the server reported over a live connection)."""
    if exc.connection_invalidated:
        return True
    if dialect == "sqlite":
        return False
    # PostgreSQL: no SQLSTATE (the socket closed), class 08 (connection exception), or
    # 57P01-57P03 (the server is shutting down or not accepting connections).
    state = getattr(exc.orig, "sqlstate", None)
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def is_unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` means the database could not be reached or the connection broke
    (worth retrying), rather than that it refused the statement."""
    if isinstance(exc, (StoreUnavailableError, OperationalError, InterfaceError)):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def step_is(run_id: str, seq: int | None, *states: str) -> ColumnElement[bool]:
    """The condition "step ``seq`` of run ``run_id``", in one of ``states`` if any given."""
    condition = and_(s.steps.c.run_id == run_id, s.steps.c.seq == seq)
    if states:
        condition = and_(condition, s.steps.c.state.in_(states))
    return condition


def load_dispatches(
    conn: Connection, condition: Any, keys: Sequence[tuple[str, int]] | None = None
) -> list[Dispatch]:
    """What is needed to publish each step matching ``condition`` (of these runs' keys)."""
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
