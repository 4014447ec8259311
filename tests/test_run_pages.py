"""``Store.list_runs`` pages and ``Store.count_runs_by_status``: what the Flower tab reads."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import update

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


def _create(store: Store, run_id: str, workflow: str, status: str, created: float) -> None:
    assert store.create_run(NewRun(run_id, workflow, JSON, b"[[], {}]", {}))
    with store.engine.begin() as conn:
        conn.execute(
            update(s.runs).where(s.runs.c.id == run_id).values(status=status, created_at=created)
        )


@pytest.fixture
def runs(store: Store) -> Store:
    # Ten runs, created one second apart: r0 oldest, r9 newest; every third one failed.
    for i in range(10):
        status = "FAILURE" if i % 3 == 0 else "SUCCESS"
        workflow = "shop.checkout" if i % 2 else "shop.refund"
        _create(store, f"r{i}", workflow, status, 1_700_000_000.0 + i)
    _create(store, "r9/1", "shop.refund", "RUNNING", 1_700_000_100.0)
    _create(store, "odd_%id", "shop.refund", "RUNNING", 1_699_000_000.0)
    return store


def test_pages_are_newest_first_and_do_not_overlap(runs: Store) -> None:
    first = [r.id for r in runs.list_runs(limit=4)]
    second = [r.id for r in runs.list_runs(limit=4, offset=4)]
    assert first == ["r9/1", "r9", "r8", "r7"]
    assert second == ["r6", "r5", "r4", "r3"]
    assert [r.id for r in runs.list_runs(limit=4, offset=12)] == []


def test_filters_combine_and_counts_follow_them(runs: Store) -> None:
    failed = [r.id for r in runs.list_runs(status="FAILURE", limit=10)]
    assert failed == ["r9", "r6", "r3", "r0"]
    assert runs.count_runs_by_status() == {"FAILURE": 4, "SUCCESS": 6, "RUNNING": 2}
    assert runs.count_runs_by_status(workflow="shop.checkout") == {"FAILURE": 2, "SUCCESS": 3}
    children = runs.list_runs(search="r9/", limit=10)
    assert [r.id for r in children] == ["r9/1"]
    assert runs.count_runs_by_status(search="r9") == {"FAILURE": 1, "RUNNING": 1}


def test_search_takes_like_wildcards_literally(runs: Store) -> None:
    assert [r.id for r in runs.list_runs(search="_%", limit=10)] == ["odd_%id"]
    assert runs.list_runs(search="r_", limit=10) == []
    assert runs.count_runs_by_status(search="%") == {"RUNNING": 1}
