"""``workflow.continue_as_new``: same workflow id, a fresh and bounded history."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, shared_task

from celery_durable import WorkflowEncodeError, WorkflowHandle, _config, durable_workflow, workflow
from celery_durable._config import store_for
from celery_durable.driver import RunDriver
from celery_durable.testing import configure_embedded

pytestmark = pytest.mark.usefixtures("worker")

TIMEOUT = 30


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@shared_task
def poll(source: str, n: int) -> int:
    return n * 10


@durable_workflow
async def poller(source: str, n: int, seen: list[int], until: int) -> dict[str, Any]:
    seen = [*seen, int(await poll.s(source, n))]
    await workflow.sleep(0.05)
    if n + 1 < until:
        workflow.continue_as_new(source, n + 1, seen, until=until)
    return {"seen": seen, "id": workflow.info().workflow_id}


def test_continue_as_new_keeps_the_id_and_a_bounded_history(app: Celery, cache_size: int) -> None:
    run_id = new_id("poller")
    handle = poller.apply_async(("feed", 0, []), {"until": 5}, workflow_id=run_id)

    result = handle.get(timeout=TIMEOUT)

    assert result == {"seen": [0, 10, 20, 30, 40], "id": run_id}
    # Only the last incarnation's steps are kept: the history does not grow with the loop.
    history = handle.history
    assert [(s.kind, s.args) for s in history] == [("activity", ["feed", 4]), ("timer", [])]
    # Step numbers go on, so no late message of an earlier incarnation lands on a new step.
    assert history[0].seq > 2 * 4
    run = store_for(app).require_run(run_id)
    assert run.status == "SUCCESS" and run.turn == 3


@durable_workflow
async def takes_items(batch: int, taken: list[Any], rounds: int) -> list[Any]:
    for _ in range(batch):
        taken = [*taken, await workflow.wait_for_signal("item")]
    if rounds > 1:
        workflow.continue_as_new(batch, taken, rounds - 1)
    return taken


def test_buffered_signals_carry_over_to_the_new_run(app: Celery, cache_size: int) -> None:
    handle = takes_items.delay(2, [], 3)

    for n in range(6):  # all sent at once: most wait in the buffer for a later incarnation
        handle.signal("item", n)

    assert handle.get(timeout=TIMEOUT) == [0, 1, 2, 3, 4, 5]
    assert [s.result for s in handle.history] == [4, 5]


def test_signals_sent_while_it_restarts_are_not_lost(app: Celery) -> None:
    handle = takes_items.delay(1, [], 4)
    for n in range(4):
        wait_until(
            lambda n=n: (
                handle.status == "SUCCESS"  # type: ignore[misc]
                or any(s.state == "SCHEDULED" for s in handle.history)
            ),
            f"wait {n}",
        )
        handle.signal("item", n)
    assert handle.get(timeout=TIMEOUT) == [0, 1, 2, 3]


@durable_workflow
async def restarts_with_unencodable(value: object = None) -> None:
    workflow.continue_as_new(object())


def test_unencodable_arguments_to_continue_as_new_fail_the_run(app: Celery) -> None:
    handle = restarts_with_unencodable.delay()
    with pytest.raises(WorkflowEncodeError, match="continue_as_new") as raised:
        handle.get(timeout=TIMEOUT)
    assert handle.id in str(raised.value)


@durable_workflow
async def swallows_everything(n: int = 0) -> str:
    if n == 0:
        try:
            workflow.continue_as_new(1)
        except Exception:  # a broad except must not swallow the restart
            return "swallowed"
    return f"restarted with {n}"


def test_a_broad_except_does_not_swallow_continue_as_new(app: Celery) -> None:
    assert swallows_everything.delay().get(timeout=TIMEOUT) == "restarted with 1"


@durable_workflow
async def restarts_with_wrong_arguments(n: int) -> str:
    try:
        workflow.continue_as_new(n, "surplus")
    except TypeError as exc:
        return str(exc)
    return "restarted?"


def test_arguments_that_do_not_fit_the_workflow_fail_at_the_call(app: Celery) -> None:
    handle = restarts_with_wrong_arguments.delay(1)
    message = handle.get(timeout=TIMEOUT)
    assert "continue_as_new" in message and handle.id in message


@durable_workflow
async def child_that_restarts(n: int) -> int:
    await workflow.sleep(0.01)
    if n < 2:
        workflow.continue_as_new(n + 1)
    return n * 100


@durable_workflow
async def parent_of_restarting_child() -> int:
    return int(await child_that_restarts.s(0))


def test_a_child_that_continues_as_new_gives_its_parent_the_final_result(app: Celery) -> None:
    handle = parent_of_restarting_child.delay()
    assert handle.get(timeout=TIMEOUT) == 200
    [step] = handle.history
    assert step.child_id is not None
    assert WorkflowHandle(step.child_id, app=app).status == "SUCCESS"


# -- races, with the driver's turns run by hand -------------------------------------------


@durable_workflow
async def counts_up(n: int) -> int:
    if n < 3:
        workflow.continue_as_new(n + 1)
    return n


@pytest.fixture
def idle_app(tmp_path: Any) -> Iterator[Celery]:
    """An app whose messages nobody consumes: the test runs each driver turn itself."""
    app = Celery("durable-by-hand", broker="memory://", set_as_current=False)
    configure_embedded(app, f"sqlite:///{tmp_path}/by-hand.sqlite3")
    app.conf.task_default_queue = f"durable-tests-by-hand-{uuid.uuid4().hex[:8]}"
    yield app
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


def test_a_cancel_sent_while_the_run_continues_as_new_is_kept(
    idle_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    counts_up.apply_async((0,), workflow_id="racing-cancel", app=idle_app)
    store = store_for(idle_app)
    real_commit = store.commit_turn
    sent: list[str] = []

    def commit_after_a_cancel(run_id: str, write: Any) -> Any:
        if write.restart is not None and not sent:
            # The operator cancels after the turn read the run, before it commits.
            sent.append(run_id)
            store.request_cancel(run_id)
        return real_commit(run_id, write)

    monkeypatch.setattr(store, "commit_turn", commit_after_a_cancel)

    status = RunDriver(idle_app, counts_up.name, counts_up.fn, "racing-cancel").drive()

    assert sent == ["racing-cancel"]
    assert status == "CANCELLED"  # the new run got the cancel instead of counting on
