"""Helpers for code running inside a workflow: ``from celery_durable import workflow``.

Each finds the running workflow through the current event loop and raises
:class:`~celery_durable.errors.NotInWorkflowError` when called anywhere else. They are
deterministic: a replay of the run returns exactly what the first execution got.
"""

from __future__ import annotations

import asyncio
import json
import math
import random as _random
import uuid as _uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, NoReturn, TypeVar

from celery.canvas import Signature

from .errors import ActivityTimeoutError, WorkflowEncodeError
from .runtime import MAX_TIMER_SECONDS, WorkflowInfo, current_instance

__all__ = [
    "RetryPolicy",
    "continue_as_new",
    "execute",
    "info",
    "now",
    "patched",
    "random",
    "set_status",
    "sleep",
    "step",
    "uuid4",
    "wait_for_signal",
]

T = TypeVar("T")

#: Longer than any sensible durable wait; a bigger value is almost surely a unit mistake.
MAX_DURATION = timedelta(seconds=MAX_TIMER_SECONDS)


def _label() -> str:
    i = current_instance("workflow helpers").info
    return f"workflow {i.name}[{i.workflow_id}]"


def _seconds(value: float | timedelta, what: str, allow_zero: bool = True) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        raise ValueError(
            f"{_label()}: {what} must be a positive number of seconds or a timedelta, got {value!r}"
        )
    if seconds > MAX_DURATION.total_seconds():
        raise ValueError(
            f"{_label()}: {what} of {value!r} is more than ten years; pass seconds (or a "
            "timedelta), not milliseconds or a timestamp"
        )
    return seconds


def info() -> WorkflowInfo:
    """The running workflow's id, name, attempt, start time and parent."""
    return current_instance("workflow.info()").info


def now() -> datetime:
    """The workflow's current time (UTC): the time of the current turn, never going back."""
    return current_instance("workflow.now()").now


def random() -> _random.Random:
    """A ``random.Random`` seeded per run, replayed identically."""
    return current_instance("workflow.random()").random


def uuid4() -> _uuid.UUID:
    """A random UUID that is the same on every replay of the run."""
    return _uuid.UUID(int=current_instance("workflow.uuid4()").random.getrandbits(128), version=4)


async def sleep(duration: float | timedelta) -> None:
    """Sleep durably: the run waits as rows in SQL and survives restarts.

    Same as ``await asyncio.sleep(seconds)`` inside a workflow, with the duration checked.

    Raises:
        ValueError: the duration is negative, NaN or more than ten years.
    """
    current_instance("workflow.sleep()")
    await asyncio.sleep(_seconds(duration, "the sleep duration"))


