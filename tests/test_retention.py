"""Retention on its own (no Celery): finished runs, their families and history, consumed
signals and gone workers are deleted in batches, on SQLite and on PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import test_store as base
from dbclock import DbClock as Clock
from sqlalchemy import Table, func, insert, select
from test_store import (
    JSON,
    commit,
    create,
    end_parent,
    family,
    finish_child,
    ok,
    race,
    start,
    start_children,
)

from celery_durable.store import (
    CANCELLED,
    FAILURE,
    STUCK,
    SUCCESS,
    TERMINATED,
    NewStep,
    Purged,
    Store,
    TurnWrite,
    WorkerInfo,
    _schema,
)

# The store's fixtures: the store on each database, and its clock.
url, open_store, store, clock = base.url, base.open_store, base.store, base.clock

DAY = 86400.0


def db_now(store: Store) -> float:
    """The database's clock, as the store reads it."""
    with store.engine.connect() as conn:
        return float(conn.execute(select(store._now)).scalar_one())


def count(store: Store, table: Table, **where: object) -> int:
    query = select(func.count()).select_from(table)
    for column, value in where.items():
        query = query.where(table.c[column] == value)
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def finished(store: Store, run_id: str, status: str = SUCCESS) -> None:
    """A run with two steps (one delivered) and a signal, ended with ``status``."""
    start(store, "charge", "ship", run_id=run_id)
    store.send_signal(run_id, "note", JSON, b"1")
    if status == TERMINATED:
        store.terminate(run_id, {"type": "WorkflowTerminatedError"})
        return
    store.record_outcome(run_id, 1, result=ok())
    write = TurnWrite(
        turn=1,
        at=db_now(store),
        delivered=[1],
        cancelled=[2],
        status=status,
        result=ok() if status == SUCCESS else None,
        error=None if status == SUCCESS else {"type": "E"},
    )
    assert store.commit_turn(run_id, write) is not None


def purge_all(store: Store, older_than: float = DAY, limit: int = 200) -> Purged:
    """Batches until one reaches the end; what they deleted together."""
    runs = steps = signals = 0
    mark = None
    while True:
        batch = store.purge_finished(older_than, limit, after=mark)
        runs, steps, signals = runs + batch.runs, steps + batch.steps, signals + batch.signals
        mark = batch.resume_after
        if mark is None:
            return Purged(runs, steps, signals)


def runs_left(store: Store) -> list[str]:
    with store.engine.connect() as conn:
        return sorted(conn.execute(select(_schema.runs.c.id)).scalars())


@pytest.mark.parametrize("status", [SUCCESS, FAILURE, CANCELLED, TERMINATED])
def test_a_finished_run_goes_with_its_steps_and_signals_once_expired(
    store: Store, clock: Clock, status: str
) -> None:
    finished(store, "done", status)
    finished(store, "other")  # finishes later
    clock.advance(DAY - 1)
    assert purge_all(store) == Purged()
    clock.advance(2)
    assert store.purge_finished(DAY) == Purged(runs=2, steps=4, signals=2)
    assert runs_left(store) == []
    assert count(store, _schema.steps) == count(store, _schema.signals) == 0


def test_the_oldest_runs_go_first(store: Store, clock: Clock) -> None:
    finished(store, "old")
    clock.advance(100)
    finished(store, "new")
    clock.advance(DAY - 50)  # "old" is past a day, "new" is not
    assert store.purge_finished(DAY).runs == 1
    assert runs_left(store) == ["new"]


def test_stuck_and_active_runs_are_kept(store: Store, clock: Clock) -> None:
    create(store, "pending")
    start(store, "charge", run_id="running")
    start(store, "charge", run_id="stuck")
    assert store.park("stuck", 1, STUCK, {"type": "NonDeterminismError"})
    clock.advance(30 * DAY)
    assert purge_all(store, older_than=0) == Purged()
    assert store.count_expired(0) == Purged()
    assert runs_left(store) == ["pending", "running", "stuck"]


