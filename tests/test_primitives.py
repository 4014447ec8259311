"""Durable timers, deterministic values, local steps, progress values and bad input.

End to end on an embedded worker (``memory://`` and SQLite). Replays are forced with
``durable_cache_size=0`` (every turn rebuilds the run from history), and nothing is
asserted about how long anything took: timeouts only bound the waiting.
"""

from __future__ import annotations

import asyncio
import math
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
from celery import Celery, shared_task
from click.testing import CliRunner

from celery_durable import (
    NotInWorkflowError,
    WorkflowEncodeError,
    durable_workflow,
    workflow,
)
from celery_durable._config import store_for
from celery_durable.cli import durable

pytestmark = pytest.mark.usefixtures("worker")

TIMEOUT = 30

calls: Counter[str] = Counter()
_lock = threading.Lock()


def executed(key: str) -> int:
    with _lock:
        calls[key] += 1
        return calls[key]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


@shared_task
def echo(value: Any) -> Any:
    return value


# -- durable timers -----------------------------------------------------------------------


@durable_workflow
async def sleeps(kind: str) -> list[str]:
    before = workflow.now()
    if kind == "asyncio":
        await asyncio.sleep(0.1)
    elif kind == "seconds":
        await workflow.sleep(0.1)
    else:
        await workflow.sleep(timedelta(milliseconds=100))
    after = workflow.now()
    return [before.isoformat(), after.isoformat()]


@pytest.mark.parametrize("kind", ["asyncio", "seconds", "timedelta"])
def test_a_sleep_is_a_durable_timer_step(app: Celery, cache_size: int, kind: str) -> None:
    handle = sleeps.delay(kind)

    before, after = handle.get(timeout=TIMEOUT)

    # The turn after the timer fired cannot be earlier than its deadline.
    slept = datetime.fromisoformat(after) - datetime.fromisoformat(before)
    assert slept >= timedelta(seconds=0.1)
    [timer] = handle.history
    assert (timer.kind, timer.state) == ("timer", "DELIVERED")
    # A timer's deadline is kept in SQL (not in a broker ETA), counted by the database's
    # clock from the commit of the turn that started it, which came after that turn.
    assert timer.due_at is not None
    assert timer.due_at - datetime.fromisoformat(before) >= timedelta(seconds=0.099)
    [row] = store_for(app).history(handle.id)
    assert (row.due_at or 0.0) - row.dispatched_at == pytest.approx(0.1, abs=1e-6)


@durable_workflow
async def sleeps_for_a_year() -> str:
    await workflow.sleep(timedelta(days=365))
    return "woke"


def test_a_long_sleep_waits_as_a_row_in_sql(app: Celery) -> None:
    handle = sleeps_for_a_year.delay()
    wait_until(lambda: len(handle.history) == 1, "the timer step")

    [timer] = handle.history
    assert (timer.kind, timer.state, handle.status) == ("timer", "SCHEDULED", "RUNNING")
    assert timer.due_at is not None
    [row] = store_for(app).history(handle.id)
    assert (row.due_at or 0.0) - row.dispatched_at == pytest.approx(365 * 86400.0)
    handle.terminate("test over")


#: Gates ``never_in_time`` waits at; all opened when each test ends.
gates: dict[str, threading.Event] = {}


@pytest.fixture(autouse=True)
def _open_gates() -> Iterator[None]:
    yield
    with _lock:
        for gate in gates.values():
            gate.set()


@shared_task
def never_in_time(key: str) -> str:
    # Stands in for a slow service: it finishes only once the test is over.
    with _lock:
        gate = gates.setdefault(key, threading.Event())
    gate.wait(TIMEOUT)
    return "too late"


@durable_workflow
async def races_a_deadline(key: str, how: str) -> dict[str, Any]:
    if how == "wait_for-fast":
        return {"result": await asyncio.wait_for(echo.s(key), 30)}
    if how == "wait_for-slow":
        try:
            await asyncio.wait_for(never_in_time.s(key), 0.1)
        except asyncio.TimeoutError:
            return {"result": "timed out"}
    if how == "timeout":
        try:
            async with asyncio.timeout(0.1):  # type: ignore[attr-defined]
                await never_in_time.s(key)
        except TimeoutError:
            return {"result": "timed out"}
    if how == "wait":
        fast = asyncio.ensure_future(echo.s(key))
        slow = asyncio.ensure_future(workflow.wait_for_signal("never"))
        done, pending = await asyncio.wait({fast, slow}, timeout=0.2)
        slow.cancel()
        return {"result": [len(done), len(pending), fast in done, fast.result()]}
    return {"result": "finished?"}


