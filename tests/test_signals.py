"""Signals: ``handle.signal(name, payload)`` and ``workflow.wait_for_signal(name, timeout)``.

Orderings are made certain with the signals themselves (a wait on ``"go"`` holds the
workflow before a wait exists), never with sleeps in the test.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery

from celery_durable import (
    DurableError,
    SignalError,
    WorkflowEncodeError,
    WorkflowHandle,
    durable_workflow,
    workflow,
)

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


def waits_on(handle: WorkflowHandle[Any], name: str) -> Callable[[], bool]:
    """True once the run has an open wait for signal ``name``."""
    return lambda: any(
        s.kind == "signal" and s.name == name and s.state == "SCHEDULED" for s in handle.history
    )


@durable_workflow
async def collects(names: list[str]) -> list[Any]:
    await workflow.wait_for_signal("go")
    return [await workflow.wait_for_signal(name) for name in names]


def test_a_signal_waited_for_returns_its_payload(app: Celery, cache_size: int) -> None:
    handle = collects.delay(["order"])
    wait_until(waits_on(handle, "go"), "the wait")

    handle.signal("go")
    wait_until(waits_on(handle, "order"), "the second wait")
    handle.signal("order", {"id": "o-1", "items": [1, 2]})

    assert handle.get(timeout=TIMEOUT) == [{"id": "o-1", "items": [1, 2]}]
    assert [(s.kind, s.name, s.state, s.result) for s in handle.history] == [
        ("signal", "go", "DELIVERED", None),
        ("signal", "order", "DELIVERED", {"id": "o-1", "items": [1, 2]}),
    ]


def test_signals_sent_before_the_wait_are_buffered_in_order(app: Celery, cache_size: int) -> None:
    handle = collects.delay(["item", "item", "item"])
    wait_until(waits_on(handle, "go"), "the run to wait for go")

    # None of the item waits exists yet: these are buffered.
    for n in range(3):
        handle.signal("item", n)
    handle.signal("go")

    assert handle.get(timeout=TIMEOUT) == [0, 1, 2]


def test_a_signal_can_be_sent_before_the_run_has_started(app: Celery) -> None:
    run_id = new_id("early")
    handle = collects.apply_async((["item"],), workflow_id=run_id)
    handle.signal("item", "early")
    handle.signal("go")
    assert handle.get(timeout=TIMEOUT) == ["early"]


def test_signals_of_different_names_are_independent(app: Celery, cache_size: int) -> None:
    handle = collects.delay(["a", "b", "a"])
    wait_until(waits_on(handle, "go"), "the run to wait for go")

    handle.signal("b", "b1")
    handle.signal("a", "a1")
    handle.signal("a", "a2")
    handle.signal("go")

    assert handle.get(timeout=TIMEOUT) == ["a1", "b1", "a2"]


@durable_workflow
async def counts_signals() -> list[Any]:
    """Takes every ``item`` until ``stop``; each signal must arrive exactly once."""
    import asyncio

    items = []
    stop = asyncio.ensure_future(workflow.wait_for_signal("stop"))
    while True:
        item = asyncio.ensure_future(workflow.wait_for_signal("item"))
        done, _ = await asyncio.wait({item, stop}, return_when=asyncio.FIRST_COMPLETED)
        if item in done:
            items.append(item.result())
            continue
        item.cancel()
        return items


def test_several_signals_of_one_name_are_each_delivered_once(app: Celery, cache_size: int) -> None:
    handle = counts_signals.delay()
    wait_until(waits_on(handle, "item"), "the run to wait")

    for n in range(5):
        handle.signal("item", n)
    wait_until(
        lambda: sum(s.name == "item" and s.state == "DELIVERED" for s in handle.history) == 5,
        "every item to be delivered",
    )
    handle.signal("stop")

    assert handle.get(timeout=TIMEOUT) == [0, 1, 2, 3, 4]


@durable_workflow
async def waits_with_timeout(seconds: float) -> str:
    try:
        return str(await workflow.wait_for_signal("approve", timeout=seconds))
    except TimeoutError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_a_wait_that_times_out_raises_timeout_error(app: Celery, cache_size: int) -> None:
    handle = waits_with_timeout.delay(0.1)

    message = handle.get(timeout=TIMEOUT)

    assert message.startswith("TimeoutError: ")
    assert "no signal 'approve' within 0.1 s" in message and handle.id in message
    assert sorted((s.kind, s.state) for s in handle.history) == [
        ("signal", "CANCELLED"),
        ("timer", "DELIVERED"),
    ]


def test_a_signal_within_the_timeout_wins(app: Celery) -> None:
    handle = waits_with_timeout.delay(3600)
    handle.signal("approve", "yes")
    assert handle.get(timeout=TIMEOUT) == "yes"
    assert sorted((s.kind, s.state) for s in handle.history) == [
        ("signal", "DELIVERED"),
        ("timer", "CANCELLED"),
    ]


@durable_workflow
async def polls_for_signals(polls: int) -> list[Any]:
    """Takes what is buffered, never waiting: ``timeout=0``."""
    await workflow.wait_for_signal("go")
    taken = []
    for _ in range(polls):
        try:
            taken.append(await workflow.wait_for_signal("item", timeout=0))
        except TimeoutError:
            taken.append("none")
    return taken


def test_a_zero_timeout_takes_a_buffered_signal_or_times_out(app: Celery, cache_size: int) -> None:
    handle = polls_for_signals.delay(3)
    wait_until(waits_on(handle, "go"), "the run to wait for go")

    handle.signal("item", "a")
    handle.signal("item", "b")
    handle.signal("go")

    assert handle.get(timeout=TIMEOUT) == ["a", "b", "none"]


@durable_workflow
async def waits_with_a_bad_timeout() -> list[Any]:
    with contextlib.suppress(ValueError):
        await workflow.wait_for_signal("item", timeout=-1)
    return [await workflow.wait_for_signal("item")]


def test_a_bad_timeout_leaves_no_wait_behind_to_take_a_signal(app: Celery) -> None:
    handle = waits_with_a_bad_timeout.delay()
    handle.signal("item", 1)
    assert handle.get(timeout=TIMEOUT) == [1]
    assert [s.name for s in handle.history] == ["item"]


@durable_workflow
async def retries_after_a_timeout() -> list[Any]:
    try:
        await workflow.wait_for_signal("answer", timeout=0.05)
    except TimeoutError:
        workflow.set_status("timed_out", True)
    await workflow.wait_for_signal("go")
    return [await workflow.wait_for_signal("answer")]


def test_a_signal_after_a_timed_out_wait_is_kept_for_the_next_wait(
    app: Celery, cache_size: int
) -> None:
    handle = retries_after_a_timeout.delay()
    wait_until(
        lambda: handle.describe()["status_values"].get("timed_out") is True, "the first wait"
    )

    handle.signal("answer", 42)  # late for the first wait, buffered for the next
    handle.signal("go")

    assert handle.get(timeout=TIMEOUT) == [42]


def test_signalling_a_finished_run_is_a_signal_error(app: Celery) -> None:
    handle = waits_with_timeout.delay(3600)
    handle.signal("approve", "yes")
    handle.get(timeout=TIMEOUT)

    with pytest.raises(SignalError, match=r"has finished \(SUCCESS\)") as raised:
        handle.signal("approve", "again")
    assert handle.id in str(raised.value) and waits_with_timeout.name in str(raised.value)
    assert isinstance(raised.value, DurableError)


def test_signalling_an_unknown_run_is_a_signal_error(app: Celery) -> None:
    with pytest.raises(SignalError, match="no such run") as raised:
        WorkflowHandle("no-such-run", app=app).signal("approve")
    assert "'no-such-run'" in str(raised.value)


def test_an_unencodable_payload_is_refused_naming_the_run(app: Celery) -> None:
    handle = waits_with_timeout.delay(3600)

    with pytest.raises(WorkflowEncodeError) as raised:
        handle.signal("approve", {"at": object()})

    assert handle.id in str(raised.value) and "'approve'" in str(raised.value)
    # Nothing was delivered: the run still waits, and a good payload still works.
    handle.signal("approve", "fine")
    assert handle.get(timeout=TIMEOUT) == "fine"


@durable_workflow
async def waits_for_a_bad_name(name: Any) -> str:
    try:
        await workflow.wait_for_signal(name)
    except ValueError as exc:
        return str(exc)
    return "waited?"


@pytest.mark.parametrize("name", ["", 7])
def test_a_signal_name_must_be_a_non_empty_string(app: Celery, name: Any) -> None:
    handle = waits_for_a_bad_name.delay(name)
    message = handle.get(timeout=TIMEOUT)
    assert "a signal name must be a non-empty string" in message and handle.id in message
