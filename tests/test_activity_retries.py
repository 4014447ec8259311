"""``workflow.execute``: durable retries (RetryPolicy) and timeouts of an activity."""

from __future__ import annotations

import math
import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, shared_task

from celery_durable import (
    ActivityTimeoutError,
    RetryPolicy,
    durable_workflow,
    workflow,
)
from celery_durable._config import store_for

pytestmark = pytest.mark.usefixtures("worker")

TIMEOUT = 30

calls: Counter[str] = Counter()
failures_left: Counter[str] = Counter()
_lock = threading.Lock()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class CardDeclined(Exception):
    pass


@shared_task
def flaky(key: str, error: str = "ConnectionError") -> str:
    with _lock:
        calls[key] += 1
        if failures_left[key] > 0:
            failures_left[key] -= 1
            kind = {"ConnectionError": ConnectionError, "CardDeclined": CardDeclined}[error]
            raise kind(f"{key}: attempt {calls[key]} failed")
    return f"{key}: ok after {calls[key]} attempts"


#: Gates the "slow" task waits at; all opened when each test ends.
gates: dict[str, threading.Event] = {}


@pytest.fixture(autouse=True)
def _open_gates() -> Iterator[None]:
    yield
    with _lock:
        for gate in gates.values():
            gate.set()


@shared_task
def takes(key: str, slow: bool) -> str:
    """Finishes at once, or (``slow``) only once the test is over: never in time."""
    with _lock:
        calls[key] += 1
        gate = gates.setdefault(key, threading.Event())
    if slow:
        gate.wait(TIMEOUT)
    return "finished"


@durable_workflow
async def charges(key: str, error: str, policy: dict[str, Any]) -> str:
    return str(await workflow.execute(flaky.s(key, error), retry=RetryPolicy(**policy)))


def policy(**changes: Any) -> dict[str, Any]:
    base = {"max_attempts": 3, "initial_interval": 0.05, "backoff": 2.0, "max_interval": 0.5}
    return {**base, **changes}


def test_a_failing_activity_is_retried_on_durable_timers(app: Celery, cache_size: int) -> None:
    key = new_id("retry")
    failures_left[key] = 2

    handle = charges.delay(key, "ConnectionError", policy())

    assert handle.get(timeout=TIMEOUT) == f"{key}: ok after 3 attempts"
    assert calls[key] == 3
    assert [(s.kind, s.state) for s in handle.history] == [
        ("activity", "DELIVERED"),
        ("timer", "DELIVERED"),
        ("activity", "DELIVERED"),
        ("timer", "DELIVERED"),
        ("activity", "DELIVERED"),
    ]
    # Each wait is the policy's interval after the turn that saw the failure committed
    # (by the database's clock, like the deadline): 0.05 s, then 0.1 s.
    records = store_for(app).history(handle.id)
    waits = [(r.due_at or 0.0) - r.dispatched_at for r in records if r.kind == "timer"]
    assert waits == pytest.approx([0.05, 0.1], abs=1e-5)


def test_retries_stop_after_max_attempts_with_the_task_s_exception(app: Celery) -> None:
    key = new_id("exhausted")
    failures_left[key] = 10

    handle = charges.delay(key, "ConnectionError", policy(max_attempts=2))

    with pytest.raises(ConnectionError, match="attempt 2 failed"):
        handle.get(timeout=TIMEOUT)
    assert calls[key] == 2
    assert [s.kind for s in handle.history] == ["activity", "timer", "activity"]


@durable_workflow
async def charges_once(key: str, how: str) -> str:
    kind: Any = CardDeclined if how == "type" else "CardDeclined"
    retry = RetryPolicy(max_attempts=5, initial_interval=0.05, non_retryable=[kind])
    return str(await workflow.execute(flaky.s(key, "CardDeclined"), retry=retry))


@pytest.mark.parametrize("how", ["type", "name"])
def test_non_retryable_errors_fail_at_once(app: Celery, how: str) -> None:
    key = new_id("declined")
    failures_left[key] = 10

    with pytest.raises(CardDeclined):
        charges_once.delay(key, how).get(timeout=TIMEOUT)
    assert calls[key] == 1


@durable_workflow
async def one_attempt(key: str) -> str:
    return str(await workflow.execute(flaky.s(key)))


def test_without_a_policy_there_is_one_attempt(app: Celery) -> None:
    key = new_id("once")
    failures_left[key] = 1

    with pytest.raises(ConnectionError):
        one_attempt.delay(key).get(timeout=TIMEOUT)
    assert calls[key] == 1


def test_retry_policy_intervals() -> None:
    retry = RetryPolicy(initial_interval=1, backoff=3, max_interval=20)
    assert [retry.interval(n) for n in range(1, 6)] == [1, 3, 9, 20, 20]
    assert not RetryPolicy(non_retryable=[KeyError]).retryable(KeyError("k"))
    assert not RetryPolicy(non_retryable=["KeyError"]).retryable(KeyError("k"))
    assert RetryPolicy(non_retryable=["KeyError"]).retryable(ValueError("v"))
    # A subclass of a non-retryable type is not retried either.
    assert not RetryPolicy(non_retryable=[LookupError]).retryable(KeyError("k"))


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"max_attempts": -1}, "max_attempts must be an int >= 0"),
        ({"initial_interval": -1}, "initial_interval must be seconds >= 0"),
        ({"initial_interval": math.nan}, "initial_interval must be seconds >= 0"),
        ({"backoff": 0.5}, "backoff must be a factor >= 1"),
        ({"initial_interval": 10, "max_interval": 5}, "max_interval must be at least"),
    ],
)
def test_a_retry_policy_that_makes_no_sense_is_refused(
    options: dict[str, Any], problem: str
) -> None:
    with pytest.raises(ValueError, match=problem):
        RetryPolicy(**options)


