"""The store layer: every durable fact about runs and steps, in SQL.

Imports SQLAlchemy and ``celery_durable.errors``, never Celery or kombu (a test holds
the rule), so it can be read, tested and changed without a worker. Its parts, by job:

* ``_schema`` — the tables (SQLAlchemy Core) and what each schema version added;
  ``_migrations`` — creating them and upgrading older stores in place.
* ``_engine`` — engines (SQLite for many writers, PostgreSQL pinged when idle) and
  their safety across the prefork pool's fork.
* ``_records`` — the frozen records and statuses that cross the layer's boundary.
* ``_base`` — connections and shared conditions; ``_statements`` — the prebuilt
  statements of the hot path.
* ``_runs`` (create and read), ``_turns`` (driver turns), ``_steps`` (claims and
  outcomes), ``_control`` (signals, cancel, terminate, park, resume), ``_recovery``
  (heartbeats, lost messages, lost wakes, stuck runs, timers), ``_retention``
  (deleting expired runs, consumed signals and gone workers, in batches), ``_census``
  (counts for monitoring: runs by workflow and status, steps in flight).

:class:`Store` puts the parts together behind one object, one per database URL per
process.
"""

from __future__ import annotations

from ._base import is_unreachable
from ._census import Census, RunCensus, RunCount
from ._control import RunControl
from ._engine import safe_url
from ._records import (
    ACTIVE,
    CANCELLED,
    CLAIMED,
    DELIVERED,
    DONE,
    FAILURE,
    FINISHED,
    NOT_FINISHED,
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
    ErrorInfo,
    LossPolicy,
    NewRun,
    NewStep,
    Recorded,
    RunRecord,
    SignalRecord,
    StepRecord,
    Termination,
    TurnCommitted,
    TurnStart,
    TurnWrite,
    WorkerInfo,
)
from ._recovery import Recovery
from ._retention import Purged, PurgeMark, Retention
from ._runs import RunReads
from ._schema import MAX_RUN_ID_LENGTH

__all__ = [
    "ACTIVE",
    "CANCELLED",
    "CLAIMED",
    "DELIVERED",
    "DONE",
    "FAILURE",
    "FINISHED",
    "MAX_RUN_ID_LENGTH",
    "NOT_FINISHED",
    "OPEN_STEP_STATES",
    "PENDING",
    "RUNNING",
    "SCHEDULED",
    "STEP_CANCELLED",
    "STUCK",
    "SUCCESS",
    "TERMINATED",
    "CancelledStep",
    "Census",
    "Dispatch",
    "ErrorInfo",
    "LossPolicy",
    "NewRun",
    "NewStep",
    "PurgeMark",
    "Purged",
    "Recorded",
    "RunCount",
    "RunRecord",
    "SignalRecord",
    "StepRecord",
    "Store",
    "Termination",
    "TurnCommitted",
    "TurnStart",
    "TurnWrite",
    "WorkerInfo",
    "is_unreachable",
    "safe_url",
]


class Store(RunReads, RunControl, Recovery, Retention, RunCensus):
    """Runs and steps in SQL. Thread-safe; one per database URL per process is enough.

    Each method is one short transaction (or one statement); the methods that move a
    run forward are fenced on the run's incarnation and turn. SQLite (WAL, ``BEGIN IMMEDIATE``) and
    PostgreSQL (psycopg 3) are supported.

    Args:
        url: an SQLAlchemy URL, e.g. ``sqlite:///celery_durable.sqlite3`` or
            ``postgresql+psycopg://127.0.0.1/app``.
    """
