"""Awaiting a canvas inside a workflow, driven by hand: which steps are issued, when, and
with which arguments and options (no broker, no worker)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

import pytest
from celery import Signature, chain, chord, group
from celery.exceptions import ChordError

import celery_durable  # noqa: F401 - installs Signature.__await__
from celery_durable.canvas._walk import ERRBACKS_TASK, await_canvas
from celery_durable.errors import NotInWorkflowError, WorkflowAwaitError
from celery_durable.runtime import (
    CancelStep,
    CompleteWorkflow,
    FailWorkflow,
    ScheduleActivity,
    StepOutcome,
    WorkflowInfo,
    WorkflowInstance,
)

T0 = datetime(2024, 5, 1, tzinfo=timezone.utc)


def s(name: str, *args: Any, **kwargs: Any) -> Signature:
    return Signature(name, args, kwargs)


def si(name: str, *args: Any, **kwargs: Any) -> Signature:
    return Signature(name, args, kwargs, immutable=True)


class Run:
    """A workflow awaiting ``make()``, activated turn by turn."""

    def __init__(self, make: Any) -> None:
        async def wf() -> Any:
            return await make()

        self.instance = WorkflowInstance(wf, (), {}, WorkflowInfo("run-1", "wf.canvas", T0))
        self.commands = self.instance.activate([], T0)

    @property
    def steps(self) -> list[ScheduleActivity]:
        return [c for c in self.commands if isinstance(c, ScheduleActivity)]

    def deliver(self, *outcomes: tuple[int, Any]) -> list[Any]:
        delivered = [
            StepOutcome(seq, error=v) if isinstance(v, BaseException) else StepOutcome(seq, v)
            for seq, v in outcomes
        ]
        self.commands = self.instance.activate(delivered, T0)
        return self.commands


def calls(steps: list[ScheduleActivity]) -> list[tuple[Any, ...]]:
    return [(c.seq, c.name, c.args, dict(c.kwargs)) for c in steps]


def test_a_chain_runs_one_step_at_a_time_passing_each_result_on() -> None:
    run = Run(lambda: chain(s("a", 1), s("b", k=2), si("c", 3), s("d")))
    assert calls(run.steps) == [(1, "a", (1,), {})]
    run.deliver((1, "A"))
    assert calls(run.steps) == [(2, "b", ("A",), {"k": 2})]
    run.deliver((2, "B"))
    assert calls(run.steps) == [(3, "c", (3,), {})]  # .si(): no result passed
    run.deliver((3, "C"))
    assert calls(run.steps) == [(4, "d", ("C",), {})]
    assert run.deliver((4, "D")) == [CompleteWorkflow("D")]


def test_a_group_schedules_every_member_at_once_and_returns_the_list_in_order() -> None:
    run = Run(lambda: group(s("a", i) for i in range(3)))
    assert calls(run.steps) == [(1, "a", (0,), {}), (2, "a", (1,), {}), (3, "a", (2,), {})]
    assert run.deliver((3, "z")) == []
    assert run.deliver((1, "x"), (2, "y")) == [CompleteWorkflow(["x", "y", "z"])]


def test_a_chord_schedules_its_body_once_the_whole_header_is_recorded() -> None:
    run = Run(lambda: chord([s("a", 1), s("a", 2)], s("total", "extra")))
    assert [c.name for c in run.steps] == ["a", "a"]
    assert run.deliver((1, 10)) == []
    run.deliver((2, 20))
    assert calls(run.steps) == [(3, "total", ([10, 20], "extra"), {})]
    assert run.deliver((3, 30)) == [CompleteWorkflow(30)]


def test_a_group_in_a_chain_gets_the_previous_result_and_the_next_step_the_list() -> None:
    run = Run(lambda: chain(s("a"), group(s("b", 1), si("c")), s("d")))
    run.deliver((1, "A"))
    assert calls(run.steps) == [(2, "b", ("A", 1), {}), (3, "c", (), {})]
    run.deliver((2, "B"), (3, "C"))
    assert calls(run.steps) == [(4, "d", (["B", "C"],), {})]


def test_nested_canvases_walk_depth_first_with_independent_branches() -> None:
    # A group of chains of chords: each branch moves on as soon as its own steps are done.
    def make() -> Signature:
        return group(chain(s("a", i), chord([s("h", 1), s("h", 2)], s("body"))) for i in range(2))

    run = Run(make)
    assert calls(run.steps) == [(1, "a", (0,), {}), (2, "a", (1,), {})]
    run.deliver((2, "A1"))
    assert calls(run.steps) == [(3, "h", ("A1", 1), {}), (4, "h", ("A1", 2), {})]
    run.deliver((3, 1), (4, 2), (1, "A0"))
    assert calls(run.steps) == [
        (5, "h", ("A0", 1), {}),
        (6, "h", ("A0", 2), {}),
        (7, "body", ([1, 2],), {}),
    ]
    run.deliver((7, "B1"), (5, 1), (6, 2))
    assert calls(run.steps) == [(8, "body", ([1, 2],), {})]
    assert run.deliver((8, "B0")) == [CompleteWorkflow(["B0", "B1"])]


def test_options_go_where_celery_sends_them() -> None:
    def make() -> Signature:
        header = [s("h").set(queue="own", priority=1), s("h")]
        body = s("body").set(queue="body-queue")
        return chord(header, body).set(queue="chord-queue", countdown=5, task_id="x")

    run = Run(make)
    # The chord's options override its header tasks'; countdown delays the header only.
    assert [dict(c.options) for c in run.steps] == [
        {"queue": "chord-queue", "priority": 1, "countdown": 5},
        {"queue": "chord-queue", "countdown": 5},
    ]
    run.deliver((1, 1), (2, 2))
    assert [dict(c.options) for c in run.steps] == [{"queue": "chord-queue"}]


def test_a_chains_options_apply_to_its_first_task_and_a_groups_to_every_member() -> None:
    run = Run(lambda: chain(s("a"), s("b")).set(queue="first"))
    assert [dict(c.options) for c in run.steps] == [{"queue": "first"}]
    run.deliver((1, 1))
    assert [dict(c.options) for c in run.steps] == [{}]
    run = Run(lambda: group(s("a").set(queue="mine"), s("b")).set(queue="all"))
    assert [dict(c.options) for c in run.steps] == [{"queue": "all"}, {"queue": "all"}]


def test_per_message_options_are_dropped_and_errbacks_kept_on_the_step() -> None:
    errback = s("on_error")
    sig = s("a").set(task_id="t", group_id="g", group_index=0, reply_to="r", link_error=errback)
    run = Run(lambda: sig)
    [step] = run.steps
    assert dict(step.options) == {"link_error": [errback]}


def test_a_link_callback_is_a_step_of_its_own_scheduled_with_the_result() -> None:
    run = Run(lambda: chain(s("a").set(link=s("cb", "x")), s("b")))
    [step] = run.steps
    assert "link" not in step.options
    run.deliver((1, "A"))
    assert calls(run.steps) == [(2, "b", ("A",), {}), (3, "cb", ("A", "x"), {})]
    # The canvas is done only once its callbacks are.
    assert run.deliver((2, "B")) == []
    assert run.deliver((3, "ignored")) == [CompleteWorkflow("B")]


def test_a_failed_chord_header_raises_chord_error_after_calling_the_body_errbacks() -> None:
    errback = s("on_error")
    run = Run(lambda: chord([s("a"), s("b")], s("total").on_error(errback)))
    run.deliver((1, ValueError("boom")))
    assert run.commands == []  # the other header task still runs to its end
    run.deliver((2, 2))
    [call] = run.steps
    assert call.name == ERRBACKS_TASK
    [entries, error] = call.args
    assert [e["errbacks"] for e in entries] == [[errback]]
    assert entries[0]["request"]["task"] == "total"
    assert error["type"] == "ChordError"
    [failed] = run.deliver((3, 1))
    assert isinstance(failed, FailWorkflow)
    assert isinstance(failed.error, ChordError)
    assert str(failed.error) == "Dependency a[0] raised ValueError('boom')"
    assert isinstance(failed.error.__cause__, ValueError)


def test_a_failed_chord_without_errbacks_schedules_nothing_more() -> None:
    run = Run(lambda: chain(group(s("a"), s("b")), s("total")))
    [failed] = run.deliver((1, 1), (2, KeyError("k")))
    assert isinstance(failed, FailWorkflow)
    assert isinstance(failed.error, ChordError)


def test_a_failing_step_stops_the_chain_and_a_group_raises_its_first_failure() -> None:
    run = Run(lambda: chain(s("a"), s("b")))
    [failed] = run.deliver((1, KeyError("k")))
    assert isinstance(failed, FailWorkflow) and isinstance(failed.error, KeyError)
    run = Run(lambda: group(s("a"), s("b"), s("c")))
    assert run.deliver((3, KeyError("third"))) == []
    [failed] = run.deliver((1, 1), (2, ValueError("second")))
    assert isinstance(failed, FailWorkflow) and isinstance(failed.error, ValueError)


def test_cancelling_an_awaited_canvas_cancels_its_open_steps() -> None:
    async def wf() -> Any:
        task = asyncio.ensure_future(await_canvas(chord([s("a"), s("b")], s("total"))))
        await s("other")
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            return "cancelled"
        return "finished"

    instance = WorkflowInstance(wf, (), {}, WorkflowInfo("run-1", "wf.canvas", T0))
    first = instance.activate([], T0)
    assert [(c.seq, c.name) for c in first if isinstance(c, ScheduleActivity)] == [
        (1, "other"),
        (2, "a"),
        (3, "b"),
    ]
    commands = instance.activate([StepOutcome(3, "b"), StepOutcome(1, "other")], T0)
    assert commands == [CancelStep(2), CompleteWorkflow("cancelled")]


def test_awaiting_does_not_change_the_callers_canvas() -> None:
    sig = chain(s("x"), group(s("a"), s("b")), s("c"), chord([s("d")], s("e")))
    sig.link_error(s("eb"))
    before = repr(sig), [dict(t) for t in sig.tasks]
    run = Run(lambda: sig)
    run.deliver((1, 1))
    run.deliver((2, 2), (3, 3))
    assert calls(run.steps) == [(4, "c", ([2, 3],), {})]
    assert [dict(c.options) for c in run.steps] == [{"link_error": [s("eb")]}]
    assert (repr(sig), [dict(t) for t in sig.tasks]) == before


def test_a_chord_without_a_body_is_refused() -> None:
    run = Run(lambda: chord([s("a")]))
    [failed] = run.commands
    assert isinstance(failed, FailWorkflow)
    assert isinstance(failed.error, WorkflowAwaitError)
    assert "wf.canvas[run-1]" in str(failed.error)


def test_awaiting_a_canvas_outside_a_workflow_says_so() -> None:
    async def outside() -> Any:
        return await group(s("a"), s("b"))

    with pytest.raises(NotInWorkflowError, match=r"celery\.group"):
        asyncio.run(outside())
