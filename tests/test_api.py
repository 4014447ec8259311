"""The public API: the decorator, starting runs, handles, settings and their errors."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, shared_task
from celery.exceptions import ImproperlyConfigured
from celery.worker import WorkController

from celery_durable import (
    DurableError,
    DurableWorkflow,
    NotInWorkflowError,
    UnknownWorkflowError,
    WorkflowAwaitError,
    WorkflowEncodeError,
    WorkflowHandle,
    WorkflowNotFoundError,
    WorkflowTimeoutError,
    _config,
    durable_workflow,
)
from celery_durable._definition import DriverTask, registry, start_by_name
from celery_durable.testing import configure_embedded, embedded_worker

TIMEOUT = 30
#: A queue for the workflow declared with ``queue=``; the test worker consumes it too.
ROUTED_QUEUE = f"durable-tests-routed-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def worker(app: Celery) -> Iterator[WorkController]:
    with embedded_worker(app, queues=[app.conf.task_default_queue, ROUTED_QUEUE]) as worker:
        yield worker


@pytest.fixture
def idle_app(tmp_path: Path) -> Iterator[Celery]:
    """An app whose runs nobody drives: no worker consumes its queue."""
    app = Celery("durable-idle", broker="memory://", set_as_current=False)
    configure_embedded(app, f"sqlite:///{tmp_path}/idle.sqlite3")
    app.conf.task_default_queue = f"durable-tests-idle-{uuid.uuid4().hex[:8]}"
    yield app
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


@shared_task
def double(x: int) -> int:
    return x * 2


# -- the decorator ------------------------------------------------------------------------


@durable_workflow
async def bare(x: int) -> int:
    """Doubles ``x`` durably."""
    return await double.s(x)


@durable_workflow(name="tests.api.routed", queue=ROUTED_QUEUE)
async def routed(x: int, *, plus: int = 0) -> int:
    return int(await double.s(x)) + plus


@durable_workflow()
async def empty_parens() -> str:
    return "ok"


def test_bare_decorator_makes_a_durable_workflow(app: Celery) -> None:
    assert isinstance(bare, DurableWorkflow)
    assert bare.name == f"{__name__}.bare"
    assert bare.__doc__ == "Doubles ``x`` durably."
    assert bare.__wrapped__ is bare.fn
    assert asyncio.iscoroutinefunction(bare.fn)
    assert registry[bare.name] is bare
    task = bare.task_for(app)
    assert isinstance(task, DriverTask)
    assert app.tasks[bare.name] is task
    assert repr(bare) == f"<durable workflow {bare.name}>"


def test_option_decorator_sets_name_and_driver_options(app: Celery) -> None:
    assert isinstance(routed, DurableWorkflow)
    assert routed.name == "tests.api.routed"
    assert routed.options == {"queue": ROUTED_QUEUE}
    assert isinstance(app.tasks["tests.api.routed"], DriverTask)
    assert isinstance(empty_parens, DurableWorkflow)
    assert empty_parens.name == f"{__name__}.empty_parens"


@pytest.mark.usefixtures("worker")
def test_both_forms_run(app: Celery) -> None:
    assert bare.delay(21).get(timeout=TIMEOUT) == 42
    handle = routed.delay(5, plus=1)
    assert handle.get(timeout=TIMEOUT) == 11
    # The run keeps the driver's routing, so every wake goes to the workflow's queue.
    assert _config.store_for(app).require_run(handle.id).options == {"queue": ROUTED_QUEUE}
    assert empty_parens.delay().get(timeout=TIMEOUT) == "ok"


def test_a_plain_function_is_refused_with_the_fix() -> None:
    def not_async(x: int) -> int:
        return x

    with pytest.raises(TypeError, match=r"needs an `async def`.*not_async") as caught:
        durable_workflow(not_async)
    assert "await your tasks' signatures" in str(caught.value)

    with pytest.raises(TypeError, match="async def"):
        durable_workflow(name="tests.api.never")(not_async)


def test_a_non_function_is_refused() -> None:
    with pytest.raises(TypeError, match="takes a function or keyword options"):
        durable_workflow(42)


def test_a_workflow_is_not_called_directly() -> None:
    with pytest.raises(TypeError, match=r"bare\.delay\(\.\.\.\)"):
        bare(1)


# -- starting runs ------------------------------------------------------------------------


def test_arguments_the_serializer_cannot_encode_fail_at_the_call(idle_app: Celery) -> None:
    with pytest.raises(WorkflowEncodeError, match=bare.name) as caught:
        bare.apply_async((object(),), app=idle_app)
    assert "'json' serializer" in str(caught.value)
    assert _config.store_for(idle_app).list_runs() == []


def test_delay_encodes_with_the_current_app(app: Celery) -> None:
    with pytest.raises(WorkflowEncodeError, match=r"the arguments of workflow"):
        bare.delay({1, 2})


@pytest.mark.parametrize(
    ("args", "kwargs", "fragment"),
    [
        ((), {}, "missing a required argument: 'x'"),
        ((1, 2), {}, "too many positional arguments"),
        ((1,), {"plus": 1, "minus": 2}, "unexpected keyword argument 'minus'"),
    ],
)
def test_wrong_arguments_fail_at_the_call(
    idle_app: Celery, args: tuple[Any, ...], kwargs: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(TypeError, match=fragment) as caught:
        routed.apply_async(args, kwargs, app=idle_app)
    assert "tests.api.routed" in str(caught.value)
    assert _config.store_for(idle_app).list_runs() == []


def test_a_workflow_id_of_another_workflow_is_refused(idle_app: Celery) -> None:
    bare.apply_async((1,), workflow_id="shared-id", app=idle_app)
    with pytest.raises(DurableError, match="already belongs to a run of"):
        routed.apply_async((1,), workflow_id="shared-id", app=idle_app)


def test_apply_async_returns_a_handle_at_once(idle_app: Celery) -> None:
    handle = bare.apply_async((1,), workflow_id="pending-run", app=idle_app)
    assert isinstance(handle, WorkflowHandle)
    assert (handle.id, handle.workflow_id, handle.status) == (
        "pending-run",
        "pending-run",
        "PENDING",
    )
    assert handle.result is None
    assert not handle.ready()
    with pytest.raises(WorkflowTimeoutError, match="pending-run did not finish"):
        handle.get(timeout=0.05)


@pytest.mark.usefixtures("worker")
def test_a_signature_of_a_workflow_starts_a_run(app: Celery) -> None:
    handle = bare.s(4).delay()
    assert isinstance(handle, WorkflowHandle)
    assert handle.get(timeout=TIMEOUT) == 8


def test_start_by_name_of_an_unknown_workflow(idle_app: Celery) -> None:
    with pytest.raises(UnknownWorkflowError, match=r"no workflow named 'shop\.nope'") as caught:
        start_by_name(idle_app, "shop.nope", (1,))
    assert bare.name in str(caught.value)  # the known names are listed
    assert isinstance(caught.value, LookupError)


def test_start_by_name_of_a_known_workflow(idle_app: Celery) -> None:
    handle = start_by_name(idle_app, "tests.api.routed", (3,), {"plus": 1}, workflow_id="by-name")
    run = _config.store_for(idle_app).require_run("by-name")
    assert (handle.id, run.workflow, run.status) == ("by-name", "tests.api.routed", "PENDING")


# -- handles ------------------------------------------------------------------------------


def test_a_handle_on_an_unknown_id(idle_app: Celery) -> None:
    handle = WorkflowHandle[Any]("no-such-run", app=idle_app)
    with pytest.raises(WorkflowNotFoundError, match="'no-such-run'"):
        _ = handle.status
    with pytest.raises(WorkflowNotFoundError):
        handle.get(timeout=1)


def test_handles_compare_by_id() -> None:
    a, b, c = WorkflowHandle[Any]("x"), WorkflowHandle[Any]("x"), WorkflowHandle[Any]("y")
    assert a == b and a != c
    assert len({a, b, c}) == 2
    assert repr(a) == "<WorkflowHandle: x>"


# -- awaiting outside a workflow ----------------------------------------------------------


def test_awaiting_a_signature_outside_a_workflow() -> None:
    async def main() -> Any:
        return await double.s(1)

    with pytest.raises(NotInWorkflowError, match=r"await .*double.*@durable_workflow"):
        asyncio.run(main())


def test_awaiting_an_async_result_anywhere_is_refused(idle_app: Celery) -> None:
    async def main() -> Any:
        return await idle_app.AsyncResult("some-id")

    with pytest.raises(WorkflowAwaitError, match=r"await task\.s\(\.\.\.\)"):
        asyncio.run(main())


@durable_workflow
async def awaits_a_workflow() -> Any:
    return await bare.s(1)


# -- settings -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value", "fix"),
    [
        ("durable_database_url", 42, "must be an SQLAlchemy URL string"),
        ("durable_database_url", "not a url", "Use e.g. 'sqlite:///"),
        ("durable_database_url", "postgresql+psycopg2://db/app", "write 'postgresql+psycopg://"),
        ("durable_sweep_interval", "often", "leave it unset for the default of 10"),
        ("durable_stall_timeout", -1, "must be a number >= 0.05"),
        ("durable_worker_timeout", float("nan"), "durable_worker_timeout must be a number"),
        ("durable_cache_size", -5, "durable_cache_size must be a number >= 0"),
        ("durable_result_expires", -1, "None to keep finished runs forever"),
        ("durable_result_expires", "a week", "or a timedelta"),
    ],
)
def test_bad_settings_raise_improperly_configured_with_the_fix(
    key: str, value: Any, fix: str
) -> None:
    app = Celery("durable-misconfigured", broker="memory://", set_as_current=False)
    app.conf[key] = value
    with pytest.raises(ImproperlyConfigured, match=key):
        _config.settings_for(app)
    with pytest.raises(ImproperlyConfigured) as caught:
        bare.apply_async((1,), app=app)
    assert fix in str(caught.value)


def test_default_settings(tmp_path: Path) -> None:
    app = Celery("durable-defaults", broker="memory://", set_as_current=False)
    settings = _config.settings_for(app)
    assert settings.database_url == "sqlite:///celery_durable.sqlite3"
    assert (settings.sweep_interval, settings.stall_timeout, settings.worker_timeout) == (
        10.0,
        30.0,
        30.0,
    )
    assert (settings.cache_size, settings.serializer) == (1000, "json")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(3600, 3600.0), ("60", 60.0), (timedelta(days=1), 86400.0), (0, None), (None, None)],
)
def test_result_expires_takes_seconds_or_a_timedelta_and_0_or_none_for_never(
    value: Any, seconds: float | None
) -> None:
    app = Celery("durable-expiry", broker="memory://", set_as_current=False)
    assert _config.settings_for(app).result_expires == 7 * 86400.0
    app.conf.durable_result_expires = value
    assert _config.settings_for(app).result_expires == seconds


# -- handles stay bound to their app -----------------------------------------------------


def test_a_handle_reads_the_app_that_started_it_from_a_thread_with_another_app(
    idle_app: Celery, tmp_path: Path
) -> None:
    """A web server's worker thread has another current app (often the default one): a
    handle made by ``delay()`` must still read the store of the app that started it."""
    idle_app.set_current()
    handle = bare.delay(3)
    from celery_durable.canvas import durable

    canvas_handle = durable(double.s(2)).delay()
    other = Celery("durable-other", broker="memory://", set_as_current=False)
    configure_embedded(other, f"sqlite:///{tmp_path}/other.sqlite3")
    seen: list[Any] = []

    def web_thread() -> None:
        other.set_current()
        try:
            seen.extend([handle.status, canvas_handle.status, handle.workflow])
        except Exception as exc:
            seen.append(exc)

    try:
        thread = threading.Thread(target=web_thread)
        thread.start()
        thread.join()
    finally:
        store = _config._stores.pop(_config.settings_for(other).database_url, None)
        if store is not None:
            store.dispose()
    assert seen == ["PENDING", "PENDING", bare.name]
    assert handle.app is idle_app


def test_settings_are_read_again_when_the_configuration_changes() -> None:
    app = Celery("durable-rereads", broker="memory://", set_as_current=False)
    app.conf.accept_content = ["json"]
    first = _config.settings_for(app)
    # Unchanged: kept (the hot path asks for every step and turn).
    assert _config.settings_for(app) is first
    app.conf.durable_cache_size = 7
    assert _config.settings_for(app).cache_size == 7
    # A container changed in place is seen too.
    app.conf.accept_content.append("pickle")
    assert "application/x-python-serialize" in _config.settings_for(app).accept
    app.conf.update(durable_stall_timeout=2)
    assert _config.settings_for(app).stall_timeout == 2.0