@pytest.mark.parametrize(
    ("how", "expected"),
    [
        ("wait_for-fast", "KEY"),
        ("wait_for-slow", "timed out"),
        pytest.param(
            "timeout",
            "timed out",
            marks=pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout: 3.11+"),
        ),
        ("wait", [1, 1, True, "KEY"]),
    ],
)
def test_asyncio_deadlines_work_on_durable_timers(
    app: Celery, cache_size: int, how: str, expected: Any
) -> None:
    key = new_id("deadline")
    expected = key if expected == "KEY" else expected
    if isinstance(expected, list):
        expected = [key if v == "KEY" else v for v in expected]

    handle = races_a_deadline.delay(key, how)

    assert handle.get(timeout=TIMEOUT) == {"result": expected}
    # Which of the step and its timer comes first depends on asyncio's version.
    kinds = sorted((s.kind, s.state) for s in handle.history)
    if how == "wait_for-fast":
        # The step won; the deadline's timer was cancelled.
        assert kinds == [("activity", "DELIVERED"), ("timer", "CANCELLED")]
    elif how == "wait":
        assert kinds == [
            ("activity", "DELIVERED"),
            ("signal", "CANCELLED"),
            ("timer", "DELIVERED"),
        ]
    else:
        # The deadline won; the step nobody waits for any more was cancelled.
        assert kinds == [("activity", "CANCELLED"), ("timer", "DELIVERED")]


# -- deterministic values -----------------------------------------------------------------


@durable_workflow
async def records_values(rounds: int) -> list[Any]:
    seen = []
    for _ in range(rounds):
        value = [
            workflow.now().isoformat(),
            str(workflow.uuid4()),
            workflow.random().randint(0, 10**9),
        ]
        seen.append(value)
        await echo.s(value)  # each round's values are recorded as the step's argument
    return seen


def test_now_uuid4_and_random_are_the_same_on_replay(app: Celery, cache_size: int) -> None:
    handle = records_values.delay(4)

    seen = handle.get(timeout=TIMEOUT)

    # The last turn computed every round again (replaying, when the cache is off) and got
    # exactly what each round first recorded.
    assert seen == [step.args[0] for step in handle.history]
    times = [datetime.fromisoformat(t) for t, _, _ in seen]
    assert times == sorted(times)  # now() never goes backwards
    assert all(t.utcoffset() == timedelta(0) for t in times)
    tokens = [uuid.UUID(u) for _, u, _ in seen]
    assert all(t.version == 4 for t in tokens) and len(set(tokens)) == len(tokens)


def test_two_runs_get_different_random_values(app: Celery) -> None:
    first = records_values.delay(1).get(timeout=TIMEOUT)
    second = records_values.delay(1).get(timeout=TIMEOUT)
    assert first[0][1:] != second[0][1:]


@durable_workflow
async def now_across_a_replay(key: str) -> list[str]:
    first = workflow.now()
    await workflow.wait_for_signal("go")
    return [first.isoformat(), workflow.now().isoformat()]