# -- timeouts -----------------------------------------------------------------------------


@durable_workflow
async def times_out(key: str, slow: bool, limits: dict[str, float], attempts: int) -> str:
    retry = RetryPolicy(max_attempts=attempts, initial_interval=0.05)
    try:
        return str(await workflow.execute(takes.s(key, slow), retry=retry, **limits))
    except ActivityTimeoutError as exc:
        return f"{type(exc).__name__}: {exc}"


def test_start_to_close_fails_a_slow_attempt_with_activity_timeout_error(
    app: Celery, cache_size: int
) -> None:
    key = new_id("slow")
    handle = times_out.delay(key, True, {"start_to_close": 0.1}, 1)

    message = handle.get(timeout=TIMEOUT)

    assert message.startswith("ActivityTimeoutError: ")
    assert "start_to_close timeout (0.1 s)" in message and handle.id in message
    assert takes.name in message
    assert sorted((s.kind, s.state) for s in handle.history) == [
        ("activity", "CANCELLED"),
        ("timer", "DELIVERED"),
    ]


def test_a_timed_out_attempt_is_retried(app: Celery) -> None:
    key = new_id("slow-retried")
    handle = times_out.delay(key, True, {"start_to_close": 0.05}, 2)
    assert handle.get(timeout=TIMEOUT).startswith("ActivityTimeoutError: ")
    activities = [s for s in handle.history if s.kind == "activity"]
    assert [s.state for s in activities] == ["CANCELLED", "CANCELLED"]


def test_an_attempt_within_start_to_close_succeeds(app: Celery) -> None:
    key = new_id("in-time")
    assert times_out.delay(key, False, {"start_to_close": 30}, 1).get(timeout=TIMEOUT) == "finished"


def test_schedule_to_close_bounds_all_attempts_together(app: Celery) -> None:
    key = new_id("overall")
    handle = times_out.delay(key, True, {"schedule_to_close": 0.1}, 0)

    message = handle.get(timeout=TIMEOUT)

    assert message.startswith("ActivityTimeoutError: ")
    assert "schedule_to_close timeout (0.1 s)" in message


@durable_workflow
async def retries_until_the_deadline(key: str) -> list[str]:
    retry = RetryPolicy(max_attempts=0, initial_interval=0.05, backoff=1.0)
    try:
        await workflow.execute(flaky.s(key), retry=retry, schedule_to_close=0.3)
    except ActivityTimeoutError as exc:
        return [str(exc), type(exc.__cause__).__name__]
    return ["succeeded?"]


def test_schedule_to_close_stops_unlimited_retries(app: Celery, cache_size: int) -> None:
    key = new_id("unlimited")
    failures_left[key] = 1000

    handle = retries_until_the_deadline.delay(key)

    message, cause = handle.get(timeout=TIMEOUT)
    assert "schedule_to_close timeout (0.3 s)" in message and handle.id in message
    assert cause in ("ConnectionError", "NoneType")  # the last attempt's error, if it had one
    attempts = [s for s in handle.history if s.kind == "activity"]
    assert len(attempts) == calls[key] >= 1
    assert not [s for s in handle.history if s.state in ("SCHEDULED", "CLAIMED")]


# -- Celery's own retries underneath ------------------------------------------------------


@shared_task(bind=True, autoretry_for=(ConnectionError,), max_retries=3, default_retry_delay=0)
def retried_by_celery(self: Any, key: str) -> str:
    with _lock:
        calls[key] += 1
        if failures_left[key] > 0:
            failures_left[key] -= 1
            raise ConnectionError(f"{key}: try again")
    return f"{key} after {self.request.retries} celery retries"


@durable_workflow
async def uses_both_retries(key: str) -> str:
    retry = RetryPolicy(max_attempts=2, initial_interval=0.05)
    return str(await workflow.execute(retried_by_celery.s(key), retry=retry))


def test_celery_autoretry_still_works_under_execute(app: Celery) -> None:
    key = new_id("autoretry")
    failures_left[key] = 2

    handle = uses_both_retries.delay(key)

    assert handle.get(timeout=TIMEOUT) == f"{key} after 2 celery retries"
    [step] = handle.history  # Celery's retries are one step; the policy was not needed
    assert (step.state, step.attempts) == ("DELIVERED", 3)
    assert calls[key] == 3


def test_the_policy_retries_once_celery_gives_up(app: Celery) -> None:
    key = new_id("both")
    failures_left[key] = 4  # the 4 runs Celery makes (3 retries) fail; the policy tries again

    handle = uses_both_retries.delay(key)

    assert handle.get(timeout=TIMEOUT) == f"{key} after 0 celery retries"
    assert [s.kind for s in handle.history] == ["activity", "timer", "activity"]
    assert calls[key] == 5


@durable_workflow
async def executes_a_non_signature() -> str:
    try:
        await workflow.execute("tasks.charge")  # type: ignore[arg-type]
    except TypeError as exc:
        return str(exc)
    return "ran?"


def test_execute_takes_a_signature(app: Celery) -> None:
    handle = executes_a_non_signature.delay()
    message = handle.get(timeout=TIMEOUT)
    assert "takes a task signature" in message and handle.id in message
