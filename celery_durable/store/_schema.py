"""The tables celery_durable keeps, as SQLAlchemy Core, with named indexes.

Times are stored as UNIX seconds (floats) so that SQLite and PostgreSQL compare them the
same way. They come from the database's clock (see ``_clock``), except the times of a
run's turns, which replay reads back as ``workflow.now()``: a run's ``started_at``,
``cancel_at`` and (when a turn ended it) ``finished_at``, a step's ``observed_at``.
Payloads are the serializer's bytes with their content type beside them.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    text,
)

__all__ = [
    "ADDED_COLUMNS",
    "DROPPED_INDEXES",
    "MAX_RUN_ID_LENGTH",
    "RENAMED_COLUMNS",
    "SCHEMA_VERSION",
    "meta",
    "metadata",
    "runs",
    "signals",
    "steps",
    "workers",
]

#: The longest run id the store keeps (the width of ``durable_runs.id``).
MAX_RUN_ID_LENGTH = 255

#: Bumped whenever the tables change; each bump comes with its upgrade step in
#: :mod:`celery_durable.store._migrations`.
SCHEMA_VERSION = 8

#: What each version added, as (table, column) pairs; upgrades add them in order.
#: (New tables need no entry: they are created whenever they are missing.)
ADDED_COLUMNS: dict[int, list[tuple[str, str]]] = {
    2: [
        ("durable_runs", "parent_id"),
        ("durable_runs", "parent_seq"),
        ("durable_runs", "attempt"),
        ("durable_runs", "seq_base"),
        ("durable_runs", "cancel_requested"),
        ("durable_runs", "cancel_turn"),
        ("durable_runs", "progress"),
        ("durable_steps", "child_id"),
    ],
    3: [("durable_runs", "cancel_at")],
    4: [("durable_runs", "incarnation"), ("durable_steps", "due_at")],
    5: [
        ("durable_steps", "renewed_at"),
        ("durable_steps", "losses"),
        ("durable_workers", "clean_stop"),
    ],
    6: [
        ("durable_workers", "machine"),
        ("durable_workers", "process_start"),
        ("durable_steps", "stall_from"),
    ],
    7: [("durable_runs", "driver_id")],
    8: [("durable_runs", "events"), ("durable_runs", "taken")],
}

#: Columns renamed by each version, as (table, old name, new name).
RENAMED_COLUMNS: dict[int, list[tuple[str, str, str]]] = {
    4: [("durable_runs", "woken_at", "wake_sent_at")],
}

#: Indexes each version dropped, as (table, index name); upgrades drop them if present.
DROPPED_INDEXES: dict[int, list[tuple[str, str]]] = {
    6: [
        ("durable_steps", "ix_durable_steps_state_dispatched"),
        ("durable_steps", "ix_durable_steps_state_due"),
    ],
}

metadata = MetaData()

meta = Table(
    "durable_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(255), nullable=False),
)

runs = Table(
    "durable_runs",
    metadata,
    Column("id", String(MAX_RUN_ID_LENGTH), primary_key=True),
    Column("workflow", String(255), nullable=False),
    # PENDING (never driven), RUNNING, SUCCESS, FAILURE, CANCELLED, TERMINATED, STUCK
    Column("status", String(16), nullable=False),
    # Number of committed driver turns; also the fencing version of the row.
    Column("turn", Integer, nullable=False, default=0),
    # Set when a wake message is in flight, so N finishing steps send one wake, not N.
    Column("wake_pending", Boolean, nullable=False, default=False),
    # When a wake was last sent (or flagged); the sweeper's backoff counts from it.
    Column("wake_sent_at", Float, nullable=True),
    Column("content_type", String(128), nullable=False),
    Column("input", LargeBinary, nullable=False),
    Column("result", LargeBinary, nullable=True),
    Column("error", JSON, nullable=True),
    # How driver messages are routed (queue, routing_key, priority...).
    Column("options", JSON, nullable=False, default=dict),
    Column("created_at", Float, nullable=False),
    Column("started_at", Float, nullable=True),
    Column("updated_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
    # -- schema version 2 --
    # A child run records its parent's step, which its outcome completes.
    Column("parent_id", String(255), nullable=True),
    Column("parent_seq", Integer, nullable=True),
    # 1 for the first attempt; retry() adds one (NULL in rows from version 1: 1).
    Column("attempt", Integer, nullable=True),
    # Steps of this incarnation are numbered from seq_base + 1 (continue-as-new).
    Column("seq_base", Integer, nullable=True),
    # -- schema version 4 --
    # Counts continue-as-new restarts (NULL in older rows: 0); with ``turn`` it names
    # one point of the run's life that never comes back.
    Column("incarnation", Integer, nullable=True),
    Column("cancel_requested", Boolean, nullable=True),
    # The turn that delivered the cancellation, and its time, for replay.
    Column("cancel_turn", Integer, nullable=True),
    Column("cancel_at", Float, nullable=True),  # schema version 3
    # workflow.set_status() values.
    Column("progress", JSON, nullable=True),
    # -- schema version 7 --
    # The process that committed the run's last turn and keeps its coroutine suspended
    # in memory (``driver._local``): where the next turn is cheapest. A hint only.
    Column("driver_id", String(255), nullable=True),
    # -- schema version 8 --
    # Events that want a turn (outcomes, fired timers, matched signals, cancel
    # requests), counted as they are written, and how many of them the last committed
    # turn saw (NULL: 0). A run is waiting for a turn while events > taken; the writer
    # that makes it so (events - 1 == taken) is the one that wakes it.
    Column("events", Integer, nullable=True),
    Column("taken", Integer, nullable=True),
    # Each periodic query of the sweeper reads one range of one index, so that it costs
    # what is due, not what the table holds (see ``_recovery``).
    # Runs never driven (status PENDING), stuck runs (STUCK).
    Index("ix_durable_runs_status_updated", "status", "updated_at"),
    Index("ix_durable_runs_workflow_created", "workflow", "created_at"),
    # Cancel requests not yet delivered (schema version 6).
    Index("ix_durable_runs_cancel", "cancel_requested", "status", "updated_at"),
    # -- schema version 6 --
    # Retention: top-level runs by their end, oldest first, and a run's children. Both
    # partial: each holds only the rows its query wants, so no planner takes one for the
    # other's query (a batch reads just the runs it takes, in order).
    Index(
        "ix_durable_runs_finished_roots",
        "finished_at",
        "id",
        postgresql_where=text("parent_id IS NULL"),
        sqlite_where=text("parent_id IS NULL"),
    ),
    Index(
        "ix_durable_runs_parent",
        "parent_id",
        postgresql_where=text("parent_id IS NOT NULL"),
        sqlite_where=text("parent_id IS NOT NULL"),
    ),
)

steps = Table(
    "durable_steps",
    metadata,
    Column("run_id", String(255), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("kind", String(32), nullable=False),
    Column("name", String(255), nullable=False),
    Column("created_turn", Integer, nullable=False),
    # SCHEDULED -> CLAIMED -> DONE (outcome recorded) -> DELIVERED (fed to the workflow)
    Column("state", String(16), nullable=False),
    # Celery task id of the message that may run this step; any other copy is dropped.
    Column("dispatch_id", String(64), nullable=False),
    # When the step's current message was sent (for a step without one: when created).
    Column("dispatched_at", Float, nullable=False),
    Column("redispatches", Integer, nullable=False, default=0),
    Column("claimed_by", String(255), nullable=True),
    Column("claimed_retries", Integer, nullable=True),
    Column("claimed_at", Float, nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("content_type", String(128), nullable=False),
    Column("input", LargeBinary, nullable=False),
    Column("outcome", String(8), nullable=True),  # "ok" | "error"
    Column("result", LargeBinary, nullable=True),
    Column("error", JSON, nullable=True),
    Column("completed_at", Float, nullable=True),
    Column("observed_turn", Integer, nullable=True),
    Column("observed_at", Float, nullable=True),
    # -- schema version 2 --
    # The run a "child" step started.
    Column("child_id", String(255), nullable=True),
    # -- schema version 4 --
    # When the step's next action is due (UNIX seconds): a timer fires, a task step lost
    # with its worker is sent again after its backoff. NULL: nothing is waiting.
    Column("due_at", Float, nullable=True),
    # -- schema version 5 --
    # A claim is a lease: its holder renews it while it holds the message; a claim not
    # renewed for durable_worker_timeout has expired.
    Column("renewed_at", Float, nullable=True),
    # How many times the step was lost with the worker running or holding it.
    Column("losses", Integer, nullable=True),
    # -- schema version 6 --
    # When the stall timeout of the step's current message starts counting: the time it
    # was sent, moved later by the backoff each time the sweeper sends a copy (so that
    # "stale" is one index range, and the backoff is applied before any LIMIT). NULL: no
    # message is out that could go stale (not a task step, not sent yet, or no longer
    # SCHEDULED: claiming, recording and cancelling clear it, which keeps its index as
    # small as the messages out and the planner's estimates right).
    Column("stall_from", Float, nullable=True),
    # Each periodic query of the sweeper reads one range of one index (see ``_recovery``):
    # stale messages (stall_from, of the steps that have one), due timers and backoffs
    # (SCHEDULED, kind, due_at), outcomes not delivered (DONE, completed_at) and, by a
    # prefix, expired claims (CLAIMED: as many as the steps in flight).
    Index(
        "ix_durable_steps_stall",
        "stall_from",
        postgresql_where=text("stall_from IS NOT NULL"),
        sqlite_where=text("stall_from IS NOT NULL"),
    ),
    Index("ix_durable_steps_state_kind_due", "state", "kind", "due_at"),
    Index("ix_durable_steps_state_completed", "state", "completed_at"),
    # Every turn reads its run's outcomes not yet delivered: this index holds just those
    # (a few rows per run at a time), so the read costs the same at step 10,000 as at
    # step 10; through the primary key it would visit every step of the run (version 8).
    Index(
        "ix_durable_steps_undelivered",
        "run_id",
        "seq",
        postgresql_where=text("state = 'DONE'"),
        sqlite_where=text("state = 'DONE'"),
    ),
)

signals = Table(
    "durable_signals",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", String(255), nullable=False),
    Column("name", String(255), nullable=False),
    Column("content_type", String(128), nullable=False),
    Column("payload", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    # The signal-wait step that received it; NULL while buffered.
    Column("consumed_seq", Integer, nullable=True),
    Index("ix_durable_signals_run_name", "run_id", "name", "consumed_seq"),
)

workers = Table(
    "durable_workers",
    metadata,
    Column("id", String(255), primary_key=True),
    Column("hostname", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
    Column("stopped_at", Float, nullable=True),
    # -- schema version 5 --
    # True when the worker shut down warm (its pool drained), not replaced after a crash.
    Column("clean_stop", Boolean, nullable=True),
    # -- schema version 6 --
    # The OS instance and pid namespace the worker runs in, and when its process started
    # (kernel clock ticks since boot): a worker restarted on the same machine tells from
    # them whether an older worker of its node name is gone, since names repeat.
    Column("machine", String(128), nullable=True),
    Column("process_start", String(32), nullable=True),
    Index("ix_durable_workers_hostname", "hostname"),
)