def test_a_child_that_finished_early_is_kept_while_its_parent_runs(
    store: Store, clock: Clock
) -> None:
    [kid] = family(store)
    assert finish_child(store, kid) is not None
    clock.advance(2 * DAY)
    assert purge_all(store) == Purged()  # only top-level runs are picked, with families
    assert store.require_run(kid).status == SUCCESS

    assert end_parent(store, [1], SUCCESS) is not None
    assert purge_all(store) == Purged()  # the parent has only just finished
    clock.advance(DAY + 1)
    assert store.count_expired(DAY).runs == 2
    assert purge_all(store).runs == 2
    assert runs_left(store) == []


def test_a_family_stays_while_any_descendant_runs_or_finished_recently(
    store: Store, clock: Clock
) -> None:
    kid, stuck = family(store, children=2)
    [grandchild] = start_children(store, kid, 1, 1)
    assert store.park(stuck, 1, STUCK, {"type": "NonDeterminismError"})
    # The parent returns: its children are asked to cancel, and go on meanwhile.
    assert end_parent(store, [1, 2], SUCCESS) is not None
    clock.advance(2 * DAY)
    assert store.count_expired(DAY) == Purged()
    assert purge_all(store) == Purged()

    assert store.terminate(kid, {"type": "WorkflowTerminatedError"}).runs == [kid, grandchild]
    assert purge_all(store) == Purged()  # they have only just ended
    clock.advance(2 * DAY)
    assert purge_all(store) == Purged()  # and one child is STUCK, some day retried
    assert store.terminate(stuck, {"type": "WorkflowTerminatedError"}).runs == [stuck]
    clock.advance(2 * DAY)
    assert purge_all(store).runs == 4
    assert runs_left(store) == []


def test_a_batch_takes_at_most_its_limit_and_repeated_batches_take_all(
    store: Store, clock: Clock
) -> None:
    for i in range(25):
        finished(store, f"run-{i:02}")
    clock.advance(2 * DAY)
    first = store.purge_finished(DAY, limit=10)
    assert (first.runs, first.steps) == (10, 20)
    assert first.resume_after is not None
    assert runs_left(store) == [f"run-{i:02}" for i in range(10, 25)]
    second = store.purge_finished(DAY, limit=10, after=first.resume_after)
    third = store.purge_finished(DAY, limit=10, after=second.resume_after)
    assert (second.runs, third.runs, third.resume_after) == (10, 5, None)
    assert runs_left(store) == []


def test_families_kept_for_now_do_not_fill_every_batch(store: Store, clock: Clock) -> None:
    """The oldest top-level runs have a child still running; the batches go on past them
    with their marks, and come back to them from the start."""
    family(store, children=1)
    assert end_parent(store, [1], SUCCESS) is not None
    clock.advance(1)
    for i in range(4):
        finished(store, f"run-{i}")
    clock.advance(2 * DAY)
    first = store.purge_finished(DAY, limit=2)
    assert (first.runs, first.resume_after) == (1, (db_now(store) - 2 * DAY, "run-0"))
    assert purge_all(store, limit=2).runs == 3  # from the mark on, then from the start
    assert runs_left(store) == ["p", "p/1"]


def test_continue_as_new_deletes_the_signals_its_old_waits_consumed(store: Store) -> None:
    create(store, "loop")
    assert store.begin_turn("loop") is not None
    wait = NewStep(1, "signal", "go", JSON, b"null", "wait-1")
    assert commit(store, "loop", 0, [], [wait], db_now(store))
    assert store.send_signal("loop", "go", JSON, b"1") is not None  # the wait takes it
    store.send_signal("loop", "later", JSON, b"2")  # buffered for whoever waits next
    write = TurnWrite(turn=1, at=db_now(store), delivered=[1], restart=(JSON, b'[["again"], {}]'))
    assert store.commit_turn("loop", write) is not None
    with store.engine.connect() as conn:
        names = conn.execute(select(_schema.signals.c.name)).scalars().all()
    assert names == ["later"]


