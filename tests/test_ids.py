"""Workflow ids: ids the store cannot keep fail at the call, and child runs' ids always
fit and never collide with ids callers choose."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, shared_task
from celery.app.task import Context

from celery_durable import WorkflowHandle, WorkflowIdError, _config, durable_workflow
from celery_durable.canvas import durable
from celery_durable.driver import RunDriver, child_run_id, on_driver_message
from celery_durable.store import MAX_RUN_ID_LENGTH
from celery_durable.testing import configure_embedded


@shared_task
def one() -> int:
    return 1


@durable_workflow(name="tests.ids.child")
async def child(depth: int) -> int:
    if depth:
        return 1 + int(await child.s(depth - 1))
    return 0


@durable_workflow(name="tests.ids.parent")
async def parent() -> int:
    return int(await child.s(1))


def _drop_store(app: Celery) -> None:
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def idle_app(request: pytest.FixtureRequest, tmp_path: Any) -> Iterator[Celery]:
    """An app whose messages nobody consumes, on SQLite and on PostgreSQL (which, unlike
    SQLite, enforces the id column's width)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/ids.sqlite3"
    else:
        url = str(request.getfixturevalue("postgres_url"))
    app = Celery("durable-ids", broker="memory://", set_as_current=False)
    configure_embedded(app, url)
    app.conf.task_default_queue = f"durable-tests-ids-{uuid.uuid4().hex[:8]}"
    yield app
    _drop_store(app)


def turn(app: Celery, definition: Any, run_id: str) -> str | None:
    return RunDriver(app, definition.name, definition.fn, run_id).drive()


BAD_IDS = [
    pytest.param("x" * (MAX_RUN_ID_LENGTH + 45), "300 characters, more than the 255", id="long"),
    pytest.param("", "empty", id="empty"),
    pytest.param(7, "must be a string", id="int"),
    pytest.param("p-1/1", "may not contain '/'", id="child-like"),
]


@pytest.mark.parametrize(("bad", "says"), BAD_IDS)
def test_an_id_the_store_cannot_keep_fails_at_every_call_that_starts_a_run(
    idle_app: Celery, bad: Any, says: str
) -> None:
    store = _config.store_for(idle_app)
    starts = [
        lambda: parent.apply_async(workflow_id=bad, app=idle_app),
        lambda: parent.task_for(idle_app).apply_async(task_id=bad),
        lambda: durable(one.s(), app=idle_app).apply_async(workflow_id=bad),
    ]
    for start in starts:
        with pytest.raises(WorkflowIdError, match=says):
            start()
    if isinstance(bad, str) and bad:
        # A start request sent by name carries the id as its task id.
        with pytest.raises(WorkflowIdError, match=says):
            on_driver_message(idle_app, parent.name, parent.fn, Context(id=bad), [], {}, {})
        assert store.get_run(bad) is None
    assert store.list_runs() == []


def test_the_longest_id_is_accepted_and_its_children_ids_fit(idle_app: Celery) -> None:
    """A parent whose id fills the column used to go STUCK on PostgreSQL: its child's id
    (``<parent>/<seq>``) did not fit. Children, and their children, get ids that fit."""
    long_id = "p" * MAX_RUN_ID_LENGTH
    handle = parent.apply_async(workflow_id=long_id, app=idle_app)
    store = _config.store_for(idle_app)
    assert turn(idle_app, parent, long_id) == "RUNNING"
    (step,) = store.history(long_id)
    first = step.child_id
    assert first is not None and len(first) <= MAX_RUN_ID_LENGTH
    assert turn(idle_app, child, first) == "RUNNING"
    (grand_step,) = store.history(first)
    grand = grand_step.child_id
    assert grand is not None and len(grand) <= MAX_RUN_ID_LENGTH
    assert turn(idle_app, child, grand) == "SUCCESS"
    assert turn(idle_app, child, first) == "SUCCESS"
    assert turn(idle_app, parent, long_id) == "SUCCESS"
    assert handle.get(timeout=1) == 1
    assert store.require_run(grand).parent_id == first


def test_a_user_id_shaped_like_a_child_id_cannot_take_a_childs_place(idle_app: Celery) -> None:
    """A user run named ``p-1/1`` used to take the id of run ``p-1``'s first child, and
    ``p-1`` went STUCK on a duplicate key."""
    with pytest.raises(WorkflowIdError):
        child.apply_async((0,), workflow_id="p-1/1", app=idle_app)
    handle = parent.apply_async(workflow_id="p-1", app=idle_app)
    assert turn(idle_app, parent, "p-1") == "RUNNING"
    assert turn(idle_app, child, "p-1/1") == "RUNNING"
    assert turn(idle_app, child, "p-1/1/1") == "SUCCESS"
    assert turn(idle_app, child, "p-1/1") == "SUCCESS"
    assert turn(idle_app, parent, "p-1") == "SUCCESS"
    assert WorkflowHandle("p-1", app=idle_app).get(timeout=1) == handle.get(timeout=1) == 1


def test_child_ids_of_long_parents_sharing_a_prefix_differ() -> None:
    a, b = "a" * 250 + "1", "a" * 250 + "2"
    assert child_run_id(a, 1) != child_run_id(b, 1)
    assert child_run_id(a, 1) != child_run_id(a, 2)
    assert len(child_run_id(a, 2**40)) <= MAX_RUN_ID_LENGTH
    assert child_run_id("p-1", 3) == "p-1/3"  # short ids keep the documented form
