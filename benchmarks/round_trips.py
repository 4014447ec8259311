"""Counts the SQL round trips and broker messages of every process of a benchmark.

Not a script. :func:`install` hooks SQLAlchemy (every engine, through events on the
``Engine`` class) and kombu (``Producer.publish``) in the calling process; a
``celery worker`` of ``comparison_app`` installs it when ``BENCH_COUNT_DIR`` is set, and
every process (the worker's main process and each prefork child, which starts counting
from zero after the fork) writes its counts to ``<dir>/<pid>.json`` every
:data:`FLUSH_EVERY` seconds. The benchmark reads them before and after what it times
(:class:`Tally`) and divides the difference by the steps.

What is counted as one SQL round trip (PostgreSQL through psycopg 3, SQLAlchemy 2):

* ``statements``: each statement SQLAlchemy sends (``before_cursor_execute``). An
  ``executemany`` counts once (psycopg pipelines its rows; SQLAlchemy turns an INSERT of
  many rows into one statement anyway); ``executemany`` counts those calls apart.
* ``begin``: psycopg sends ``BEGIN`` as a round trip of its own before the first
  statement of a transaction (unless the connection is in autocommit). Counted when a
  statement is sent on a connection that is idle and not in autocommit, which is exactly
  psycopg's own test; a transaction that sent nothing sends no BEGIN.
* ``commit`` / ``rollback``: when SQLAlchemy ends a connection's transaction and the
  connection is inside one on the server (psycopg sends nothing otherwise, e.g. in
  autocommit or after a transaction that sent nothing).
* ``ping``: the store's check of a pooled connection left idle for a second.
* ``prepare``: psycopg prepares a statement the fifth time a connection runs it, in a
  round trip of its own; once per statement and connection, so ~0 per step.

Not counted: a new connection (counted apart, as ``connect``: several round trips, none
in a steady state) and the DEALLOCATE psycopg sends past 100 prepared statements of one
connection. On SQLite there is no network: there ``statements`` include the store's
``BEGIN IMMEDIATE``, and ``commit`` is the COMMIT of a transaction; "round trips" are
calls into the library.

Broker messages: every ``kombu.Producer.publish`` call, which is where Celery's task
messages (steps, wakes, plain tasks, chain links, a chord's callback) go, and anything
published with kombu directly; sorted by their headers into ``wake``
(``durable_wake``), ``step`` (``durable_run``), ``task`` (other task messages) and
``other`` (control replies and the like). The Redis result backend of Celery's side
writes with redis-py, not through the broker, and is not counted.

Each statement is also counted under its verb and first table (``sql:UPDATE
durable_steps``), which says which statements a step costs.

Counts are kept apart by thread: ``sweeper.*`` for celery_durable's sweeper thread
(heartbeats, lease renewals, timer polls: background work per second, not per step),
``work.*`` for every other thread (the consumer, which claims steps at receipt, and the
pool, which runs turns and steps and records outcomes).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["FLUSH_EVERY", "SQL_ROUND_TRIPS", "Tally", "install", "local_counts", "per_step"]

#: Seconds between two writes of a process's counts.
FLUSH_EVERY = 0.05
#: The counters that add up to SQL round trips.
SQL_ROUND_TRIPS = ("statements", "begin", "commit", "rollback", "ping", "prepare")
SWEEPER_THREAD = "celery-durable-sweeper"

_counts: Counter[str] = Counter()
_lock = threading.Lock()
_installed: list[str | None] = []


def _add(what: str, n: int = 1) -> None:
    bucket = "sweeper" if threading.current_thread().name == SWEEPER_THREAD else "work"
    with _lock:
        _counts[f"{bucket}.{what}"] += n


def local_counts() -> Counter[str]:
    """This process's counts so far."""
    with _lock:
        return Counter(_counts)


# -- SQL ------------------------------------------------------------------------------------


def _psycopg_state(raw: Any) -> tuple[bool, bool] | None:
    """``(autocommit, idle)`` of a psycopg connection; None for another driver."""
    if not type(raw).__module__.startswith("psycopg"):
        return None
    from psycopg.pq import TransactionStatus

    return bool(raw.autocommit), raw.info.transaction_status == TransactionStatus.IDLE


def _in_transaction(raw: Any) -> bool:
    state = _psycopg_state(raw)
    if state is not None:
        return not state[1]
    return bool(getattr(raw, "in_transaction", True))  # sqlite3


def _prepared_so_far(raw: Any) -> int:
    return int(getattr(getattr(raw, "_prepared", None), "_prepared_idx", 0))


_TABLE = re.compile(r"\b(?:FROM|INTO|UPDATE)\s+\"?(\w+)", re.IGNORECASE)


