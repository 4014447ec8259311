"""The two Flower routes the tab takes over, in a Flower application served in-process:
``/task/<id>`` (a run's id redirects to its page, any other id is Flower's task page) and
``/metrics`` (Flower's series and the workflow series)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from flowerserver import FlowerServer, serve_flower

from celery_durable import _config
from celery_durable.store import NewRun


@pytest.fixture
def durable_app(tmp_path: Path) -> Iterator[Celery]:
    app = Celery("routes-tests", broker="memory://", set_as_current=False)
    app.conf.durable_database_url = f"sqlite:///{tmp_path}/durable.sqlite3"
    yield app
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


@pytest.fixture
def flower(durable_app: Celery) -> Iterator[FlowerServer]:
    with serve_flower(durable_app) as server:
        yield server


def test_a_runs_id_as_task_id_redirects_to_the_run_page(
    durable_app: Celery, flower: FlowerServer
) -> None:
    store = _config.store_for(durable_app)
    for run_id in ("order-o-1", "order-o-1/2"):
        assert store.create_run(NewRun(run_id, "shop.checkout", "application/json", b"[[],{}]"))
    status, location, _ = flower.get("/task/order-o-1")
    assert (status, location) == (302, "/workflows/order-o-1")
    status, location, _ = flower.get("/task/order-o-1%2F2")
    assert status == 302 and location.startswith("/workflows/order-o-1")
    assert "/2" in location.replace("%2F", "/")


def test_any_other_id_is_flowers_own_task_page(flower: FlowerServer) -> None:
    status, _, text = flower.get("/task/no-such-task")
    assert status == 404 and "Unknown task" in text  # Flower's TaskView said so
    now = time.time()
    flower.app.events.state.event(
        {
            "type": "task-received",
            "uuid": "step-1",
            "name": "shop.charge",
            "hostname": "w1@host",
            "timestamp": now,
            "local_received": now,
            "clock": 1,
            "args": "('o-1',)",
            "kwargs": "{}",
            "root_id": "order-o-1",
            "parent_id": "order-o-1",
        }
    )
    status, _, text = flower.get("/task/step-1")
    assert status == 200 and "shop.charge" in text and 'href="/task/order-o-1"' in text


def test_metrics_serve_flowers_series_and_the_workflow_series(
    durable_app: Celery, flower: FlowerServer
) -> None:
    store = _config.store_for(durable_app)
    assert store.create_run(NewRun("order-o-2", "shop.checkout", "application/json", b"[[],{}]"))
    status, _, text = flower.get("/metrics")
    assert status == 200
    assert "flower_events_total" in text  # Flower's own
    assert 'celery_durable_runs{status="PENDING",workflow="shop.checkout"} 1.0' in text
    assert "order-o-2" not in text
