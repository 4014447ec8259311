"""Driver turns end to end, on an embedded worker with ``memory://`` and SQLite."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, group, shared_task
from sqlalchemy import update

import celery_durable.driver._driver
import celery_durable.worker._sweeper
from celery_durable import (
    ActivityError,
    HistoryWriteError,
    NonDeterminismError,
    WorkflowAwaitError,
    WorkflowEncodeError,
    WorkflowHandle,
    _config,
    durable_workflow,
    workflow,
)
from celery_durable._config import store_for
from celery_durable.driver import RunDriver
from celery_durable.store import _schema
from celery_durable.testing import configure_embedded
from celery_durable.worker import Sweeper

pytestmark = pytest.mark.usefixtures("worker")

TIMEOUT = 30

#: Executions of each task, by a key the test chooses: durability is counted, not guessed.
calls: Counter[str] = Counter()
_calls_lock = threading.Lock()


def executed(key: str) -> None:
    with _calls_lock:
        calls[key] += 1


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class PaymentDeclined(Exception):
    """An error whose arguments survive the trip through the store."""


class CannotRebuild(Exception):
    """An error that cannot be rebuilt from its ``args``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"code {code}: {reason}")


class OrderRejected(Exception):
    pass


# -- tasks ----------------------------------------------------------------------------------


@shared_task
def charge(order_id: str, cents: int) -> str:
    executed(f"charge:{order_id}")
    return f"receipt-{order_id}-{cents}"


@shared_task
def reserve(order_id: str, sku: str) -> bool:
    executed(f"reserve:{order_id}:{sku}")
    return sku != "out-of-stock"


@shared_task
def decline(order_id: str) -> None:
    executed(f"decline:{order_id}")
    raise PaymentDeclined(f"card of {order_id} expired", 402)


@shared_task
def break_oddly(order_id: str) -> None:
    raise CannotRebuild(7, f"{order_id} is odd")


@shared_task
def returns_a_set() -> set[int]:
    return {1, 2}


#: Failures still to come per key, for steps that fail and then succeed on a retry.
failures_left: Counter[str] = Counter()


@shared_task
def flaky(key: str) -> str:
    executed(f"flaky:{key}")
    with _calls_lock:
        if failures_left[key] > 0:
            failures_left[key] -= 1
            raise ConnectionError(f"{key}: service unavailable")
    return f"{key}: ok"


# -- workflows ------------------------------------------------------------------------------


@durable_workflow
async def checkout(order_id: str, skus: list[str]) -> dict[str, Any]:
    receipt = await charge.s(order_id, 1999)
    held = await asyncio.gather(*(reserve.s(order_id, sku) for sku in skus))
    return {"receipt": receipt, "held": list(held)}


def test_a_workflow_runs_end_to_end(app: Celery) -> None:
    order = new_id("order")

    handle = checkout.delay(order, ["apple", "fig"])

    assert handle.get(timeout=TIMEOUT) == {
        "receipt": f"receipt-{order}-1999",
        "held": [True, True],
    }
    assert handle.status == "SUCCESS"
    assert handle.successful() and handle.ready() and not handle.failed()
    assert handle.workflow == checkout.name
    history = handle.history
    assert [(s.seq, s.name, s.args, s.result, s.state) for s in history] == [
        (1, charge.name, [order, 1999], f"receipt-{order}-1999", "DELIVERED"),
        (2, reserve.name, [order, "apple"], True, "DELIVERED"),
        (3, reserve.name, [order, "fig"], True, "DELIVERED"),
    ]
    assert all(s.attempts == 1 for s in history)
    described = handle.describe()
    assert (described["status"], described["steps"]) == ("SUCCESS", {"DELIVERED": 3})
    assert [calls[f"charge:{order}"], calls[f"reserve:{order}:apple"]] == [1, 1]