def _label(statement: str) -> str:
    """``UPDATE durable_steps``: a statement's verb and first table, to say which it is."""
    verb = statement.lstrip().split(None, 1)[0].upper() if statement.strip() else "?"
    table = _TABLE.search(statement)
    return f"{verb} {table.group(1)}" if table and verb != "BEGIN" else verb


def _before_execute(
    conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
) -> None:
    raw = cursor.connection
    state = _psycopg_state(raw)
    if state is not None and not state[0] and state[1]:
        _add("begin")
    _add("statements")
    _add(f"sql:{_label(statement)}")
    if executemany:
        _add("executemany")
    conn.info["bench_prepared"] = _prepared_so_far(raw)


def _after_execute(
    conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool
) -> None:
    prepared = _prepared_so_far(cursor.connection) - conn.info.pop("bench_prepared", 0)
    if prepared > 0:
        _add("prepare", prepared)


def _ends(what: str) -> Any:
    def listener(conn: Any) -> None:
        if _in_transaction(conn.connection.dbapi_connection):
            _add(what)

    return listener


def _install_sql() -> None:
    from sqlalchemy import event
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool

    event.listen(Engine, "before_cursor_execute", _before_execute)
    event.listen(Engine, "after_cursor_execute", _after_execute)
    event.listen(Engine, "commit", _ends("commit"))
    event.listen(Engine, "rollback", _ends("rollback"))
    event.listen(Pool, "connect", lambda *_: _add("connect"))
    ping = PGDialect_psycopg.do_ping

    def do_ping(self: Any, dbapi_connection: Any) -> bool:
        _add("ping")
        return bool(ping(self, dbapi_connection))

    PGDialect_psycopg.do_ping = do_ping  # type: ignore[method-assign]


# -- the broker -----------------------------------------------------------------------------


def _kind(headers: Any) -> str:
    headers = headers or {}
    if headers.get("durable_wake"):
        return "wake"
    if "durable_run" in headers:
        return "step"
    return "task" if "task" in headers else "other"


def _install_broker() -> None:
    from kombu import Producer

    publish = Producer.publish

    def counted(self: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        _add(f"messages.{_kind(kwargs.get('headers'))}")
        return publish(self, body, *args, **kwargs)

    Producer.publish = counted  # type: ignore[method-assign]


# -- the files ------------------------------------------------------------------------------


def _flush_forever(directory: Path) -> None:
    path = directory / f"{os.getpid()}.json"
    scratch = directory / f".{os.getpid()}.tmp"
    written: Counter[str] | None = None
    while True:
        now = local_counts()
        if now != written:
            scratch.write_text(json.dumps(now))
            os.replace(scratch, path)
            written = now
        time.sleep(FLUSH_EVERY)


def _start_flushing(directory: Path) -> None:
    threading.Thread(
        target=_flush_forever, args=(directory,), name="bench-round-trips", daemon=True
    ).start()


def _after_fork(directory: Path) -> None:
    global _lock
    _lock = threading.Lock()  # the parent's may have been held by a thread that is gone
    _counts.clear()  # a prefork child counts what it does itself
    _start_flushing(directory)


def install(directory: str | None = None) -> None:
    """Count in this process from now on (once; later calls do nothing).

    With ``directory``, this process and every process forked from it write their
    counts there (``<pid>.json``); without, read them with :func:`local_counts`.
    """
    if _installed:
        return
    _installed.append(directory)
    _install_sql()
    _install_broker()
    if directory is not None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        _start_flushing(path)
        os.register_at_fork(after_in_child=lambda: _after_fork(path))


class Tally:
    """The counts of the worker processes writing to ``directory``, and of this one."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def workers(self) -> Counter[str]:
        """The sum of what every worker process wrote so far."""
        total: Counter[str] = Counter()
        for path in self.directory.glob("*.json"):
            try:
                total.update(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a process's first write in progress: it has counted nothing yet
        return total

    def settled(self) -> tuple[Counter[str], Counter[str]]:
        """``(workers, this process)`` once the workers' last counts are written."""
        time.sleep(3 * FLUSH_EVERY)
        return self.workers(), local_counts()


def per_step(counts: Counter[str], steps: int, bucket: str = "work") -> dict[str, float]:
    """Counts of ``bucket`` divided by ``steps``, with ``sql`` (round trips) and
    ``messages`` (all kinds) added up."""
    prefix = f"{bucket}."
    mine = {k[len(prefix) :]: v / steps for k, v in counts.items() if k.startswith(prefix)}
    mine["sql"] = sum(mine.get(k, 0.0) for k in SQL_ROUND_TRIPS)
    mine["messages"] = sum(v for k, v in mine.items() if k.startswith("messages."))
    return mine
