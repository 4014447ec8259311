"""The workflow series of Flower's ``/metrics``: a collector reading a real SQLite store."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from sqlalchemy import update

from celery_durable import _config
from celery_durable.flower._metrics import SERIES, WorkflowMetrics, metrics_for
from celery_durable.store import NewRun, Store
from celery_durable.store import _schema as s


def _app(url: str) -> Celery:
    app = Celery("metrics-tests", broker="memory://", set_as_current=False)
    app.conf.durable_database_url = url
    return app


@pytest.fixture
def app(tmp_path: Path) -> Iterator[Celery]:
    app = _app(f"sqlite:///{tmp_path}/durable.sqlite3")
    yield app
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


def _run(store: Store, run_id: str, workflow: str, status: str, **values: Any) -> None:
    assert store.create_run(NewRun(run_id, workflow, "application/json", b"[[], {}]", {}))
    with store.engine.begin() as conn:
        conn.execute(update(s.runs).where(s.runs.c.id == run_id).values(status=status, **values))


def _scrape(collector: WorkflowMetrics) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    collector.refresh()
    return generate_latest(registry).decode()


def test_the_series_count_runs_without_naming_any(app: Celery) -> None:
    store = _config.store_for(app)
    _run(store, "order-1", "shop.checkout", "SUCCESS", finished_at=1_700_000_000.0)
    _run(store, "order-2", "shop.checkout", "SUCCESS", finished_at=1_700_000_050.0)
    _run(store, "order-3", "shop.checkout", "FAILURE", finished_at=1_700_000_010.0)
    _run(store, "order-4", "shop.checkout", "STUCK")
    _run(store, "refund-1", "shop.refund", "RUNNING")
    text = _scrape(WorkflowMetrics(app))
    assert 'celery_durable_runs{status="SUCCESS",workflow="shop.checkout"} 2.0' in text
    assert 'celery_durable_runs{status="RUNNING",workflow="shop.refund"} 1.0' in text
    assert (
        "celery_durable_runs_last_finished_timestamp_seconds"
        '{status="SUCCESS",workflow="shop.checkout"} 1.70000005e+09'
    ) in text
    assert "celery_durable_runs_stuck 1.0" in text
    assert 'celery_durable_steps_redelivered{cause="worker_lost"} 0.0' in text
    assert "celery_durable_outcomes_waiting 0.0" in text
    assert "celery_durable_timers_overdue_seconds 0.0" in text
    assert "celery_durable_metrics_errors_total 0.0" in text
    assert "order-" not in text and "refund-1" not in text  # no label names a run
    for name, (kind, _, _) in SERIES.items():
        assert f"# TYPE {name}{'_total' if kind == 'counter' else ''} {kind}" in text


def test_a_census_is_reused_for_max_age(app: Celery, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _config.store_for(app)
    reads = []
    census = store.census
    monkeypatch.setattr(store, "census", lambda *a: reads.append(a) or census(*a))
    collector = WorkflowMetrics(app, max_age=0.3)
    collector.refresh()
    _run(store, "late", "shop.checkout", "RUNNING")
    collector.refresh()
    assert len(reads) == 1 and "RUNNING" not in _text(collector)
    time.sleep(0.35)
    collector.refresh()
    assert len(reads) == 2 and "RUNNING" in _text(collector)


def _text(collector: WorkflowMetrics) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_an_unreachable_store_leaves_only_the_error_counter(tmp_path: Path) -> None:
    app = _app("postgresql+psycopg://durable:s3cret@127.0.0.1:1/nowhere")
    collector = WorkflowMetrics(app)
    text = _scrape(collector)
    assert "celery_durable_metrics_errors_total 1.0" in text
    assert "celery_durable_runs" not in text and "s3cret" not in text
    collector.refresh()  # a failed read is not kept: the next scrape tries again
    assert "celery_durable_metrics_errors_total 2.0" in _text(collector)


def test_a_slow_store_costs_a_scrape_the_time_limit_and_one_read(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _config.store_for(app)
    _run(store, "slow", "shop.checkout", "RUNNING")
    release = threading.Event()
    reads = []
    census = store.census

    def slow(*args: Any) -> Any:
        reads.append(args)
        release.wait(10)
        return census(*args)

    monkeypatch.setattr(store, "census", slow)
    collector = WorkflowMetrics(app, time_limit=0.2)
    started = time.monotonic()
    collector.refresh()
    collector.refresh()  # a second scrape waits for the same read
    assert time.monotonic() - started < 2
    assert len(reads) == 1 and collector.errors == 2
    assert "celery_durable_runs{" not in _text(collector)
    release.set()
    deadline = time.monotonic() + 10
    while "celery_durable_runs{" not in _text(collector):  # the read lands for the next one
        assert time.monotonic() < deadline
        time.sleep(0.02)
    collector.refresh()
    assert len(reads) == 1 and collector.errors == 2


def test_metrics_for_registers_one_collector_in_flowers_registry(app: Celery) -> None:
    collector = metrics_for(app)
    try:
        assert metrics_for(app) is collector
        collector.refresh()
        assert "celery_durable_runs_stuck 0.0" in generate_latest(REGISTRY).decode()
    finally:
        REGISTRY.unregister(collector)
        from celery_durable.flower import _metrics

        _metrics._registered.clear()