async def step(fn: Callable[..., T | Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """Run ``fn`` (sync or async) inside the driver and record its result.

    For quick non-deterministic work (read a clock, call a fast API) not worth a broker
    round trip. The result is recorded once and replayed afterwards; ``fn`` runs again
    only if the worker died before the result was recorded. Its result must be
    encodable by the serializer.
    """
    instance = current_instance("workflow.step()")
    if not callable(fn):
        raise TypeError(f"{_label()}: workflow.step() needs a function, got {fn!r}")
    result: T = await instance.run_local(fn, args, kwargs)
    return result


async def wait_for_signal(name: str, timeout: float | timedelta | None = None) -> Any:
    """Wait for the next signal ``name`` sent to this run and return its payload.

    Signals sent before the wait are buffered; several of one name are delivered in the
    order they were sent, each once. ``timeout=0`` takes a buffered signal if there is
    one and raises TimeoutError otherwise.

    Raises:
        TimeoutError: no such signal came within ``timeout``.
        ValueError: the name is empty, or the timeout negative, NaN or over ten years.
    """
    instance = current_instance("workflow.wait_for_signal()")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{_label()}: a signal name must be a non-empty string")
    # Checked before the wait is issued: a wait left behind would take a signal meant
    # for a later one.
    seconds = None if timeout is None else _seconds(timeout, "the signal timeout")
    future = instance.wait_signal(name)
    if seconds is None:
        return await future
    # Not asyncio.wait_for, which gives up at once on a timeout of 0, before the store
    # has had the chance to hand the wait a buffered signal: a zero timeout is a durable
    # timer too, and the signal (an earlier step) wins a tie.
    try:
        await asyncio.wait({future}, timeout=seconds)
    finally:
        if not future.done():
            future.cancel()
    if future.cancelled():
        raise TimeoutError(f"{_label()}: no signal {name!r} within {seconds:g} s")
    return future.result()


def set_status(key: str, value: Any) -> None:
    """Publish a progress value (JSON-able) that ``handle.describe()`` shows in flight."""
    instance = current_instance("workflow.set_status()")
    try:
        json.dumps(value, allow_nan=False)  # NaN is not JSON: PostgreSQL refuses it
    except (TypeError, ValueError) as exc:
        raise WorkflowEncodeError(
            f"{_label()}: the status value for {key!r} is not JSON-able: {exc}"
        ) from exc
    instance.set_status(str(key), value)


def continue_as_new(*args: Any, **kwargs: Any) -> NoReturn:
    """End this run's history and start it again, same workflow id, with these arguments.

    For endless loops (pollers, subscriptions): the history stays bounded. Buffered
    signals carry over to the new run.

    Raises:
        TypeError: the arguments do not fit the workflow function.
    """
    current_instance("workflow.continue_as_new()").continue_as_new(args, kwargs)


def patched(patch_id: str) -> bool:
    """Version a change: True where the run may take the new code path.

    Runs that already went past this point before the change was deployed replay the
    old path (False); every other run records that it took the new one (True). To
    retire a patch once no run older than it is in flight, delete the old branch and
    the ``patched()`` call, keeping the new branch.
    """
    return current_instance("workflow.patched()").patched(patch_id)


@dataclass(frozen=True)
class RetryPolicy:
    """How ``workflow.execute`` retries a failing activity, waiting on durable timers.

    Args:
        max_attempts: attempts in all, the first included (0: no limit).
        initial_interval: seconds before the first retry.
        backoff: factor applied to the interval after each retry.
        max_interval: the longest wait between two attempts.
        non_retryable: exception types (or their names) that fail at once.
    """

    max_attempts: int = 3
    initial_interval: float = 1.0
    backoff: float = 2.0
    max_interval: float = 100.0
    non_retryable: Sequence[type[BaseException] | str] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        problems = []
        if not (isinstance(self.max_attempts, int) and self.max_attempts >= 0):
            problems.append(
                f"max_attempts must be an int >= 0 (0: no limit), not {self.max_attempts!r}"
            )
        if not 0 <= self.initial_interval <= MAX_TIMER_SECONDS:
            problems.append(f"initial_interval must be seconds >= 0, not {self.initial_interval!r}")
        if not 1 <= self.backoff < math.inf:
            problems.append(f"backoff must be a factor >= 1, not {self.backoff!r}")
        if not self.initial_interval <= self.max_interval <= MAX_TIMER_SECONDS:
            problems.append(
                f"max_interval must be at least initial_interval, not {self.max_interval!r}"
            )
        if problems:
            raise ValueError(f"RetryPolicy: {'; '.join(problems)}")

    def interval(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.initial_interval * self.backoff ** (attempt - 1), self.max_interval))

    def retryable(self, error: BaseException) -> bool:
        """False if ``error`` is one of the non-retryable types."""
        names = {type(error).__name__, type(error).__qualname__}
        for kind in self.non_retryable:
            if isinstance(kind, str) and kind in names:
                return False
            if isinstance(kind, type) and isinstance(error, kind):
                return False
        return True


async def execute(
    sig: Signature,
    *,
    retry: RetryPolicy | None = None,
    start_to_close: float | timedelta | None = None,
    schedule_to_close: float | timedelta | None = None,
) -> Any:
    """Run a task as a step with durable retries and timeouts.

    Args:
        sig: the task's signature.
        retry: retry policy (default: one attempt, no retries).
        start_to_close: time limit of each attempt, from when it is sent.
        schedule_to_close: time limit of all attempts together, waits included.

    Raises:
        ActivityTimeoutError: an attempt took longer than ``start_to_close`` (and no
            retry was left), or ``schedule_to_close`` ran out, during an attempt or
            before the next one could start (then the last attempt's error is its
            ``__cause__``).
        Exception: the task's own exception once the attempts are used up.
    """
    current_instance("workflow.execute()")
    if not isinstance(sig, Signature):
        raise TypeError(f"{_label()}: workflow.execute() takes a task signature, got {sig!r}")
    policy = retry or RetryPolicy(max_attempts=1)
    per_attempt = (
        None if start_to_close is None else _seconds(start_to_close, "start_to_close", False)
    )
    overall = (
        None
        if schedule_to_close is None
        else _seconds(schedule_to_close, "schedule_to_close", False)
    )
    loop = asyncio.get_running_loop()
    deadline = None if overall is None else loop.time() + overall

    def timed_out(which: str, attempts: int) -> ActivityTimeoutError:
        limit = per_attempt if which == "start_to_close" else overall
        return ActivityTimeoutError(
            f"{_label()}: {sig.task} exceeded its {which} timeout ({limit:g} s) "
            f"in attempt {attempts}"
        )

    async def attempt_once(attempt: int) -> Any:
        limit, which = per_attempt, "start_to_close"
        if deadline is not None:
            left = deadline - loop.time()
            if limit is None or left < limit:
                limit, which = left, "schedule_to_close"
        if limit is None:
            return await _awaitable(sig)
        if limit <= 0:  # the last wait ended past the deadline: no time for an attempt
            raise timed_out(which, attempt)
        try:
            return await asyncio.wait_for(_awaitable(sig), limit)
        except asyncio.TimeoutError:
            raise timed_out(which, attempt) from None

    attempt = 1
    while True:
        error: Exception
        try:
            return await attempt_once(attempt)
        except ActivityTimeoutError as exc:
            if deadline is not None and loop.time() >= deadline:
                raise  # schedule_to_close ran out: no retry
            error = exc
        except Exception as exc:
            error = exc
        if not policy.retryable(error) or (policy.max_attempts and attempt >= policy.max_attempts):
            raise error
        wait = policy.interval(attempt)
        if deadline is not None and loop.time() + wait >= deadline:
            # The next attempt would start too late to be of use.
            raise timed_out("schedule_to_close", attempt) from error
        await asyncio.sleep(wait)
        attempt += 1


async def _awaitable(sig: Signature) -> Any:
    return await sig