def test_now_never_goes_back_when_the_run_is_rebuilt_from_history(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(app.conf, "durable_cache_size", 0)  # the second turn replays the first
    handle = now_across_a_replay.delay(new_id("clear"))
    wait_until(lambda: len(handle.history) == 1, "the signal wait")

    handle.signal("go")

    first, second = (datetime.fromisoformat(t) for t in handle.get(timeout=TIMEOUT))
    assert second >= first
    assert first == handle.describe()["started_at"]


@durable_workflow
async def reports_info() -> dict[str, Any]:
    info = workflow.info()
    return {
        "id": info.workflow_id,
        "name": info.name,
        "attempt": info.attempt,
        "parent": info.parent_id,
        "start": info.start_time.isoformat(),
    }


@durable_workflow
async def parent_of_reporter() -> dict[str, Any]:
    return {"me": workflow.info().workflow_id, "child": await reports_info.s()}


def test_info_describes_the_run(app: Celery) -> None:
    run_id = new_id("info")
    handle = reports_info.apply_async(workflow_id=run_id)

    info = handle.get(timeout=TIMEOUT)

    assert info == {
        "id": run_id,
        "name": reports_info.name,
        "attempt": 1,
        "parent": None,
        "start": handle.describe()["started_at"].isoformat(),
    }


def test_info_of_a_child_names_its_parent(app: Celery) -> None:
    result = parent_of_reporter.delay().get(timeout=TIMEOUT)
    assert result["child"]["parent"] == result["me"]
    assert result["child"]["id"].startswith(result["me"])
    assert result["child"]["name"] == reports_info.name


# -- local steps --------------------------------------------------------------------------


def read_counter(key: str) -> int:
    return executed(f"local:{key}")


async def read_counter_async(key: str) -> int:
    await asyncio.sleep(0)  # a real coroutine, run inside the driver
    return executed(f"local:{key}") * 10


class LocalFailure(Exception):
    pass


def fails_locally(key: str) -> None:
    executed(f"local:{key}")
    raise LocalFailure(f"{key}: the fast API said no")


def returns_unencodable(key: str) -> object:
    executed(f"local:{key}")
    return object()


@durable_workflow
async def uses_local_steps(key: str, kind: str) -> Any:
    if kind == "sync":
        value = await workflow.step(read_counter, key)
    elif kind == "async":
        value = await workflow.step(read_counter_async, key=key)
    elif kind == "error":
        try:
            await workflow.step(fails_locally, key)
        except LocalFailure as exc:
            value = f"caught {type(exc).__name__}: {exc}"
    else:
        try:
            await workflow.step(returns_unencodable, key)
        except WorkflowEncodeError as exc:
            value = f"caught {type(exc).__name__}: {exc}"
    await echo.s(value)  # more turns after the local step: it is replayed, not re-run
    await echo.s(value)
    return value


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("sync", 1),
        ("async", 10),
        ("error", "caught LocalFailure: {key}: the fast API said no"),
    ],
)
def test_a_local_step_runs_once_and_its_outcome_is_replayed(
    app: Celery, cache_size: int, kind: str, expected: Any
) -> None:
    key = new_id("local")
    handle = uses_local_steps.delay(key, kind)

    value = handle.get(timeout=TIMEOUT)

    assert value == (expected.format(key=key) if isinstance(expected, str) else expected)
    assert calls[f"local:{key}"] == 1
    local = handle.history[0]
    assert (local.kind, local.state) == ("local", "DELIVERED")
    assert local.name.endswith(
        {"sync": "read_counter", "async": "read_counter_async", "error": "fails_locally"}[kind]
    )
    if kind == "error":
        assert local.error is not None and local.error["type"] == "LocalFailure"
    else:
        assert local.result == value


def test_a_local_step_with_an_unencodable_result_fails_clearly(app: Celery) -> None:
    key = new_id("local")
    handle = uses_local_steps.delay(key, "unencodable")

    message = handle.get(timeout=TIMEOUT)

    assert message.startswith("caught WorkflowEncodeError: the result of local step 1")
    assert "returns_unencodable" in message and handle.id in message
    assert calls[f"local:{key}"] == 1


@durable_workflow
async def local_step_of_a_non_function() -> str:
    try:
        await workflow.step(42)  # type: ignore[arg-type]
    except TypeError as exc:
        return str(exc)
    return "ran?"


def test_a_local_step_needs_a_function(app: Celery) -> None:
    handle = local_step_of_a_non_function.delay()
    message = handle.get(timeout=TIMEOUT)
    assert "workflow.step() needs a function" in message and handle.id in message


# -- progress values ----------------------------------------------------------------------


@durable_workflow
async def reports_progress(items: int) -> str:
    workflow.set_status("stage", "started")
    for done in range(1, items + 1):
        await echo.s(done)
        workflow.set_status("done", done)
    workflow.set_status("stage", "waiting for approval")
    await workflow.wait_for_signal("approve")
    workflow.set_status("stage", "approved")
    return "ok"


def test_set_status_is_visible_while_the_run_is_in_flight(app: Celery) -> None:
    handle = reports_progress.delay(3)

    wait_until(
        lambda: handle.describe()["status_values"].get("stage") == "waiting for approval",
        "the run to report that it waits",
    )
    described = handle.describe()
    assert described["status"] == "RUNNING"
    assert described["status_values"] == {"stage": "waiting for approval", "done": 3}

    # `celery durable show` prints them too.
    shown = CliRunner().invoke(durable, ["show", handle.id], obj=SimpleNamespace(app=app))
    assert shown.exit_code == 0, shown.output
    assert 'status values: {"stage": "waiting for approval", "done": 3}' in shown.output

    handle.signal("approve")
    assert handle.get(timeout=TIMEOUT) == "ok"
    assert handle.describe()["status_values"] == {"stage": "approved", "done": 3}


