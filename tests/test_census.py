"""``Store.census``: the counts behind Flower's ``/metrics``, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import insert, text, update

from celery_durable.store import NewRun, Store
from celery_durable.store import _schema as s

JSON = "application/json"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/durable.sqlite3"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    opened = Store(url)
    yield opened
    opened.dispose()


def _run(store: Store, run_id: str, workflow: str, status: str, **values: Any) -> None:
    assert store.create_run(NewRun(run_id, workflow, JSON, b"[[], {}]", {}))
    with store.engine.begin() as conn:
        conn.execute(update(s.runs).where(s.runs.c.id == run_id).values(status=status, **values))


def _step(store: Store, run_id: str, seq: int, kind: str, state: str, **values: Any) -> None:
    row = {
        "run_id": run_id,
        "seq": seq,
        "kind": kind,
        "name": f"{kind}-{seq}",
        "created_turn": 1,
        "state": state,
        "dispatch_id": f"{run_id}-{seq}",
        "dispatched_at": 1.0,
        "redispatches": 0,
        "attempts": 0,
        "content_type": JSON,
        "input": b"[]",
        "losses": 0,
        **values,
    }
    with store.engine.begin() as conn:
        conn.execute(insert(s.steps).values(**row))


def test_an_empty_store_counts_nothing(store: Store) -> None:
    census = store.census()
    assert census.runs == [] and census.open_steps == {}
    assert (census.outcomes_waiting, census.oldest_outcome_age) == (0, 0.0)
    assert census.most_overdue_timer == 0.0


def test_runs_by_workflow_and_status_with_their_last_finish(store: Store) -> None:
    for i in range(3):
        _run(store, f"ok-{i}", "shop.checkout", "SUCCESS", finished_at=1_700_000_000.0 + i)
    _run(store, "bad", "shop.checkout", "FAILURE", finished_at=1_700_000_100.0)
    _run(store, "waiting", "shop.refund", "RUNNING")
    _run(store, "parked", "shop.refund", "STUCK")
    _run(store, "new", "shop.refund", "PENDING")
    groups = {(g.workflow, g.status): (g.count, g.last_finished_at) for g in store.census().runs}
    assert groups == {
        ("shop.checkout", "SUCCESS"): (3, 1_700_000_002.0),
        ("shop.checkout", "FAILURE"): (1, 1_700_000_100.0),
        ("shop.refund", "RUNNING"): (1, None),
        ("shop.refund", "STUCK"): (1, None),
        ("shop.refund", "PENDING"): (1, None),
    }
    # The largest groups first, at most ``limit`` of them.
    assert [(g.workflow, g.status) for g in store.census(limit=1).runs] == [
        ("shop.checkout", "SUCCESS")
    ]


def test_open_steps_redeliveries_waiting_outcomes_and_late_timers(store: Store) -> None:
    _run(store, "r", "shop.checkout", "RUNNING")
    _step(store, "r", 1, "activity", "SCHEDULED", losses=1)
    _step(store, "r", 2, "activity", "SCHEDULED", redispatches=2)
    _step(store, "r", 3, "activity", "CLAIMED")
    _step(store, "r", 4, "timer", "SCHEDULED", due_at=1.0)  # decades overdue
    _step(store, "r", 5, "signal", "SCHEDULED")
    _step(store, "r", 6, "activity", "DONE", outcome="ok", completed_at=2.0)
    _step(store, "r", 7, "activity", "DELIVERED", outcome="ok", completed_at=3.0, losses=4)
    census = store.census()
    assert census.open_steps == {
        ("activity", "SCHEDULED"): 2,
        ("activity", "CLAIMED"): 1,
        ("timer", "SCHEDULED"): 1,
        ("signal", "SCHEDULED"): 1,
    }
    # Only open task steps count: the delivered step's old losses are history.
    assert (census.redelivered_lost_worker, census.redelivered_lost_message) == (1, 1)
    assert census.outcomes_waiting == 1
    assert census.oldest_outcome_age > 1_600_000_000  # completed at 2.0, the epoch's start
    assert census.most_overdue_timer > 1_600_000_000


def test_a_timer_not_yet_due_is_not_overdue(store: Store) -> None:
    _run(store, "r", "shop.checkout", "RUNNING")
    _step(store, "r", 1, "timer", "SCHEDULED", due_at=4_000_000_000.0)  # in 2096
    assert store.census().most_overdue_timer == 0.0


def test_the_time_limit_is_the_census_own(store: Store) -> None:
    if store.dialect != "postgresql":
        pytest.skip("statement_timeout is PostgreSQL's")
    store.census(time_limit=1.5)
    with store.engine.connect() as conn:  # the pooled connection the census used
        assert conn.execute(text("SHOW statement_timeout")).scalar() == "0"
