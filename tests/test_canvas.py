"""Awaiting Celery signatures inside a workflow, driven by hand (no broker, no worker)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import pytest
from celery import Signature, chain, chord, group

import celery_durable  # noqa: F401 - installs Signature.__await__
from celery_durable.errors import WorkflowAwaitError
from celery_durable.runtime import (
    CompleteWorkflow,
    FailWorkflow,
    ScheduleActivity,
    StepOutcome,
    WorkflowInfo,
    WorkflowInstance,
)

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


def start(fn: Any) -> tuple[WorkflowInstance, list[Any]]:
    instance = WorkflowInstance(fn, (), {}, WorkflowInfo("run-1", "shop.checkout", T0))
    return instance, instance.activate([], T0)


def test_awaiting_a_signature_schedules_its_task_and_returns_its_result() -> None:
    async def wf() -> Any:
        return await Signature("shop.charge", ("o-1", 1999), {"currency": "EUR"})

    instance, commands = start(wf)
    assert commands == [
        ScheduleActivity(1, "shop.charge", ("o-1", 1999), {"currency": "EUR"}, {}),
    ]
    assert instance.activate([StepOutcome(1, "r-1")], T0) == [CompleteWorkflow("r-1")]


def test_routing_options_are_kept_and_per_message_options_dropped() -> None:
    async def wf() -> Any:
        sig = Signature("shop.charge", ("o-1",)).set(
            queue="payments", priority=5, countdown=3, task_id="mine", parent_id="p"
        )
        return await sig

    _, [command] = start(wf)
    assert isinstance(command, ScheduleActivity)
    assert command.options == {"queue": "payments", "priority": 5, "countdown": 3}


def test_equal_signatures_are_distinct_steps_in_gather() -> None:
    async def wf() -> Any:
        return await asyncio.gather(Signature("shop.ping", (1,)), Signature("shop.ping", (1,)))

    instance, commands = start(wf)
    assert [c.seq for c in commands if isinstance(c, ScheduleActivity)] == [1, 2]
    outcomes = [StepOutcome(1, "a"), StepOutcome(2, "b")]
    assert instance.activate(outcomes, T0) == [CompleteWorkflow(["a", "b"])]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: group(Signature("a"), Signature("b")), id="group"),
        pytest.param(lambda: chain(Signature("a"), Signature("b")), id="chain"),
        pytest.param(lambda: chord([Signature("a")], Signature("b")), id="chord"),
    ],
)
def test_canvas_primitives_are_awaited_as_steps(make: Any) -> None:
    # Every shape in detail: tests/test_canvas_walk.py and tests/test_canvas_celery.py.
    async def wf() -> Any:
        return await make()

    _, [first, *_] = start(wf)
    assert isinstance(first, ScheduleActivity)
    assert first.name == "a"


def test_a_signature_without_a_task_name_is_refused() -> None:
    async def wf() -> Any:
        return await Signature()

    _, [failed] = start(wf)
    assert isinstance(failed, FailWorkflow)
    assert isinstance(failed.error, WorkflowAwaitError)
    assert "names no task" in str(failed.error)
