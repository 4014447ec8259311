"""Cancelling (``handle.cancel()``) and terminating (``handle.terminate()``) runs."""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, shared_task
from celery.worker import state as worker_state

from celery_durable import (
    DurableError,
    WorkflowCancelledError,
    WorkflowHandle,
    WorkflowNotFoundError,
    WorkflowTerminatedError,
    _config,
    durable_workflow,
    workflow,
)

pytestmark = pytest.mark.usefixtures("worker")

TIMEOUT = 30

calls: Counter[str] = Counter()
_lock = threading.Lock()


def executed(key: str) -> None:
    with _lock:
        calls[key] += 1


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def has_step(handle: WorkflowHandle[Any], kind: str, *states: str) -> Callable[[], bool]:
    """True once the run has a step of ``kind`` in one of ``states`` (default: open)."""
    states = states or ("SCHEDULED", "CLAIMED")
    return lambda: any(s.kind == kind and s.state in states for s in handle.history)


@shared_task
def charge(key: str) -> str:
    executed(f"charge:{key}")
    return f"receipt-{key}"


@shared_task
def refund(receipt: str) -> str:
    executed(f"refund:{receipt}")
    return f"refunded {receipt}"


@shared_task
def ship_later(key: str) -> str:
    executed(f"ship:{key}")
    return "shipped"


# -- cancel -------------------------------------------------------------------------------


@durable_workflow
async def waits_for_ever(key: str, on: str) -> str:
    if on == "timer":
        await workflow.sleep(3600)
    elif on == "signal":
        await workflow.wait_for_signal("never")
    else:
        # An ETA far away: the step's message waits in the worker until then.
        await ship_later.s(key).set(countdown=3600)
    return "finished?"


@pytest.mark.parametrize("on", ["timer", "signal", "activity"])
def test_cancel_raises_cancelled_error_at_the_current_await(
    app: Celery, cache_size: int, on: str
) -> None:
    kind = on
    handle = waits_for_ever.delay(new_id("cancel"), on)
    wait_until(has_step(handle, kind), "the run to wait")

    handle.cancel()

    with pytest.raises(WorkflowCancelledError, match="was cancelled") as raised:
        handle.get(timeout=TIMEOUT)
    assert handle.id in str(raised.value)
    assert handle.status == "CANCELLED"
    assert handle.ready() and not handle.successful() and not handle.failed()
    assert [(s.kind, s.state) for s in handle.history] == [(kind, "CANCELLED")]
    assert handle.describe()["cancel_requested"] is True


def test_cancel_revokes_a_pending_activity(app: Celery) -> None:
    key = new_id("revoke")
    handle = waits_for_ever.delay(key, "activity")
    wait_until(has_step(handle, "activity", "CLAIMED"), "the worker to hold the step")
    [step] = handle.history

    handle.cancel()

    with pytest.raises(WorkflowCancelledError):
        handle.get(timeout=TIMEOUT)
    # Best effort, and here it worked: the worker holding the ETA message revoked it.
    wait_until(lambda: step.task_id in worker_state.revoked, "the revoke to reach the worker")
    assert calls[f"ship:{key}"] == 0


@durable_workflow
async def saga(key: str) -> str:
    receipt = await charge.s(key)
    try:
        await workflow.wait_for_signal("shipped")
    except asyncio.CancelledError:
        # Compensate, then finish with a result of our own.
        return str(await refund.s(receipt))
    return "done"


def test_a_workflow_may_catch_cancellation_compensate_and_return(
    app: Celery, cache_size: int
) -> None:
    key = new_id("saga")
    handle = saga.delay(key)
    wait_until(has_step(handle, "signal"), "the run to wait")

    handle.cancel()

    assert handle.get(timeout=TIMEOUT) == f"refunded receipt-{key}"
    assert handle.status == "SUCCESS"
    assert [(s.kind, s.name, s.state) for s in handle.history] == [
        ("activity", charge.name, "DELIVERED"),
        ("signal", "shipped", "CANCELLED"),
        ("activity", refund.name, "DELIVERED"),
    ]
    assert (calls[f"charge:{key}"], calls[f"refund:receipt-{key}"]) == (1, 1)


