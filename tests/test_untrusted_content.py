"""Decoding trusts the app's ``accept_content``, never the content type stored beside a
payload: a row holding a pickle is refused on every path that reads it, and unpickling
(which runs code) never happens. Rebuilt errors are only ``Exception`` subclasses."""

from __future__ import annotations

import asyncio
import pickle
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, shared_task
from sqlalchemy import update

from celery_durable import (
    ActivityError,
    ContentDisallowedError,
    WorkflowHandle,
    _config,
    durable_workflow,
)
from celery_durable._codec import decode_error, encode_error
from celery_durable.driver import RunDriver
from celery_durable.runtime._instance import ContinueAsNewRequest
from celery_durable.store import _schema
from celery_durable.testing import configure_embedded
from celery_durable.worker import Sweeper

PICKLE = "application/x-python-serialize"


class _Plant:
    """Unpickling this creates the file at ``path``: proof that stored data ran code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def plant(marker: Path) -> bytes:
    return pickle.dumps(_Plant(marker))


def test_the_planted_payload_would_run_code(tmp_path: Path) -> None:
    """The payload the other tests store really does create its file when unpickled, so
    their "no marker" checks can fail."""
    marker = tmp_path / "ran"
    pickle.loads(plant(marker)).close()
    assert marker.exists()


@shared_task
def ship(order: str) -> str:
    return f"shipped {order}"


@durable_workflow(name="tests.untrusted.order")
async def order(name: str) -> str:
    return str(await ship.s(name))


@pytest.fixture
def idle_app(tmp_path: Path) -> Iterator[Celery]:
    """An app whose messages nobody consumes; the tests drive turns themselves."""
    app = Celery("durable-untrusted", broker="memory://", set_as_current=False)
    configure_embedded(app, f"sqlite:///{tmp_path}/untrusted.sqlite3")
    app.conf.task_default_queue = f"durable-tests-untrusted-{uuid.uuid4().hex[:8]}"
    yield app
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


@pytest.fixture
def marker(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a stored pickle was unpickled"


def write(app: Celery, table: Any, where: Any, **values: Any) -> None:
    with _config.store_for(app).engine.begin() as conn:
        assert conn.execute(update(table).where(where).values(**values)).rowcount == 1


def drive(app: Celery, run_id: str) -> str | None:
    return RunDriver(app, order.name, order.fn, run_id).drive()


def started(app: Celery, run_id: str) -> WorkflowHandle[Any]:
    """A run at turn 1, waiting for its ``ship`` step."""
    handle = order.apply_async(("o-1",), workflow_id=run_id, app=app)
    assert drive(app, run_id) == "RUNNING"
    return handle


def test_a_pickled_result_is_refused_by_result_and_get(idle_app: Celery, marker: Path) -> None:
    handle = order.apply_async(("o-1",), workflow_id="res", app=idle_app)
    runs = _schema.runs
    write(
        idle_app,
        runs,
        runs.c.id == "res",
        status="SUCCESS",
        content_type=PICKLE,
        result=plant(marker),
        finished_at=time.time(),
    )
    for read in (lambda: handle.result, lambda: handle.get(timeout=1)):
        with pytest.raises(ContentDisallowedError, match=r"order\[res\].*app.conf.accept_content"):
            read()


def test_a_pickled_step_is_refused_by_history_and_parks_only_its_run_in_the_driver(
    idle_app: Celery, marker: Path
) -> None:
    handle = started(idle_app, "bad")
    good = started(idle_app, "good")
    store = _config.store_for(idle_app)
    # As a worker of an app that sends pickles would record the step's outcome.
    store.record_outcome("bad", 1, result=(PICKLE, plant(marker)))
    with pytest.raises(ContentDisallowedError, match=r"step 1 .* of workflow run bad"):
        _ = handle.history
    assert drive(idle_app, "bad") == "STUCK"
    run = store.require_run("bad")
    assert run.error is not None and run.error["type"] == "ContentDisallowedError"
    assert "accept_content" in run.error["message"]
    assert isinstance(handle.result, ContentDisallowedError)
    # The other run goes on.
    store.record_outcome("good", 1, result=("application/json", b'"shipped o-1"'))
    assert drive(idle_app, "good") == "SUCCESS"
    assert good.get(timeout=1) == "shipped o-1"


def test_a_pickled_input_parks_the_run_at_its_first_turn(idle_app: Celery, marker: Path) -> None:
    handle = order.apply_async(("o-1",), workflow_id="input", app=idle_app)
    write(
        idle_app,
        _schema.runs,
        _schema.runs.c.id == "input",
        content_type=PICKLE,
        input=plant(marker),
    )
    assert drive(idle_app, "input") == "STUCK"
    assert "the input of workflow" in str(handle.result)


def test_a_sweep_parks_a_run_whose_step_it_cannot_decode_and_sends_the_others(
    idle_app: Celery, marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started(idle_app, "first")
    started(idle_app, "second")
    started(idle_app, "third")
    steps = _schema.steps
    where = (steps.c.run_id == "second") & (steps.c.seq == 1)
    write(idle_app, steps, where, content_type=PICKLE, input=plant(marker))
    # Every step message looks lost: it went stale long ago.
    with _config.store_for(idle_app).engine.begin() as conn:
        lost = conn.execute(
            update(steps).where(steps.c.stall_from.is_not(None)).values(stall_from=0.0)
        )
        assert lost.rowcount == 3
    counts = Sweeper(idle_app, "w-1", "host").sweep(leases_may_expire=False)
    assert counts["stale"] == 2
    store = _config.store_for(idle_app)
    assert [store.require_run(r).status for r in ("first", "second", "third")] == [
        "RUNNING",
        "STUCK",
        "RUNNING",
    ]
    error = store.require_run("second").error
    assert error is not None and "step 1" in error["message"]


def test_an_app_that_accepts_pickle_decodes_it_and_results_follow_their_own_setting(
    idle_app: Celery, tmp_path: Path
) -> None:
    handle = order.apply_async(("o-1",), workflow_id="trusted", app=idle_app)
    write(
        idle_app,
        _schema.runs,
        _schema.runs.c.id == "trusted",
        status="SUCCESS",
        content_type=PICKLE,
        result=pickle.dumps({"ok": 1}),
    )
    idle_app.conf.accept_content = ["json", "pickle"]
    idle_app.conf.result_accept_content = ["json"]
    with pytest.raises(ContentDisallowedError, match=r"app\.conf\.result_accept_content"):
        _ = handle.result
    idle_app.conf.result_accept_content = None  # falls back to accept_content
    assert handle.result == {"ok": 1}


@pytest.mark.parametrize(
    "exc",
    [
        SystemExit(3),
        KeyboardInterrupt(),
        GeneratorExit(),
        asyncio.CancelledError(),
        ContinueAsNewRequest((), {}),
        StopIteration(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_stored_error_never_becomes_a_control_flow_exception(exc: BaseException) -> None:
    rebuilt = decode_error(encode_error(exc))
    assert isinstance(rebuilt, ActivityError)
    assert rebuilt.exc_type == type(exc).__qualname__


def test_a_stored_error_of_an_ordinary_type_is_rebuilt_as_it_was() -> None:
    rebuilt = decode_error(encode_error(KeyError("sku")))
    assert type(rebuilt) is KeyError and rebuilt.args == ("sku",)
