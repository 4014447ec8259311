"""The per-process cache of suspended runs never hands a turn the wrong coroutine."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, shared_task

from celery_durable import _config, durable_workflow, workflow
from celery_durable.driver import RunDriver, cache
from celery_durable.testing import configure_embedded

JSON = "application/json"


@shared_task
def cache_echo(value: Any) -> Any:
    return value


@durable_workflow
async def relay(i: int, n: int) -> int:
    """One step per incarnation, continuing as new until ``i`` reaches ``n``."""
    await cache_echo.s(i)
    if i + 1 < n:
        workflow.continue_as_new(i + 1, n)
    return i


@pytest.fixture
def idle_app(tmp_path: Any) -> Iterator[Celery]:
    """An app whose messages nobody consumes: the test runs each driver turn itself."""
    app = Celery("durable-cache", broker="memory://", set_as_current=False)
    configure_embedded(app, f"sqlite:///{tmp_path}/cache.sqlite3")
    app.conf.task_default_queue = f"durable-cache-{uuid.uuid4().hex[:8]}"
    yield app
    cache.clear()
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


def turn(app: Celery, run_id: str) -> str | None:
    return RunDriver(app, relay.name, relay.fn, run_id).drive()


def finish_pending_step(app: Celery, run_id: str) -> None:
    store = _config.store_for(app)
    [step] = [s for s in store.history(run_id) if s.state == "SCHEDULED"]
    store.record_outcome(run_id, step.seq, result=(JSON, json.dumps(None).encode()))


def test_a_cached_coroutine_of_an_earlier_incarnation_is_not_reused(idle_app: Celery) -> None:
    handle = relay.apply_async((0, 2), workflow_id="relay", app=idle_app)
    assert turn(idle_app, "relay") == "RUNNING"  # incarnation 0 waits at turn 1
    # Another process of the same worker keeps this coroutine while the run moves on.
    elsewhere = cache.take("relay", 1, 0)
    assert elsewhere is not None

    finish_pending_step(idle_app, "relay")
    assert turn(idle_app, "relay") == "RUNNING"  # continued as new: incarnation 1, turn 1
    assert _config.store_for(idle_app).require_run("relay").turn == 1
    # That other process handles the next wake, holding incarnation 0 at turn 1 too.
    cache.put("relay", elsewhere, 1000, 0)

    finish_pending_step(idle_app, "relay")
    assert turn(idle_app, "relay") == "SUCCESS"
    assert handle.get(timeout=1) == 1