@durable_workflow
async def cleans_up_then_reraises(key: str) -> None:
    try:
        await workflow.sleep(3600)
    finally:
        await refund.s(key)


def test_a_workflow_that_reraises_after_cleanup_ends_cancelled(app: Celery) -> None:
    key = new_id("finally")
    handle = cleans_up_then_reraises.delay(key)
    wait_until(has_step(handle, "timer"), "the run to sleep")

    handle.cancel()

    with pytest.raises(WorkflowCancelledError):
        handle.get(timeout=TIMEOUT)
    assert calls[f"refund:{key}"] == 1


@durable_workflow
async def slow_to_stop() -> str:
    try:
        await workflow.wait_for_signal("never")
    except asyncio.CancelledError:
        await workflow.wait_for_signal("stop")  # a second cancel would land here
        return "stopped once"
    return "not cancelled?"


def test_cancelling_twice_delivers_one_cancellation(app: Celery) -> None:
    handle = slow_to_stop.delay()
    wait_until(has_step(handle, "signal"), "the run to wait")

    handle.cancel()
    handle.cancel()
    wait_until(lambda: any(s.name == "stop" for s in handle.history), "the cancel to land")
    handle.signal("stop")

    assert handle.get(timeout=TIMEOUT) == "stopped once"


@durable_workflow
async def quick() -> str:
    return "done"


def test_cancelling_a_finished_run_is_an_error(app: Celery) -> None:
    handle = quick.delay()
    handle.get(timeout=TIMEOUT)

    with pytest.raises(DurableError, match=r"already finished \(SUCCESS\)") as raised:
        handle.cancel()
    assert handle.id in str(raised.value)
    assert handle.status == "SUCCESS"


def test_cancelling_an_unknown_run_is_an_error(app: Celery) -> None:
    with pytest.raises(WorkflowNotFoundError, match="'no-such-run'"):
        WorkflowHandle("no-such-run", app=app).cancel()


# -- children -----------------------------------------------------------------------------


@durable_workflow
async def child_waits(key: str) -> str:
    try:
        return str(await workflow.wait_for_signal("go"))
    except asyncio.CancelledError:
        await refund.s(f"child-{key}")
        raise


@durable_workflow
async def parent_of_waiting_child(key: str) -> str:
    return str(await child_waits.s(key))


def child_of(handle: WorkflowHandle[Any]) -> WorkflowHandle[Any]:
    wait_until(has_step(handle, "child"), "the child to start")
    [step] = [s for s in handle.history if s.kind == "child"]
    assert step.child_id is not None
    return WorkflowHandle(step.child_id, app=handle.app)


def test_cancelling_a_parent_cancels_its_child(app: Celery, cache_size: int) -> None:
    key = new_id("family")
    parent = parent_of_waiting_child.delay(key)
    child = child_of(parent)
    wait_until(has_step(child, "signal"), "the child to wait")

    parent.cancel()

    with pytest.raises(WorkflowCancelledError):
        parent.get(timeout=TIMEOUT)
    with pytest.raises(WorkflowCancelledError):
        child.get(timeout=TIMEOUT)
    assert calls[f"refund:child-{key}"] == 1  # the child's own compensation ran
    assert [(s.kind, s.state) for s in parent.history] == [("child", "CANCELLED")]


def test_cancelling_a_child_raises_in_its_parent(app: Celery) -> None:
    parent = parent_of_waiting_child.delay(new_id("orphan"))
    child = child_of(parent)
    wait_until(has_step(child, "signal"), "the child to wait")

    child.cancel()

    with pytest.raises(WorkflowCancelledError) as raised:
        parent.get(timeout=TIMEOUT)
    assert child.id in str(raised.value)
    assert parent.status == "FAILURE"  # the parent did not handle its child's end


# -- terminate ----------------------------------------------------------------------------


