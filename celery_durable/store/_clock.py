"""The one clock every time the store compares comes from: the database's.

Workers, drivers and clients run on hosts whose clocks disagree by seconds or minutes.
A time written from one host's clock and compared with another's makes a live worker
look dead (its steps run twice) or a timer due early, so the store never sends a host's
time for such a column: each statement reads the database's clock itself, as UNIX
seconds. The workflow's own clock (``workflow.now()``: a turn's recorded time) is the
one host time the store keeps, and it is never compared with these.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, Float, literal_column

__all__ = ["db_now"]

# PostgreSQL: statement_timestamp() is one value for the whole statement (like SQLite's
# 'now') and new for each statement of a transaction; now() would stay at the BEGIN of
# a transaction that waited on a lock.
_POSTGRES = "CAST(EXTRACT(EPOCH FROM statement_timestamp()) AS DOUBLE PRECISION)"
# SQLite (unixepoch('subsec') needs 3.42): 'now' is fixed for one statement, in ms. An
# SQLite store is one file on one host, so this clock is that host's kernel clock.
_SQLITE = "((julianday('now') - 2440587.5) * 86400.0)"


def db_now(dialect: str) -> ColumnElement[float]:
    """The database's "now" in UNIX seconds, as an SQL expression of ``dialect``."""
    return literal_column(_POSTGRES if dialect == "postgresql" else _SQLITE, Float())
