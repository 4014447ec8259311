"""Starting runs and reading them: what clients, the CLI and Flower look at."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.sql import Select

from ..errors import WorkflowNotFoundError
from . import _schema as s
from ._base import StoreBase
from ._engine import safe_url
from ._records import (
    NewRun,
    RunRecord,
    SignalRecord,
    StepRecord,
    run_record,
    run_row,
    step_record,
)

__all__ = ["RunReads"]


class RunReads(StoreBase):
    """Creating a run, and every read of runs and their history."""

    def create_run(self, new: NewRun) -> bool:
        """Insert ``new`` unless a run with its id exists; True when it was created."""
        # One statement that skips an existing id, committing by itself (and durably):
        # no read first and no BEGIN/COMMIT round trips, which made up about a third of
        # the time to start a run on PostgreSQL.
        dialect_insert = pg_insert if self.dialect == "postgresql" else sqlite_insert
        statement = (
            dialect_insert(s.runs)
            .values(**run_row(new, self._now))
            .on_conflict_do_nothing(index_elements=[s.runs.c.id])
            .returning(s.runs.c.id)
        )
        with self._each_statement_commits() as conn:
            return conn.execute(statement).first() is not None

    def get_run(self, run_id: str) -> RunRecord | None:
        """The run with this id, or None."""
        with self._read() as conn:
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
        with self._read() as conn:
            return conn.execute(self._hot.status, {"b_run": run_id}).scalar_one_or_none()

    def poll_status(self, run_id: str) -> tuple[str, float] | None:
        """The status of a run and its age in seconds, by the database's clock (for a
        client waiting on it, whose own clock may be off)."""
        with self._read() as conn:
            row = conn.execute(self._hot.status_and_age, {"b_run": run_id}).first()
        return None if row is None else (str(row.status), max(0.0, float(row.age or 0.0)))

    def list_runs(
        self,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        *,
        offset: int = 0,
        search: str | None = None,
    ) -> list[RunRecord]:
        """Most recent runs first, optionally filtered; a page of ``limit`` from ``offset``.

        ``search`` keeps the runs whose id contains it (a child's id contains its parent's).
        """
        query = self._filtered(select(s.runs), status, workflow, search)
        query = query.order_by(s.runs.c.created_at.desc(), s.runs.c.id.desc())
        with self._read() as conn:
            return [run_record(r) for r in conn.execute(query.limit(limit).offset(offset))]

    def count_runs_by_status(
        self, workflow: str | None = None, search: str | None = None
    ) -> dict[str, int]:
        """How many runs have each status, with the same filters as :meth:`list_runs`."""
        query = self._filtered(
            select(s.runs.c.status, func.count()).group_by(s.runs.c.status),
            None,
            workflow,
            search,
        )
        with self._read() as conn:
            return {status: int(count) for status, count in conn.execute(query)}

    @staticmethod
    def _filtered(
        query: Select[Any], status: str | None, workflow: str | None, search: str | None
    ) -> Select[Any]:
        if status:
            query = query.where(s.runs.c.status == status)
        if workflow:
            query = query.where(s.runs.c.workflow == workflow)
        if search:
            # A literal substring: the LIKE wildcards in what was typed match themselves.
            escaped = search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            query = query.where(s.runs.c.id.like(f"%{escaped}%", escape="\\"))
        return query

    def history(self, run_id: str) -> list[StepRecord]:
        """Every step of a run, in order."""
        with self._read() as conn:
            rows = conn.execute(
                select(s.steps).where(s.steps.c.run_id == run_id).order_by(s.steps.c.seq)
            )
            return [step_record(r) for r in rows]

    def buffered_signals(self, run_id: str, limit: int = 100) -> list[SignalRecord]:
        """Signals sent to a run that no wait has taken yet, oldest first (``limit`` of them)."""
        sg = s.signals.c
        query = (
            select(sg.id, sg.run_id, sg.name, sg.content_type, sg.payload, sg.created_at)
            .where(sg.run_id == run_id, sg.consumed_seq.is_(None))
            .order_by(sg.id)
            .limit(limit)
        )
        with self._read() as conn:
            return [SignalRecord(*row) for row in conn.execute(query)]