@durable_workflow
async def reports_unencodable_status(kind: str) -> str:
    try:
        workflow.set_status("when", datetime(2024, 1, 1) if kind == "datetime" else math.nan)
    except WorkflowEncodeError as exc:
        return str(exc)
    return "set?"


@pytest.mark.parametrize("kind", ["datetime", "nan"])
def test_a_status_value_that_is_not_json_is_refused(app: Celery, kind: str) -> None:
    handle = reports_unencodable_status.delay(kind)
    message = handle.get(timeout=TIMEOUT)
    assert "'when' is not JSON-able" in message and handle.id in message


# -- bad input ----------------------------------------------------------------------------


@durable_workflow
async def sleeps_badly(how: str) -> str:
    try:
        if how == "negative":
            await workflow.sleep(-1)
        elif how == "nan":
            await workflow.sleep(math.nan)
        elif how == "absurd":
            await workflow.sleep(timedelta(days=3651))
        elif how == "milliseconds":
            await workflow.sleep(1_700_000_000_000)
        elif how == "asyncio-nan":
            await asyncio.sleep(math.nan)
        elif how == "asyncio-absurd":
            await asyncio.sleep(1e12)
        elif how == "asyncio-inf":
            await asyncio.sleep(math.inf)
        elif how == "wait_for-nan":
            await asyncio.wait_for(echo.s(1), math.nan)
        elif how == "signal-negative":
            await workflow.wait_for_signal("x", timeout=-5)
        elif how == "signal-absurd":
            await workflow.wait_for_signal("x", timeout=timedelta(days=10_000))
        elif how == "execute-zero":
            await workflow.execute(echo.s(1), start_to_close=0)
        elif how == "execute-negative":
            await workflow.execute(echo.s(1), schedule_to_close=-1)
    except ValueError as exc:
        return str(exc)
    return "accepted"


@pytest.mark.parametrize(
    "how",
    [
        "negative",
        "nan",
        "absurd",
        "milliseconds",
        "asyncio-nan",
        "asyncio-absurd",
        "asyncio-inf",
        "wait_for-nan",
        "signal-negative",
        "signal-absurd",
        "execute-zero",
        "execute-negative",
    ],
)
def test_bad_durations_are_a_value_error_naming_the_run(app: Celery, how: str) -> None:
    handle = sleeps_badly.delay(how)

    message = handle.get(timeout=TIMEOUT)

    assert message != "accepted"
    if how == "asyncio-nan" and sys.version_info >= (3, 13):
        assert "NaN" in message  # Python's own check comes first
    else:
        assert handle.id in message and sleeps_badly.name in message
    assert not [s for s in handle.history if s.kind == "timer"]  # no timer was started


@durable_workflow
async def sleeps_zero() -> str:
    await workflow.sleep(0)
    await asyncio.sleep(0)
    return "ok"


def test_a_zero_sleep_returns_at_once(app: Celery) -> None:
    handle = sleeps_zero.delay()
    assert handle.get(timeout=TIMEOUT) == "ok"
    assert handle.history == []


@pytest.mark.parametrize(
    ("call", "label"),
    [
        (lambda: workflow.now(), "workflow.now()"),
        (lambda: workflow.uuid4(), "workflow.uuid4()"),
        (lambda: workflow.random(), "workflow.random()"),
        (lambda: workflow.info(), "workflow.info()"),
        (lambda: workflow.set_status("k", 1), "workflow.set_status()"),
        (lambda: workflow.continue_as_new(1), "workflow.continue_as_new()"),
        (lambda: workflow.patched("p"), "workflow.patched()"),
        (lambda: asyncio.run(workflow.sleep(1)), "workflow.sleep()"),
        (lambda: asyncio.run(workflow.step(print)), "workflow.step()"),
        (lambda: asyncio.run(workflow.wait_for_signal("s")), "workflow.wait_for_signal()"),
        (lambda: asyncio.run(workflow.execute(echo.s(1))), "workflow.execute()"),
    ],
)
def test_helpers_outside_a_workflow_raise_not_in_workflow(
    call: Callable[[], Any], label: str
) -> None:
    with pytest.raises(NotInWorkflowError) as raised:
        call()
    assert label in str(raised.value) and "@durable_workflow" in str(raised.value)
