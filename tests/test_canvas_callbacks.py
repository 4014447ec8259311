"""Callbacks and errbacks of a durable canvas, on a worker with no result backend.

Celery calls a failed task's errbacks from the worker (``Backend.mark_as_failure``, which
a disabled backend inherits); a failed chord's body errbacks come from the backend's
chord handling, which celery_durable replaces with one step of its own. ``link``
callbacks run as steps of the run, so they are recorded and run once.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, chain, chord, group, shared_task
from celery.exceptions import ChordError
from celery.worker import WorkController
from recorder import see as _see
from recorder import seen
from recorder import wait_seen as _wait_seen

from celery_durable import durable_workflow
from celery_durable.canvas import durable


@shared_task
def add(x: int, y: int = 0) -> int:
    return x + y


@shared_task
def tsum(values: list[int]) -> int:
    return sum(values)


@shared_task
def fail(*args: Any) -> None:
    raise ValueError(f"failed with {list(args)}")


@shared_task
def errback(request: Any, exc: BaseException, traceback: Any, tag: str = "") -> None:
    """A new-style errback: called in-process with the failed request."""
    _see(tag, "errback", request.task, type(exc).__name__, traceback is not None)


@shared_task
def old_errback(task_id: str, tag: str = "") -> None:
    """An old-style errback: sent as a task with the failed task's id."""
    _see(tag, "old_errback", bool(task_id))


@shared_task
def callback(value: Any, tag: str = "") -> None:
    _see(tag, "callback", value)


@shared_task
def failing_callback(value: Any, tag: str = "") -> None:
    _see(tag, "failing_callback", value)
    raise RuntimeError("a callback's failure is its own")


@pytest.fixture(autouse=True)
def _no_result_backend(app: Celery) -> None:
    assert app.conf.result_backend is None


def test_a_failing_task_calls_its_errbacks_in_the_worker(
    app: Celery, worker: WorkController
) -> None:
    tag = "task"
    sig = fail.s(1).on_error(errback.s(tag=tag)).on_error(old_errback.s(tag=tag))
    with pytest.raises(ValueError):
        durable(sig).apply_async().get(timeout=30)
    # The new-style errback got the real request and traceback, as with any Celery task.
    assert _wait_seen(tag, 2) == [("errback", fail.name, "ValueError", True), ("old_errback", True)]


def test_errbacks_of_a_chain_and_of_a_group_member(app: Celery, worker: WorkController) -> None:
    tag = "chain"
    sig = chain(
        add.s(1, 1),
        group(add.s(1), fail.s().on_error(errback.s(tag=tag))),
        add.s(3),
    ).on_error(old_errback.s(tag=tag))
    with pytest.raises(ChordError):
        durable(sig).apply_async().get(timeout=30)
    # The member's own errback (its error), and the chain's, which the chord that
    # group | task becomes hands to its body: called with the chord's error.
    assert _wait_seen(tag, 2) == [("errback", fail.name, "ValueError", True), ("old_errback", True)]


def test_a_failed_chord_calls_its_body_errbacks_once_in_a_step(
    app: Celery, worker: WorkController
) -> None:
    tag = "chord"
    body = tsum.s().on_error(errback.s(tag=tag))
    handle = durable(chord([add.s(1, 1), fail.s(2)], body)).apply_async()
    with pytest.raises(ChordError, match=r"Dependency .*fail\[1\] raised ValueError"):
        handle.get(timeout=30)
    assert _wait_seen(tag, 1) == [("errback", tsum.name, "ChordError", False)]
    errbacks = handle.history[-1]
    assert errbacks.name == "celery_durable.canvas.chord_errbacks"
    assert errbacks.result == 1


def test_a_group_body_calls_each_members_errbacks(app: Celery, worker: WorkController) -> None:
    tag = "group-body"
    body = group(tsum.s().on_error(errback.s(tag=tag)), add.s(1).on_error(errback.s(tag=tag)))
    with pytest.raises(ChordError):
        durable(chord([fail.s()], body)).apply_async().get(timeout=30)
    assert _wait_seen(tag, 2) == [
        ("errback", add.name, "ValueError", False),  # Celery hands group members the cause
        ("errback", tsum.name, "ValueError", False),
    ]


def test_link_callbacks_run_once_as_steps_with_the_result(
    app: Celery, worker: WorkController
) -> None:
    tag = "links"
    sig = chain(
        add.s(1, 1).set(link=callback.s(tag=tag)),
        chord([add.s(1), add.s(2)], tsum.s()).set(link=callback.si("chord done", tag=tag)),
        add.s(0).set(link=[failing_callback.s(tag=tag), callback.s(tag=tag)]),
    )
    handle = durable(sig).apply_async()
    assert handle.get(timeout=30) == 7  # a failing callback does not fail the canvas
    # The run waited for its callbacks: each is a recorded step that ran once.
    assert sorted(seen[tag], key=repr) == [
        ("callback", "chord done"),
        ("callback", 2),
        ("callback", 7),
        ("failing_callback", 7),
    ]
    names = [step.name for step in handle.history]
    assert names.count(callback.name) == 3
    assert names.count(failing_callback.name) == 1


@durable_workflow
async def awaits_with_callbacks(tag: str) -> int:
    """Awaits a task with a callback, then goes on: the callback is waited for too."""
    first: int = await add.s(2, 3).set(link=callback.s(tag=tag))  # type: ignore[misc]
    return first + 1


def test_an_awaited_signature_waits_for_its_callbacks(app: Celery, worker: WorkController) -> None:
    handle = awaits_with_callbacks.delay("awaited")
    assert handle.get(timeout=30) == 6
    assert seen["awaited"] == [("callback", 5)]
    assert [step.name for step in handle.history] == [add.name, callback.name]