def orphan_signal(store: Store, run_id: str, seq: int | None) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            insert(_schema.signals).values(
                run_id=run_id,
                name="go",
                content_type=JSON,
                payload=b"1",
                created_at=1.0,
                consumed_seq=seq,
            )
        )


def test_consumed_signals_left_by_older_versions_are_deleted_window_by_window(
    store: Store,
) -> None:
    start(store, "charge", run_id="run-1")
    orphan_signal(store, "run-1", 7)  # consumed by a step continue-as-new deleted
    orphan_signal(store, "run-1", 1)  # consumed by a step that still exists: kept
    orphan_signal(store, "run-1", None)  # buffered: kept
    orphan_signal(store, "run-1", 8)
    assert store.purge_orphan_signals(0, window=2) == (1, 2)
    assert store.purge_orphan_signals(2, window=2) == (1, 0)  # the newest: start again
    assert store.purge_orphan_signals(0, window=2) == (0, 2)
    with store.engine.connect() as conn:
        left = conn.execute(select(_schema.signals.c.consumed_seq)).scalars().all()
    assert sorted(left, key=str) == [1, None]


def test_rows_of_gone_workers_are_forgotten_once_they_hold_no_claim(
    store: Store, clock: Clock
) -> None:
    start(store, "charge", run_id="run-1")
    store.heartbeat(WorkerInfo("gone", "a@host", 1))
    store.heartbeat(WorkerInfo("holder", "b@host", 2))
    assert store.claim_step("run-1", 1, "dispatch-1", "holder", 0)
    store.heartbeat(WorkerInfo("stopped", "c@host", 3))
    store.worker_stopped("stopped")
    clock.advance(DAY + 1)
    store.heartbeat(WorkerInfo("alive", "d@host", 4))
    assert store.forget_workers(DAY, limit=1) == 1  # a batch is bounded
    assert store.forget_workers(DAY) == 1
    assert store.forget_workers(DAY) == 0
    with store.engine.connect() as conn:
        ids = sorted(conn.execute(select(_schema.workers.c.id)).scalars())
    assert ids == ["alive", "holder"]  # "holder" names the claim on step 1


def test_two_sweepers_purging_at_once_never_wait_or_delete_twice(
    open_store: Callable[[], Store], clock: Clock
) -> None:
    first, second = open_store(), open_store()
    for i in range(120):
        finished(first, f"run-{i:03}")
    clock.advance(2 * DAY)
    totals = race(lambda: purge_all(first, limit=7), lambda: purge_all(second, limit=7))
    for total in totals:
        assert isinstance(total, Purged), total
    assert sum(t.runs for t in totals) == 120
    assert sum(t.steps for t in totals) == 240
    assert runs_left(first) == []


def test_a_purge_skips_families_another_transaction_holds(url: str, clock: Clock) -> None:
    """A sweeper never waits for a run's row (PostgreSQL; SQLite has one writer)."""
    if not url.startswith("postgresql"):
        pytest.skip("row locks are PostgreSQL's; SQLite has one writer at a time")
    sweeper = Store(url)
    try:
        finished(sweeper, "held")
        finished(sweeper, "free")
        family(sweeper)
        assert finish_child(sweeper, "p/1") is not None
        assert end_parent(sweeper, [1], SUCCESS) is not None
        clock.advance(2 * DAY)
        runs = _schema.runs
        with sweeper.engine.begin() as conn:
            conn.execute(select(runs.c.id).where(runs.c.id == "held").with_for_update())
            conn.execute(select(runs.c.id).where(runs.c.id == "p/1").with_for_update())
            assert sweeper.purge_finished(DAY).runs == 1
            assert runs_left(sweeper) == ["held", "p", "p/1"]
        assert sweeper.purge_finished(DAY).runs == 3
    finally:
        sweeper.dispose()