def test_terminate_ends_the_run_at_once_without_running_its_code(app: Celery) -> None:
    key = new_id("terminate")
    handle = cleans_up_then_reraises.delay(key)
    wait_until(has_step(handle, "timer"), "the run to sleep")

    handle.terminate("operator said so")

    assert handle.status == "TERMINATED"  # at once: no turn had to run
    with pytest.raises(WorkflowTerminatedError, match="operator said so") as raised:
        handle.get(timeout=TIMEOUT)
    assert handle.id in str(raised.value)
    assert handle.ready() and not handle.failed()
    assert [(s.kind, s.state) for s in handle.history] == [("timer", "CANCELLED")]
    assert calls[f"refund:{key}"] == 0  # its finally block did not run


def test_terminating_a_parent_terminates_its_child(app: Celery) -> None:
    key = new_id("terminate-family")
    parent = parent_of_waiting_child.delay(key)
    child = child_of(parent)
    wait_until(has_step(child, "signal"), "the child to wait")

    parent.terminate("abandoned")

    assert (parent.status, child.status) == ("TERMINATED", "TERMINATED")
    with pytest.raises(WorkflowTerminatedError, match="abandoned"):
        child.get(timeout=TIMEOUT)
    assert calls[f"refund:child-{key}"] == 0


@durable_workflow
async def grandparent_of_waiting_child(key: str) -> str:
    return str(await parent_of_waiting_child.s(key))


class Crash(BaseException):
    """The client process dying (no ``except Exception`` stops it)."""


def test_terminating_a_run_ends_its_whole_family_in_its_one_commit(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = new_id("terminate-tree")
    root = grandparent_of_waiting_child.delay(key)
    parent = child_of(root)
    child = child_of(parent)
    wait_until(has_step(child, "signal"), "the grandchild to wait")
    store = _config.store_for(app)
    commit = store.terminate

    def commit_then_crash(*args: Any, **kwargs: Any) -> Any:
        commit(*args, **kwargs)
        raise Crash  # before the client does anything after the commit

    monkeypatch.setattr(store, "terminate", commit_then_crash)
    with pytest.raises(Crash):
        root.terminate("abandoned")

    assert [h.status for h in (root, parent, child)] == ["TERMINATED"] * 3
    for handle in (root, parent, child):
        assert {s.state for s in handle.history} == {"CANCELLED"}
    with pytest.raises(WorkflowTerminatedError, match=f"with workflow .*{root.id}.*abandoned"):
        child.get(timeout=TIMEOUT)
    assert calls[f"refund:child-{key}"] == 0  # no code of any of them ran


def test_terminating_a_child_fails_its_parent_with_the_termination(app: Celery) -> None:
    parent = parent_of_waiting_child.delay(new_id("terminate-child"))
    child = child_of(parent)

    child.terminate("not needed")

    with pytest.raises(WorkflowTerminatedError, match="not needed"):
        parent.get(timeout=TIMEOUT)


def test_terminating_a_finished_run_is_an_error(app: Celery) -> None:
    handle = quick.delay()
    handle.get(timeout=TIMEOUT)
    with pytest.raises(DurableError, match="already finished") as raised:
        handle.terminate()
    assert handle.id in str(raised.value)


def test_a_signal_to_a_cancelled_run_is_refused(app: Celery) -> None:
    handle = waits_for_ever.delay(new_id("late"), "signal")
    wait_until(has_step(handle, "signal"), "the run to wait")
    handle.cancel()
    with pytest.raises(WorkflowCancelledError):
        handle.get(timeout=TIMEOUT)
    from celery_durable import SignalError

    with pytest.raises(SignalError, match="CANCELLED"):
        handle.signal("never")


# -- instances the driver drops -----------------------------------------------------------


@durable_workflow
async def compensates_in_finally(key: str) -> str:
    try:
        await workflow.sleep(0.01)
        return str(await charge.s(key))
    finally:
        await refund.s(key)


def test_a_dropped_instance_does_not_run_its_finally_blocks_later(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With no cache every turn's instance is dropped while suspended inside the try block.
    # Were it left to the garbage collector, its finally block would run outside any
    # workflow: the awaited step fails there ("exception ignored", an error under pytest).
    monkeypatch.setitem(app.conf, "durable_cache_size", 0)
    key = new_id("dropped")

    assert compensates_in_finally.delay(key).get(timeout=TIMEOUT) == f"receipt-{key}"
    gc.collect()

    assert (calls[f"charge:{key}"], calls[f"refund:{key}"]) == (1, 1)
