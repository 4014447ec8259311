"""Engines for the store: SQLite set up for many writers, PostgreSQL pinged when idle,
and both made safe across the prefork pool's fork.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError

from ..errors import StoreUnavailableError

__all__ = ["fork_gate", "live_stores", "make_engine", "safe_url"]

_engines: weakref.WeakSet[Engine] = weakref.WeakSet()
#: Stores of this process (anything with a ``_ready_lock``), reset after a fork.
live_stores: weakref.WeakSet[Any] = weakref.WeakSet()


class _ForkGate:
    """Makes a fork wait until no SQLite transaction of this process is in flight.

    SQLite keeps a process's file locks in process-wide structures. A child forked while
    another thread (the sweeper) is inside a transaction inherits a copy saying that a
    connection it does not have holds the lock, and every write of the child then fails
    with "database is locked" (seen with the prefork pool forking while the sweeper ran).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0

    @contextmanager
    def held(self) -> Iterator[None]:
        with self._cond:
            self._active += 1
        try:
            yield
        finally:
            with self._cond:
                self._active -= 1
                if not self._active:
                    self._cond.notify_all()

    def before_fork(self) -> None:
        # Keep the lock through the fork so that no transaction starts meanwhile; a
        # transaction that does not end in time (the forking thread's own) is not waited for.
        self._cond.acquire()
        self._cond.wait_for(lambda: not self._active, timeout=10)

    def after_fork_in_parent(self) -> None:
        self._cond.release()

    def after_fork_in_child(self) -> None:
        self._cond = threading.Condition()
        self._active = 0


fork_gate = _ForkGate()


def _dispose_after_fork() -> None:
    # A forked child (prefork pool) must not share its parent's sockets or SQLite handles;
    # close=False leaves the parent's connections alone and gives the child a fresh pool.
    for engine in list(_engines):
        engine.dispose(close=False)
    # The parent's sweeper thread may have held a store's lock at the moment of the fork;
    # that thread does not exist in the child, so the child's copy would stay locked.
    for store in list(live_stores):
        store._ready_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=fork_gate.before_fork,
        after_in_parent=fork_gate.after_fork_in_parent,
        after_in_child=fork_gate.after_fork_in_child,
    )
    os.register_at_fork(after_in_child=_dispose_after_fork)


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            directory = os.path.dirname(os.path.abspath(database))
            try:
                os.makedirs(directory, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailableError(
                    f"cannot create the directory {directory!r} of the SQLite workflow store "
                    f"{safe_url(url)}: {exc}. Check app.conf.durable_database_url."
                ) from exc
        engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
            # Hand transaction control to the "begin" hook below (pysqlite's own is lazy).
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn: Connection) -> None:
            # Writers take the lock up front: a deferred transaction that upgrades to a
            # write fails with SQLITE_BUSY at once instead of waiting its turn.
            if conn.get_execution_options().get("durable_readonly"):
                conn.exec_driver_sql("BEGIN")
            else:
                conn.exec_driver_sql("BEGIN IMMEDIATE")

    else:
        engine = create_engine(url, pool_size=5, max_overflow=20)
        _ping_when_idle(engine)
    _engines.add(engine)
    return engine


#: Seconds a pooled connection may sit unused before it is pinged at its next checkout.
PING_AFTER_IDLE = 1.0


def _ping_when_idle(engine: Engine) -> None:
    """Check a pooled connection with a round trip only if it has been idle for a while.

    ``pool_pre_ping`` pings at every checkout, one extra round trip per transaction on
    the hot path. A connection that served a transaction a moment ago is alive; the ones
    that die quietly (a server restart, an idle timeout) are the ones left unused.
    """

    @event.listens_for(engine, "checkin")
    def _checkin(dbapi_connection: Any, record: Any) -> None:
        record.info["durable_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        idle_since = record.info.get("durable_idle_since")
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE:
            return
        try:
            engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool discards this connection and checks out a fresh one.
            raise DisconnectionError(f"stale pooled connection: {exc}") from exc


def safe_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)
