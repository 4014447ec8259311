"""A database clock that tests move by hand (see :class:`DbClock`)."""

from __future__ import annotations

import pytest
from sqlalchemy import Column, Float, MetaData, Table, create_engine, select, update

from celery_durable.store import _clock


class DbClock:
    """The database's clock, held still and moved by hand.

    Every store opened after it is made reads "now" from a one-row table of the same
    database instead of the server's clock, so a test can let exactly ten seconds pass.
    It is still the database's clock: nothing of the test process's own clock counts.
    """

    def __init__(self, url: str, monkeypatch: pytest.MonkeyPatch, now: float) -> None:
        self.now = now
        self._engine = create_engine(url)
        self._table = Table("durable_test_clock", MetaData(), Column("now", Float))
        self._table.create(self._engine, checkfirst=True)
        with self._engine.begin() as conn:
            conn.execute(self._table.delete())
            conn.execute(self._table.insert().values(now=now))
        read = select(self._table.c.now).scalar_subquery()
        monkeypatch.setattr(_clock, "db_now", lambda dialect: read)

    def advance(self, seconds: float) -> float:
        """Let ``seconds`` pass on the database's clock; returns the new time."""
        self.now += seconds
        with self._engine.begin() as conn:
            conn.execute(update(self._table).values(now=self.now))
        return self.now

    def close(self) -> None:
        self._engine.dispose()
