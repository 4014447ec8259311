"""Child workflows: ``await other_workflow.s(...)`` inside a workflow."""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from typing import Any

import pytest
from celery import Celery, shared_task

from celery_durable import (
    WorkflowArgumentsError,
    WorkflowCancelledError,
    WorkflowHandle,
    durable_workflow,
    workflow,
)

pytestmark = pytest.mark.usefixtures("worker")

TIMEOUT = 30

calls: Counter[str] = Counter()
_lock = threading.Lock()


class OutOfStock(Exception):
    pass


@shared_task
def price(sku: str) -> int:
    with _lock:
        calls[f"price:{sku}"] += 1
    return len(sku) * 100


@durable_workflow
async def quote(sku: str, quantity: int) -> dict[str, Any]:
    if sku.startswith("sold-out"):
        raise OutOfStock(f"{sku} is sold out")
    return {"sku": sku, "total": int(await price.s(sku)) * quantity}


@durable_workflow
async def order(skus: list[str]) -> dict[str, Any]:
    first = await quote.s(skus[0], 1)
    rest = await asyncio.gather(*(quote.s(sku, 2) for sku in skus[1:]))
    return {"first": first, "rest": list(rest), "me": workflow.info().workflow_id}


def test_a_child_workflow_returns_its_result(app: Celery, cache_size: int) -> None:
    handle = order.delay(["ab", "abc", "abcd"])

    result = handle.get(timeout=TIMEOUT)

    assert result == {
        "first": {"sku": "ab", "total": 200},
        "rest": [{"sku": "abc", "total": 600}, {"sku": "abcd", "total": 800}],
        "me": handle.id,
    }
    steps = handle.history
    assert [(s.kind, s.name, s.state, s.args) for s in steps] == [
        ("child", quote.name, "DELIVERED", ["ab", 1]),
        ("child", quote.name, "DELIVERED", ["abc", 2]),
        ("child", quote.name, "DELIVERED", ["abcd", 2]),
    ]
    assert [s.result for s in steps] == [result["first"], *result["rest"]]
    # The parent's history names each child run; each is a run of its own.
    for step in steps:
        assert step.child_id is not None
        child: WorkflowHandle[Any] = WorkflowHandle(step.child_id, app=app)
        assert child.status == "SUCCESS"
        assert child.get(timeout=TIMEOUT) == step.result
        assert child.describe()["parent_id"] == handle.id
        assert [s.name for s in child.history] == [price.name]


@durable_workflow
async def order_with_fallback(sku: str) -> str:
    try:
        await quote.s(sku, 1)
    except OutOfStock as exc:
        return f"{type(exc).__name__}: {exc}"
    return "in stock"


def test_a_failed_child_raises_its_own_exception_type_in_the_parent(
    app: Celery, cache_size: int
) -> None:
    handle = order_with_fallback.delay("sold-out-lamp")

    assert handle.get(timeout=TIMEOUT) == "OutOfStock: sold-out-lamp is sold out"
    [step] = handle.history
    assert step.child_id is not None
    assert step.error is not None and step.error["type"] == "OutOfStock"
    child: WorkflowHandle[Any] = WorkflowHandle(step.child_id, app=app)
    assert child.status == "FAILURE"
    with pytest.raises(OutOfStock):
        child.get(timeout=TIMEOUT)


@durable_workflow
async def misquotes(sku: str) -> str:
    try:
        await quote.s(sku)  # quote takes a quantity too
    except WorkflowArgumentsError as exc:
        return str(exc)
    return "quoted"


def test_a_child_started_with_arguments_that_do_not_fit_fails_and_the_parent_sees_why(
    app: Celery,
) -> None:
    handle = misquotes.delay("lamp")

    message = handle.get(timeout=TIMEOUT)
    [step] = handle.history
    assert step.child_id is not None
    assert message.startswith(f"workflow {quote.name}[{step.child_id}]: the arguments")
    assert "quote(sku, quantity): missing a required argument: 'quantity'" in message
    assert WorkflowHandle(step.child_id, app=app).status == "FAILURE"


def test_an_unhandled_child_failure_fails_the_parent_with_it(app: Celery) -> None:
    handle = order.delay(["ab", "sold-out-x"])
    with pytest.raises(OutOfStock, match="sold-out-x is sold out"):
        handle.get(timeout=TIMEOUT)
    assert handle.status == "FAILURE"
    assert handle.traceback is not None and "OutOfStock" in handle.traceback


@durable_workflow
async def gathers_children(skus: list[str]) -> list[Any]:
    results = await asyncio.gather(*(quote.s(s, 1) for s in skus), return_exceptions=True)
    return [r if isinstance(r, dict) else f"{type(r).__name__}" for r in results]


def test_gather_of_children_with_return_exceptions(app: Celery) -> None:
    result = gathers_children.delay(["a", "sold-out-b", "cc"]).get(timeout=TIMEOUT)
    assert result == [
        {"sku": "a", "total": 100},
        "OutOfStock",
        {"sku": "cc", "total": 200},
    ]


@durable_workflow
async def grandparent() -> dict[str, Any]:
    return {"order": await order.s(["x", "yy"])}


def test_children_can_have_children(app: Celery) -> None:
    handle = grandparent.delay()
    result = handle.get(timeout=TIMEOUT)
    assert result["order"]["rest"] == [{"sku": "yy", "total": 400}]
    [step] = handle.history
    assert step.child_id is not None
    assert result["order"]["me"] == step.child_id


def test_a_child_run_is_started_once_even_when_the_parent_replays(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(app.conf, "durable_cache_size", 0)
    sku = "once-" + "z" * 5
    handle = order.delay([sku, sku + "q"])
    handle.get(timeout=TIMEOUT)
    # Two children, each priced once, however many times the parent replayed.
    assert calls[f"price:{sku}"] == 1
    assert calls[f"price:{sku}q"] == 1


@durable_workflow
async def slow_quote(sku: str) -> str:
    await workflow.sleep(3600)
    return sku


@durable_workflow
async def leaves_a_child_running() -> str:
    child = asyncio.ensure_future(slow_quote.s("lamp"))
    await asyncio.sleep(0)
    return "done" if not child.done() else "waited?"


def test_a_child_left_running_when_the_parent_ends_is_cancelled(app: Celery) -> None:
    handle = leaves_a_child_running.delay()

    assert handle.get(timeout=TIMEOUT) == "done"

    [step] = handle.history
    assert (step.kind, step.state) == ("child", "CANCELLED")
    assert step.child_id is not None
    child: WorkflowHandle[Any] = WorkflowHandle(step.child_id, app=app)
    with pytest.raises(WorkflowCancelledError):
        child.get(timeout=TIMEOUT)