def test_every_turn_replays_when_the_cache_is_off(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(app.conf, "durable_cache_size", 0)
    replayed: list[int] = []
    real_replay = celery_durable.driver._driver.replay

    def counting_replay(
        instance: Any, history: Any, turns: int, turn_times: Any, **options: Any
    ) -> None:
        if instance.info.workflow_id == handle_id[0]:
            replayed.append(turns)
        real_replay(instance, history, turns, turn_times, **options)

    handle_id = [new_id("replayed")]
    monkeypatch.setattr(celery_durable.driver._driver, "replay", counting_replay)
    order = new_id("order")

    handle = checkout.apply_async((order, ["a", "b", "out-of-stock"]), workflow_id=handle_id[0])
    result = handle.get(timeout=TIMEOUT)

    assert result == {"receipt": f"receipt-{order}-1999", "held": [True, True, False]}
    # Every turn after the first rebuilt the run from history, up to the turn before it.
    # (A duplicate wake racing a turn may rebuild the same point twice; its commit is
    # fenced out, so that is harmless and depends only on timing.)
    turns = store_for(app).require_run(handle.id).turn
    assert sorted(set(replayed)) == list(range(1, turns))
    assert replayed == sorted(replayed)
    # Replaying history does not run recorded steps again.
    assert calls[f"charge:{order}"] == 1
    assert [calls[f"reserve:{order}:{sku}"] for sku in ("a", "b", "out-of-stock")] == [1, 1, 1]


@durable_workflow
async def pays_or_explains(order_id: str) -> dict[str, Any]:
    try:
        await decline.s(order_id)
    except PaymentDeclined as exc:
        notes = getattr(exc, "__notes__", [])
        return {
            "type": type(exc).__name__,
            "args": list(exc.args),
            "remote_traceback": any("Raised remotely" in n and "decline" in n for n in notes),
        }
    return {"type": None}


def test_an_activity_error_is_raised_at_the_await_with_its_own_type(app: Celery) -> None:
    order = new_id("order")
    result = pays_or_explains.delay(order).get(timeout=TIMEOUT)

    assert result["type"] == "PaymentDeclined"
    assert result["args"] == [f"card of {order} expired", 402]
    if sys.version_info >= (3, 11):
        assert result["remote_traceback"] is True
    assert calls[f"decline:{order}"] == 1  # a failed step is not retried by the library


@durable_workflow
async def explains_odd_error(order_id: str) -> list[Any]:
    try:
        await break_oddly.s(order_id)
    except ActivityError as exc:
        return [
            exc.exc_type,
            exc.exc_module,
            exc.exc_message,
            "CannotRebuild" in exc.remote_traceback,
        ]
    return []


def test_an_error_that_cannot_be_rebuilt_arrives_as_activity_error(app: Celery) -> None:
    order = new_id("order")
    assert explains_odd_error.delay(order).get(timeout=TIMEOUT) == [
        "CannotRebuild",
        __name__,
        f"code 7: {order} is odd",
        True,
    ]


@durable_workflow
async def rejects(order_id: str) -> None:
    await charge.s(order_id, 1)
    raise OrderRejected(f"{order_id} is too big")


def test_a_failing_workflow_raises_its_exception_from_get(app: Celery) -> None:
    order = new_id("order")
    handle = rejects.delay(order)

    with pytest.raises(OrderRejected, match=f"{order} is too big"):
        handle.get(timeout=TIMEOUT)

    assert handle.status == "FAILURE"
    assert handle.failed() and handle.ready() and not handle.successful()
    assert isinstance(handle.result, OrderRejected)
    assert handle.traceback is not None and "OrderRejected" in handle.traceback
    returned = handle.get(timeout=TIMEOUT, propagate=False)
    assert isinstance(returned, OrderRejected)
    assert [(s.name, s.state) for s in handle.history] == [(charge.name, "DELIVERED")]


@durable_workflow
async def lets_a_step_error_escape(order_id: str) -> None:
    await decline.s(order_id)


def test_an_unhandled_activity_error_fails_the_workflow_with_it(app: Celery) -> None:
    handle = lets_a_step_error_escape.delay(new_id("order"))
    with pytest.raises(PaymentDeclined):
        handle.get(timeout=TIMEOUT)
    [step] = handle.history
    assert step.error is not None and step.error["type"] == "PaymentDeclined"


@durable_workflow
async def awaits_async_result(order_id: str) -> None:
    await charge.s(order_id, 1)
    await charge.delay(order_id, 2)  # the mistake under test


def test_awaiting_an_async_result_fails_the_run_with_advice(app: Celery) -> None:
    handle = awaits_async_result.delay(new_id("order"))

    with pytest.raises(WorkflowAwaitError, match=r"await task\.s\(\.\.\.\)"):
        handle.get(timeout=TIMEOUT)
    assert handle.status == "FAILURE"
    assert [(s.seq, s.name, s.state) for s in handle.history] == [(1, charge.name, "DELIVERED")]


@durable_workflow
async def awaits_a_group(order_id: str) -> None:
    await group(charge.s(order_id, 1), charge.s(order_id, 2))


@durable_workflow
async def sends_unencodable_step_args(order_id: str) -> str:
    try:
        await charge.s(order_id, object())
    except WorkflowEncodeError as exc:
        return str(exc)
    return "encoded?"


def test_unencodable_step_arguments_raise_at_the_await(app: Celery) -> None:
    handle = sends_unencodable_step_args.delay(new_id("order"))
    message = handle.get(timeout=TIMEOUT)
    assert f"step 1 ({charge.name})" in message
    assert handle.id in message
    assert handle.history == []  # nothing was scheduled


@durable_workflow
async def gets_unencodable_step_result() -> str:
    try:
        await returns_a_set.s()
    except WorkflowEncodeError as exc:
        return type(exc).__name__
    return "decoded?"


def test_an_unencodable_step_result_becomes_an_error_at_the_await(app: Celery) -> None:
    assert gets_unencodable_step_result.delay().get(timeout=TIMEOUT) == "WorkflowEncodeError"


@durable_workflow
async def returns_unencodable() -> object:
    return object()


def test_an_unencodable_workflow_result_fails_the_run(app: Celery) -> None:
    handle = returns_unencodable.delay()
    with pytest.raises(WorkflowEncodeError, match="the result of workflow"):
        handle.get(timeout=TIMEOUT)
    assert handle.status == "FAILURE"


@durable_workflow
async def reports_info(order_id: str) -> list[Any]:
    before = workflow.now()
    await charge.s(order_id, 1)
    info = workflow.info()
    return [info.workflow_id, info.name, workflow.now() >= before, str(workflow.uuid4())]


def test_workflow_helpers_inside_a_real_run(app: Celery) -> None:
    workflow_id = new_id("info")
    workflow_id_seen, name, time_moved_on, token = reports_info.apply_async(
        (workflow_id,), workflow_id=workflow_id
    ).get(timeout=TIMEOUT)
    assert (workflow_id_seen, name, time_moved_on) == (workflow_id, reports_info.name, True)
    assert uuid.UUID(token).version == 4


# -- starting twice -----------------------------------------------------------------------


def test_starting_with_an_existing_workflow_id_returns_that_run(app: Celery) -> None:
    order = new_id("once")
    other = f"{order}-other"

    first = checkout.apply_async((order, ["x"]), workflow_id=order)
    second = checkout.apply_async((other, ["y", "z"]), workflow_id=order)

    assert first == second
    assert first.get(timeout=TIMEOUT) == {"receipt": f"receipt-{order}-1999", "held": [True]}
    third = checkout.apply_async((order, ["x"]), workflow_id=order)
    assert third.status == "SUCCESS"
    assert (calls[f"charge:{order}"], calls[f"charge:{other}"]) == (1, 0)
    assert store_for(app).require_run(order).turn == 3


# -- retrying a failed run ----------------------------------------------------------------


@durable_workflow
async def calls_flaky(key: str) -> list[str]:
    first = await charge.s(key, 5)
    return [first, await flaky.s(key)]


def test_retry_of_a_failed_run_runs_the_failed_step_again(app: Celery) -> None:
    key = new_id("flaky")
    failures_left[key] = 1
    handle = calls_flaky.delay(key)
    with pytest.raises(ConnectionError, match="service unavailable"):
        handle.get(timeout=TIMEOUT)

    handle.retry()

    assert handle.get(timeout=TIMEOUT) == [f"receipt-{key}-5", f"{key}: ok"]
    assert calls[f"flaky:{key}"] == 2
    assert calls[f"charge:{key}"] == 1


# -- code changed under a running workflow ------------------------------------------------

#: Flipped by the test to simulate deploying different code while a run waits.
code_changed = False
gate = threading.Event()
gate_reached = threading.Event()


@shared_task
def wait_at_gate(order_id: str) -> str:
    gate_reached.set()
    if not gate.wait(TIMEOUT):
        raise TimeoutError("the test never opened the gate")
    return f"passed-{order_id}"


@shared_task
def renamed_step(order_id: str) -> str:
    executed(f"renamed:{order_id}")
    return "renamed"


@durable_workflow
async def evolving(order_id: str) -> list[str]:
    if code_changed:
        first = await renamed_step.s(order_id)
    else:
        first = await wait_at_gate.s(order_id)
    return [first, await charge.s(order_id, 3)]


def test_changed_code_parks_the_run_as_stuck_and_retry_resumes_it(app: Celery) -> None:
    global code_changed
    order = new_id("order")
    gate.clear()
    gate_reached.clear()
    try:
        handle = evolving.delay(order)
        assert gate_reached.wait(TIMEOUT)  # turn 1 committed and its step is running

        code_changed = True  # "deploy" code that schedules a different first step
        celery_durable.driver.cache.clear()  # as a fresh worker would: replay
        gate.set()

        with pytest.raises(NonDeterminismError) as caught:
            handle.get(timeout=TIMEOUT)
        message = str(caught.value)
        assert handle.id in message
        assert wait_at_gate.name in message and renamed_step.name in message
        assert handle.status == "STUCK"
        assert [(s.seq, s.name, s.state) for s in handle.history] == [
            (1, wait_at_gate.name, "DONE")
        ]
        assert calls[f"renamed:{order}"] == 0

        code_changed = False  # deploy the fix
        handle.retry()

        assert handle.get(timeout=TIMEOUT) == [f"passed-{order}", f"receipt-{order}-3"]
        assert [s.name for s in handle.history] == [wait_at_gate.name, charge.name]
        assert calls[f"charge:{order}"] == 1
    finally:
        code_changed = False
        gate.set()


def test_a_new_handle_on_the_id_sees_the_same_run(app: Celery) -> None:
    handle = checkout.delay(new_id("order"), [])
    handle.get(timeout=TIMEOUT)
    other = WorkflowHandle[Any](handle.id, app=app)
    assert other.status == "SUCCESS"
    assert other.result == handle.result


# -- Celery's own retries of a step -------------------------------------------------------


@shared_task(bind=True, autoretry_for=(ConnectionError,), max_retries=3, default_retry_delay=0)
def retried_by_celery(self: Any, key: str) -> str:
    executed(f"retried:{key}")
    with _calls_lock:
        if failures_left[key] > 0:
            failures_left[key] -= 1
            raise ConnectionError(f"{key}: try again")
    return f"{key} after {self.request.retries} retries"


@durable_workflow
async def uses_celery_retries(key: str) -> str:
    return str(await retried_by_celery.s(key))


def test_a_step_retried_by_celery_records_only_its_final_outcome(app: Celery) -> None:
    key = new_id("retried")
    failures_left[key] = 2

    handle = uses_celery_retries.delay(key)

    assert handle.get(timeout=TIMEOUT) == f"{key} after 2 retries"
    [step] = handle.history
    assert (step.state, step.attempts, step.error) == ("DELIVERED", 3, None)
    assert calls[f"retried:{key}"] == 3


# -- what replay must reproduce -----------------------------------------------------------


@shared_task
def echo(value: Any) -> Any:
    return value


@durable_workflow
async def uses_start_time() -> list[Any]:
    first = await echo.s(workflow.info().start_time.isoformat())
    return [first, workflow.info().start_time.isoformat()]


@pytest.mark.parametrize("cache_size", [1000, 0], ids=["cached", "replayed"])
def test_start_time_is_the_same_in_every_turn(
    app: Celery, monkeypatch: pytest.MonkeyPatch, cache_size: int
) -> None:
    monkeypatch.setitem(app.conf, "durable_cache_size", cache_size)
    handle = uses_start_time.delay()
    seen_in_turn_1, seen_in_turn_2 = handle.get(timeout=TIMEOUT)
    assert seen_in_turn_1 == seen_in_turn_2


# -- single turns, driven by hand ---------------------------------------------------------


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


def turn(app: Celery, definition: Any, run_id: str) -> str | None:
    return RunDriver(app, definition.name, definition.fn, run_id).drive()


def finish_steps(app: Celery, run_id: str, *values: Any) -> None:
    store = _config.store_for(app)
    pending = [s for s in store.history(run_id) if s.state == "SCHEDULED"]
    for step, value in zip(pending, values, strict=True):
        store.record_outcome(run_id, step.seq, result=(JSON, json.dumps(value).encode()))


JSON = "application/json"


def test_turns_by_hand(idle_app: Celery) -> None:
    handle = checkout.apply_async(("o-1", ["a", "b"]), workflow_id="by-hand", app=idle_app)
    store = _config.store_for(idle_app)

    assert turn(idle_app, checkout, "by-hand") == "RUNNING"
    assert [s.name for s in store.history("by-hand")] == [charge.name]
    # A duplicate wake with nothing new to deliver changes nothing.
    assert turn(idle_app, checkout, "by-hand") == "RUNNING"
    assert store.require_run("by-hand").turn == 1

    finish_steps(idle_app, "by-hand", "r-1")
    assert turn(idle_app, checkout, "by-hand") == "RUNNING"
    finish_steps(idle_app, "by-hand", True, False)
    assert turn(idle_app, checkout, "by-hand") == "SUCCESS"

    assert handle.get(timeout=1) == {"receipt": "r-1", "held": [True, False]}
    assert turn(idle_app, checkout, "by-hand") == "SUCCESS"  # a late wake: nothing to do
    assert store.require_run("by-hand").turn == 3


def test_a_wake_for_an_unknown_run_is_ignored(idle_app: Celery) -> None:
    assert turn(idle_app, checkout, "never-started") is None


def test_a_turn_that_loses_the_race_writes_nothing_and_wakes_the_run_again(
    idle_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout.apply_async(("o-1", ["a"]), workflow_id="raced", app=idle_app)
    store = _config.store_for(idle_app)
    real_commit = store.commit_turn
    racing: list[str | None] = []

    def commit_after_a_rival(*args: Any, **kwargs: Any) -> bool:
        if not racing:
            # Another worker runs the same turn to completion in between.
            racing.append("rival started")
            racing[0] = turn(idle_app, checkout, "raced")
        return real_commit(*args, **kwargs)

    wakes: list[str] = []
    monkeypatch.setattr(store, "commit_turn", commit_after_a_rival)
    monkeypatch.setattr(
        celery_durable.driver._driver,
        "publish_wake",
        lambda app, workflow, run_id, options, producer=None: wakes.append(run_id),
    )

    assert turn(idle_app, checkout, "raced") is None  # fenced out
    assert racing == ["RUNNING"]
    assert wakes == ["raced"]
    assert [(s.seq, s.name) for s in store.history("raced")] == [(1, charge.name)]
    assert store.require_run("raced").turn == 1


def test_history_that_cannot_be_loaded_parks_the_run(
    idle_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkout.apply_async(("o-1", []), workflow_id="unloadable", app=idle_app)
    assert turn(idle_app, checkout, "unloadable") == "RUNNING"
    finish_steps(idle_app, "unloadable", "r-1")
    celery_durable.driver.cache.clear()

    def broken_history(run_id: str) -> list[Any]:
        raise RuntimeError("history table is corrupt")

    store = _config.store_for(idle_app)
    monkeypatch.setattr(store, "history", broken_history)
    assert turn(idle_app, checkout, "unloadable") == "STUCK"
    run = store.require_run("unloadable")
    assert run.status == "STUCK"
    assert run.error is not None and run.error["message"] == "history table is corrupt"


def test_a_turn_the_store_refuses_parks_the_run_as_stuck_with_the_reason(
    idle_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = checkout.apply_async(("o-1", ["a"]), workflow_id="refused", app=idle_app)
    store = _config.store_for(idle_app)

    def refuse(run_id: str, write: Any) -> None:
        raise HistoryWriteError(f"workflow run {run_id}: the store refused turn 1: bad value")

    monkeypatch.setattr(store, "commit_turn", refuse)
    assert turn(idle_app, checkout, "refused") == "STUCK"
    assert handle.status == "STUCK"
    with pytest.raises(HistoryWriteError, match="refused turn 1"):
        handle.get(timeout=1)


@durable_workflow
async def prices(sku: str) -> Any:
    return await echo.s(sku)


@durable_workflow
async def buys(sku: str) -> Any:
    return await prices.s(sku)


class Crash(BaseException):
    """The worker process dying (no ``except Exception`` stops it)."""


def test_a_crash_right_after_a_parent_cancelling_commit_leaves_the_child_to_the_sweeper(
    idle_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = buys.apply_async(("lamp",), workflow_id="crashing", app=idle_app)
    store = _config.store_for(idle_app)
    assert turn(idle_app, buys, "crashing") == "RUNNING"  # starts the child
    assert turn(idle_app, prices, "crashing/1") == "RUNNING"  # which waits on its task
    handle.cancel()

    def crash(*args: Any) -> None:
        raise Crash  # after the commit, before anything is published

    with monkeypatch.context() as patched:
        patched.setattr(RunDriver, "_publish", crash)
        with pytest.raises(Crash):
            turn(idle_app, buys, "crashing")

    assert handle.status == "CANCELLED"
    child = store.require_run("crashing/1")
    assert (child.status, child.cancel_requested) == ("RUNNING", True)
    # A stall period later the sweeper sends the wake the crash lost: the store's times
    # (all from the database's clock) are moved back by two periods.
    aged = 2 * _config.settings_for(idle_app).stall_timeout
    with store.engine.begin() as conn:
        for table in (_schema.runs, _schema.steps):
            conn.execute(
                update(table).values({c: c - aged for c in table.c if c.name.endswith("_at")})
            )
    woken: list[str] = []
    monkeypatch.setattr(
        celery_durable.worker._sweeper,
        "publish_wake",
        lambda app, workflow, run_id, options, producer=None: woken.append(run_id),
    )
    assert Sweeper(idle_app, "sweeper-test", "sweeper@test").sweep()["woken"] == 1
    assert woken == ["crashing/1"]
    assert turn(idle_app, prices, "crashing/1") == "CANCELLED"


def test_a_parent_cancelling_turn_publishes_its_children_wakes_from_the_commit(
    idle_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = buys.apply_async(("desk",), workflow_id="cancelling", app=idle_app)
    store = _config.store_for(idle_app)
    assert turn(idle_app, buys, "cancelling") == "RUNNING"
    assert turn(idle_app, prices, "cancelling/1") == "RUNNING"
    handle.cancel()

    def no_second_transaction(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the child's cancel request belongs in the parent's commit")

    wakes: list[str] = []
    monkeypatch.setattr(store, "request_cancel", no_second_transaction)
    monkeypatch.setattr(
        celery_durable.driver._driver,
        "publish_wake",
        lambda app, workflow, run_id, options, producer=None: wakes.append(run_id),
    )

    assert turn(idle_app, buys, "cancelling") == "CANCELLED"
    assert wakes == ["cancelling/1"]
    assert turn(idle_app, prices, "cancelling/1") == "CANCELLED"
