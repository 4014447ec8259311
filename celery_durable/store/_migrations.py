"""Creating the tables, and upgrading a store written by an older celery_durable.

Each schema version names what it added (:data:`~._schema.ADDED_COLUMNS`), renamed
(:data:`~._schema.RENAMED_COLUMNS`), dropped (:data:`~._schema.DROPPED_INDEXES`) and,
where old rows need it, how their data moves (:data:`DATA_STEPS`). An upgrade applies
them in order inside one transaction that holds the version row, so processes starting
together upgrade once.
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress

from sqlalchemy import Connection, Engine, insert, inspect, select, update
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from ..errors import DurableError
from . import _schema as s

__all__ = ["DATA_STEPS", "prepare"]

logger = logging.getLogger(__name__)

#: SQL run after a version's columns exist, to fill them from older rows.
DATA_STEPS: dict[int, list[str]] = {
    # Timers kept their deadline in dispatched_at before due_at existed.
    4: ["UPDATE durable_steps SET due_at = dispatched_at WHERE kind = 'timer'"],
    # Messages out before version 6 go stale counting from when they were sent (their
    # backoff starts over: at most one early copy each).
    6: [
        "UPDATE durable_steps SET stall_from = dispatched_at "
        "WHERE state = 'SCHEDULED' AND kind = 'activity' AND due_at IS NULL"
    ],
}


def prepare(engine: Engine, label: str) -> None:
    """Create missing tables, then check the schema version and upgrade to it.

    Raises:
        DurableError: the store was written by a newer celery_durable.
    """
    for attempt in range(5):
        try:
            s.metadata.create_all(engine, checkfirst=True)
            break
        except (IntegrityError, OperationalError, SQLAlchemyError) as exc:
            # Several processes creating the tables at once: one wins, the others see
            # "already exists" and simply look again.
            if attempt == 4 or "exist" not in str(exc).lower():
                raise
            time.sleep(0.05 * (attempt + 1))
    with engine.begin() as conn:
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
                f"the workflow store at {label} has schema version {row}, newer than this "
                f"celery_durable understands ({s.SCHEMA_VERSION}); upgrade celery_durable "
                "on this machine"
            )
        elif int(row) < s.SCHEMA_VERSION:
            _upgrade(conn)


def _upgrade(conn: Connection) -> None:
    """Bring the store to the current schema, in this transaction."""
    locked = select(s.meta.c.value).where(s.meta.c.key == "schema_version")
    if conn.dialect.name == "postgresql":
        locked = locked.with_for_update()
    version = int(conn.execute(locked).scalar_one())
    for target in range(version + 1, s.SCHEMA_VERSION + 1):
        existing = {
            table: {c["name"] for c in inspect(conn).get_columns(table)}
            for table in ("durable_runs", "durable_steps", "durable_workers")
        }
        for table, old, new in s.RENAMED_COLUMNS.get(target, []):
            if old in existing[table] and new not in existing[table]:
                conn.exec_driver_sql(f"ALTER TABLE {table} RENAME COLUMN {old} TO {new}")
                existing[table] = (existing[table] - {old}) | {new}
        for table, column in s.ADDED_COLUMNS.get(target, []):
            if column in existing[table]:
                continue
            col = s.metadata.tables[table].c[column]
            kind = col.type.compile(dialect=conn.dialect)
            conn.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        for statement in DATA_STEPS.get(target, []):
            conn.exec_driver_sql(statement)
        for _table, dropped in s.DROPPED_INDEXES.get(target, []):
            conn.exec_driver_sql(f"DROP INDEX IF EXISTS {dropped}")
        logger.warning("upgraded the workflow store to schema version %d", target)
    # Indexes of tables that already existed (create_all only makes them with a table).
    for model in s.metadata.sorted_tables:
        for index in model.indexes:
            index.create(conn, checkfirst=True)
    conn.execute(
        update(s.meta).where(s.meta.c.key == "schema_version").values(value=str(s.SCHEMA_VERSION))
    )
