"""What failing means: FAILURE keeps the traceback, code that cannot replay parks the run
as STUCK with its history, and ``retry()`` resumes either once the cause is fixed."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, shared_task

from celery_durable import (
    DurableError,
    NonDeterminismError,
    WorkflowHandle,
    durable_workflow,
    workflow,
)

pytestmark = pytest.mark.usefixtures("worker")

TIMEOUT = 30

calls: Counter[str] = Counter()
failures_left: Counter[str] = Counter()
_lock = threading.Lock()

#: Flipped by tests to "deploy" code that no longer matches the history of runs in flight.
code = {"changed": False, "broken": False}


@pytest.fixture(autouse=True)
def _replay_every_turn(app: Celery, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Every turn rebuilds its run with the code of the moment, as a fresh worker would.
    monkeypatch.setitem(app.conf, "durable_cache_size", 0)
    yield
    code.update(changed=False, broken=False)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def waits_on(handle: WorkflowHandle[Any], name: str) -> Callable[[], bool]:
    return lambda: any(
        s.kind == "signal" and s.name == name and s.state == "SCHEDULED" for s in handle.history
    )


class LedgerMismatch(Exception):
    pass


@shared_task
def book(key: str, entry: str) -> str:
    with _lock:
        calls[f"book:{key}:{entry}"] += 1
    return entry


@shared_task
def settle(key: str) -> str:
    with _lock:
        calls[f"settle:{key}"] += 1
        if failures_left[key] > 0:
            failures_left[key] -= 1
            raise ConnectionError(f"{key}: bank offline")
    return f"{key} settled"


def check_ledger(key: str) -> None:
    raise LedgerMismatch(f"ledger of {key} is off by 3 cents")


@durable_workflow
async def reconciles(key: str) -> None:
    await book.s(key, "debit")
    check_ledger(key)


def test_an_exception_fails_the_run_and_keeps_its_traceback(app: Celery) -> None:
    handle = reconciles.delay("k-1")

    with pytest.raises(LedgerMismatch, match="off by 3 cents"):
        handle.get(timeout=TIMEOUT)

    assert handle.status == "FAILURE"
    assert handle.traceback is not None
    assert "check_ledger" in handle.traceback and "reconciles" in handle.traceback
    error = handle.describe()["error"]
    assert (error["type"], error["module"]) == ("LedgerMismatch", __name__)
    assert [(s.name, s.state) for s in handle.history] == [(book.name, "DELIVERED")]


@durable_workflow
async def books_twice(key: str) -> list[str]:
    first = await book.s(key, "debit")
    if code["changed"]:
        second = await settle.s(key)  # where history has the "credit" booking
    else:
        second = await book.s(key, "credit")
    await workflow.wait_for_signal("go")
    note = await workflow.wait_for_signal("note")
    return [first, second, note]


def test_code_that_no_longer_replays_parks_the_run_as_stuck(app: Celery) -> None:
    key = f"stuck-{time.monotonic_ns()}"
    handle = books_twice.delay(key)
    wait_until(waits_on(handle, "go"), "the run to book twice")

    code["changed"] = True  # deploy code that schedules a different second step
    handle.signal("go")

    with pytest.raises(NonDeterminismError) as raised:
        handle.get(timeout=TIMEOUT)
    message = str(raised.value)
    assert handle.id in message and settle.name in message and book.name in message
    assert isinstance(raised.value, DurableError)
    assert handle.status == "STUCK"
    assert not handle.ready()  # STUCK is not finished: it resumes after a fix
    assert isinstance(handle.result, NonDeterminismError)
    # Nothing is lost: the history is intact, and nothing of the new code ran.
    assert [(s.name, s.state) for s in handle.history] == [
        (book.name, "DELIVERED"),
        (book.name, "DELIVERED"),
        ("go", "DONE"),
    ]
    assert calls[f"settle:{key}"] == 0
    handle.signal("note", "sent while stuck")  # a stuck run still takes signals

    code["changed"] = False  # deploy the fix
    handle.retry()

    assert handle.get(timeout=TIMEOUT) == ["debit", "credit", "sent while stuck"]
    assert (calls[f"book:{key}:debit"], calls[f"book:{key}:credit"]) == (1, 1)
    assert handle.describe()["attempt"] == 2


@durable_workflow
async def breaks_on_replay(key: str) -> str:
    if code["broken"]:
        raise ImportError("cannot import name 'rates' from 'pricing'")
    await workflow.wait_for_signal("go")
    return "replayed fine"


def test_an_error_raised_while_replaying_parks_the_run_as_stuck(app: Celery) -> None:
    handle = breaks_on_replay.delay("k")
    wait_until(waits_on(handle, "go"), "the run to wait")

    code["broken"] = True  # a deploy with a broken import
    handle.signal("go")

    with pytest.raises(NonDeterminismError) as raised:
        handle.get(timeout=TIMEOUT)
    # The message says what went wrong in the code, not only that replay diverged.
    assert "ImportError: cannot import name 'rates' from 'pricing'" in str(raised.value)
    assert handle.status == "STUCK"
    assert [(s.name, s.state) for s in handle.history] == [("go", "DONE")]

    code["broken"] = False
    handle.retry()
    assert handle.get(timeout=TIMEOUT) == "replayed fine"


@durable_workflow
async def settles(key: str) -> dict[str, Any]:
    booked = await book.s(key, "debit")
    settled = await settle.s(key)
    return {"booked": booked, "settled": settled, "attempt": workflow.info().attempt}


def test_retry_of_a_failed_run_runs_the_failed_step_again(app: Celery) -> None:
    key = f"failed-{time.monotonic_ns()}"
    failures_left[key] = 1
    handle = settles.delay(key)
    with pytest.raises(ConnectionError, match="bank offline"):
        handle.get(timeout=TIMEOUT)
    assert handle.status == "FAILURE"

    handle.retry()

    assert handle.get(timeout=TIMEOUT) == {
        "booked": "debit",
        "settled": f"{key} settled",
        "attempt": 2,
    }
    assert calls[f"settle:{key}"] == 2  # the failed step ran again
    assert calls[f"book:{key}:debit"] == 1  # the step that had succeeded did not


@durable_workflow
async def waits_then_books(key: str) -> str:
    await workflow.wait_for_signal("go")
    return str(await book.s(key, "debit"))


def test_retry_of_a_run_that_did_not_fail_is_an_error(app: Celery) -> None:
    handle = waits_then_books.delay(f"running-{time.monotonic_ns()}")
    wait_until(waits_on(handle, "go"), "the run to wait")
    with pytest.raises(DurableError, match="only STUCK or FAILURE runs can be retried"):
        handle.retry()
    handle.signal("go")
    handle.get(timeout=TIMEOUT)
    with pytest.raises(DurableError, match="SUCCESS"):
        handle.retry()


#: Whether ``audit`` fails; flipped by the test to "fix" the child.
audit_fails = {"on": True}


@durable_workflow
async def audit(key: str) -> str:
    await book.s(key, "audit")
    if audit_fails["on"]:
        raise LedgerMismatch(f"{key}: audit failed")
    return f"{key} audited"


@durable_workflow
async def closes_the_books(key: str) -> str:
    return str(await audit.s(key))


def test_retry_of_a_run_failed_by_its_child_retries_the_child(app: Celery) -> None:
    key = f"audit-{time.monotonic_ns()}"
    handle = closes_the_books.delay(key)
    with pytest.raises(LedgerMismatch):
        handle.get(timeout=TIMEOUT)
    [step] = handle.history
    assert step.child_id is not None
    child: WorkflowHandle[Any] = WorkflowHandle(step.child_id, app=app)
    assert child.status == "FAILURE"

    audit_fails["on"] = False
    try:
        handle.retry()
        assert handle.get(timeout=TIMEOUT) == f"{key} audited"
    finally:
        audit_fails["on"] = True
    assert child.status == "SUCCESS"
    assert calls[f"book:{key}:audit"] == 1  # the child's own step was not run again


@durable_workflow
async def slow_audit(key: str) -> str:
    await workflow.wait_for_signal("never")
    return key


@durable_workflow
async def closes_the_books_slowly(key: str) -> str:
    return str(await slow_audit.s(key))


def test_retry_of_a_run_failed_by_a_terminated_child_is_refused(app: Celery) -> None:
    handle = closes_the_books_slowly.delay("k")
    wait_until(lambda: any(s.child_id for s in handle.history), "the child")
    [step] = handle.history
    assert step.child_id is not None
    child: WorkflowHandle[Any] = WorkflowHandle(step.child_id, app=app)
    wait_until(lambda: len(child.history) == 1, "the child to wait")
    child.terminate("not needed")
    with pytest.raises(DurableError, match="terminated"):
        handle.get(timeout=TIMEOUT)

    with pytest.raises(DurableError, match=r"ended TERMINATED, which cannot be retried") as raised:
        handle.retry()
    assert step.child_id in str(raised.value)
    assert handle.status == "FAILURE"  # left as it was
