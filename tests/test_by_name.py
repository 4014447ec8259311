"""Starting runs by name: the driver task sent with the workflow's own arguments.

A service that does not import the workflow's module, or Celery beat, sends
``app.send_task(name, args, kwargs)``; the message's task id becomes the workflow id.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, shared_task, signals
from celery.app.task import Context
from celery.worker import WorkController
from click.testing import CliRunner

from celery_durable import (
    DurableError,
    WorkflowArgumentsError,
    WorkflowHandle,
    _config,
    durable_workflow,
)
from celery_durable.cli import durable
from celery_durable.driver import create_run, on_driver_message
from celery_durable.testing import configure_embedded, embedded_worker
from celery_durable.worker import is_wake

TIMEOUT = 30
#: The queue of the workflow declared with ``queue=``; the test worker consumes it too.
ROUTED_QUEUE = f"durable-tests-by-name-{uuid.uuid4().hex[:8]}"

_lock = threading.Lock()
#: How many times each (tag, index) step ran.
effects: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module")
def worker(app: Celery) -> Iterator[WorkController]:
    with embedded_worker(app, queues=[app.conf.task_default_queue, ROUTED_QUEUE]) as worker:
        yield worker


@pytest.fixture
def finished() -> Iterator[Counter[str]]:
    """How many driver task messages finished, by task id (each copy counts)."""
    done: Counter[str] = Counter()

    def on_postrun(task_id: str | None = None, **_: Any) -> None:
        if task_id is not None:
            with _lock:
                done[task_id] += 1

    signals.task_postrun.connect(on_postrun, weak=False)
    try:
        yield done
    finally:
        signals.task_postrun.disconnect(on_postrun)


def _wait(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.01)


def _handle(app: Celery, run_id: str) -> WorkflowHandle[Any]:
    """The run a message sent by name started, once a worker has created it."""
    store = _config.store_for(app)
    _wait(lambda: store.get_run(run_id) is not None, f"no run {run_id} was created")
    return WorkflowHandle(run_id, app=app)


@shared_task
def effect(tag: str, i: int) -> int:
    with _lock:
        effects[(tag, i)] += 1
    return i * 10


@durable_workflow(name="tests.by_name.steps")
async def steps(tag: str, n: int, *, scale: int = 1) -> int:
    total = 0
    for i in range(n):
        total += await effect.s(tag, i)
    return total * scale


@durable_workflow(name="tests.by_name.named_task")
async def named_task(task: str, retries: int = 0) -> str:
    # Arguments named like Celery's own task parameters are the workflow's.
    return f"{task}/{retries}"


@durable_workflow(name="tests.by_name.routed", queue=ROUTED_QUEUE)
async def routed(tag: str) -> int:
    return await effect.s(tag, 0)


def _tag() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


# -- telling a wake from a start ----------------------------------------------------------


@pytest.mark.parametrize(
    ("request_fields", "wake"),
    [
        ({"durable_wake": True}, True),  # each message header becomes an attribute
        ({"headers": {"durable_wake": True}}, True),  # a body without args: only here
        ({"durable_wake": True, "headers": None}, True),
        ({}, False),  # app.send_task by name, Celery beat
        ({"headers": {"celery_beat_task": True}}, False),
        ({"durable_wake": False}, False),
    ],
)
def test_a_wake_is_told_by_its_header_wherever_celery_puts_it(
    request_fields: dict[str, Any], wake: bool
) -> None:
    assert is_wake(Context(id="m-1", **request_fields)) is wake


# -- starting by name ---------------------------------------------------------------------


@pytest.mark.usefixtures("worker")
def test_send_task_with_args_starts_a_run_under_the_task_id(app: Celery) -> None:
    tag = _tag()
    sent = app.send_task(steps.name, args=[tag, 3])

    handle = _handle(app, sent.id)
    assert handle.get(timeout=TIMEOUT) == 0 + 10 + 20
    run = _config.store_for(app).require_run(sent.id)
    assert (run.workflow, run.status) == (steps.name, "SUCCESS")
    assert [(s.name, s.args) for s in handle.history] == [(effect.name, [tag, i]) for i in range(3)]
    assert {i: effects[(tag, i)] for i in range(3)} == {0: 1, 1: 1, 2: 1}


@pytest.mark.usefixtures("worker")
def test_send_task_with_kwargs_passes_them_to_the_workflow(app: Celery) -> None:
    tag = _tag()
    sent = app.send_task(steps.name, kwargs={"tag": tag, "n": 2, "scale": 3}, task_id=tag)
    assert _handle(app, tag).get(timeout=TIMEOUT) == (0 + 10) * 3
    assert sent.id == tag

    other = app.send_task(named_task.name, args=["pay"], kwargs={"retries": 2})
    assert _handle(app, other.id).get(timeout=TIMEOUT) == "pay/2"
    only_kwargs = app.send_task(named_task.name, kwargs={"task": "ship"})
    assert _handle(app, only_kwargs.id).get(timeout=TIMEOUT) == "ship/0"


@pytest.mark.usefixtures("worker")
def test_a_start_delivered_again_makes_one_run_and_each_step_runs_once(
    app: Celery, finished: Counter[str]
) -> None:
    tag = _tag()
    store = _config.store_for(app)
    before = {r.id for r in store.list_runs(workflow=steps.name, limit=1000)}
    # Two copies at once (four worker threads: they may race), as a broker redelivering
    # a message a dead worker held would send.
    for _ in range(2):
        app.send_task(steps.name, args=[tag, 3], task_id=tag)
    assert _handle(app, tag).get(timeout=TIMEOUT) == 30
    _wait(lambda: finished[tag] >= 2, "both copies of the start message did not run")
    # And one more, after the run has finished.
    app.send_task(steps.name, args=[tag, 3], task_id=tag)
    _wait(lambda: finished[tag] >= 3, "the late copy did not run")

    after = {r.id for r in store.list_runs(workflow=steps.name, limit=1000)}
    assert after - before == {tag}
    assert store.require_run(tag).status == "SUCCESS"
    assert [s.seq for s in _handle(app, tag).history] == [1, 2, 3]
    assert {i: effects[(tag, i)] for i in range(3)} == {0: 1, 1: 1, 2: 1}


@pytest.mark.usefixtures("worker")
@pytest.mark.parametrize(
    ("args", "kwargs", "reason"),
    [
        ([], {}, "missing a required argument: 'tag'"),
        (["a", 1, 2], {}, "too many positional arguments"),
        (["a", 1], {"scale": 2, "bogus": 1}, "unexpected keyword argument 'bogus'"),
    ],
)
def test_arguments_that_do_not_fit_fail_the_run_saying_what_to_pass(
    app: Celery, args: list[Any], kwargs: dict[str, Any], reason: str
) -> None:
    sent = app.send_task(steps.name, args=args, kwargs=kwargs)
    handle = _handle(app, sent.id)

    with pytest.raises(WorkflowArgumentsError) as caught:
        handle.get(timeout=TIMEOUT)

    message = str(caught.value)
    assert isinstance(caught.value, TypeError)
    assert f"workflow {steps.name}[{sent.id}]" in message
    assert reason in message
    assert "steps(tag, n, *, scale=1)" in message  # what to pass
    assert f"app.send_task({steps.name!r}, args=[...], kwargs={{...}})" in message
    assert handle.status == "FAILURE"
    assert handle.history == []  # no step ran
    run = _config.store_for(app).require_run(sent.id)
    assert run.error is not None and run.error["type"] == "WorkflowArgumentsError"

    # Visible where operators look, with the arguments that were sent.
    shown = CliRunner().invoke(durable, ["show", sent.id], obj=SimpleNamespace(app=app))
    assert shown.exit_code == 0, shown.output
    assert "status:   FAILURE" in shown.output
    assert "celery_durable.errors.WorkflowArgumentsError" in shown.output
    assert reason in shown.output


@pytest.mark.usefixtures("worker")
def test_a_run_started_by_name_keeps_the_workflows_routing(app: Celery) -> None:
    tag = _tag()
    # Sent to the default queue, as a sender that knows nothing of the workflow would.
    sent = app.send_task(routed.name, args=[tag])
    assert _handle(app, sent.id).get(timeout=TIMEOUT) == 0
    run = _config.store_for(app).require_run(sent.id)
    assert run.options == {"queue": ROUTED_QUEUE}  # every later wake goes there


def test_a_task_id_of_another_workflows_run_is_refused(app: Celery) -> None:
    taken = _tag()
    # A run of another workflow under that id (created, never woken).
    assert create_run(app, routed.name, taken, ["x"], {}, {})
    with pytest.raises(DurableError, match=rf"{taken!r} already belongs to a run of"):
        on_driver_message(app, steps.name, steps.fn, Context(id=taken), ["x", 1], {}, steps.options)
    assert _config.store_for(app).require_run(taken).workflow == routed.name


# -- task protocol 1 ----------------------------------------------------------------------


@durable_workflow(name="tests.by_name.proto1")
async def proto1(tag: str) -> int:
    return await effect.s(tag, 0) + await effect.s(tag, 1)


def test_runs_finish_when_every_message_uses_task_protocol_1(tmp_path: Path) -> None:
    # A client (or a worker) still on task protocol 1 sends its wakes in that format;
    # were one not recognised as a wake, it would start a run with the run id as its
    # argument.
    app = Celery("durable-proto1", broker="memory://", set_as_current=False)
    configure_embedded(app, f"sqlite:///{tmp_path}/proto1.sqlite3")
    app.conf.task_default_queue = f"durable-tests-proto1-{uuid.uuid4().hex[:8]}"
    app.conf.task_protocol = 1
    try:
        with embedded_worker(app):
            tag = _tag()
            started = proto1.apply_async((tag,), app=app)
            by_name = app.send_task(proto1.name, args=[f"{tag}-n"])
            assert started.get(timeout=TIMEOUT) == 10
            assert _handle(app, by_name.id).get(timeout=TIMEOUT) == 10
        runs = _config.store_for(app).list_runs()
        assert sorted(r.id for r in runs) == sorted([started.id, by_name.id])
        assert {k: v for k, v in effects.items() if k[0].startswith(tag)} == {
            (tag, 0): 1,
            (tag, 1): 1,
            (f"{tag}-n", 0): 1,
            (f"{tag}-n", 1): 1,
        }
    finally:
        store = _config._stores.pop(_config.settings_for(app).database_url, None)
        if store is not None:
            store.dispose()
