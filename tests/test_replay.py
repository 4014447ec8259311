"""Replay on its own: rebuilding an instance from history, and catching changed code."""

from __future__ import annotations

import asyncio
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from celery_durable import workflow
from celery_durable.errors import DurableError, NonDeterminismError
from celery_durable.runtime import (
    ACTIVITY,
    Command,
    CompleteWorkflow,
    HistoryStep,
    ScheduleActivity,
    StepOutcome,
    WorkflowInfo,
    WorkflowInstance,
    current_instance,
    replay,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


class step:  # lower case: reads like the task signatures it stands in for
    """An awaitable that schedules activity ``name`` on the running instance."""

    def __init__(self, name: str, *args: Any) -> None:
        self.name, self.args = name, args

    def __await__(self) -> Generator[Any, None, Any]:
        future = current_instance(f"await {self.name}").schedule_activity(
            self.name, self.args, {}, {}
        )
        return (yield from future)


def make(fn: Any, *args: Any) -> WorkflowInstance:
    return WorkflowInstance(fn, args, {}, WorkflowInfo("run-1", "shop.checkout", T0))


@dataclass
class Recording:
    """What a driver would have stored after running a workflow live."""

    history: list[HistoryStep] = field(default_factory=list)
    turn_times: dict[int, datetime] = field(default_factory=dict)
    commands: list[list[Command]] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.commands)


def record(fn: Any, *args: Any, turns: Sequence[Sequence[StepOutcome]]) -> Recording:
    """Run ``fn`` live, one activation per entry of ``turns``, keeping history like a driver."""
    instance = make(fn, *args)
    rec = Recording()
    steps: dict[int, HistoryStep] = {}
    for number, outcomes in enumerate(turns, start=1):
        at = T0 + timedelta(minutes=number)
        rec.turn_times[number] = at
        for outcome in outcomes:
            steps[outcome.seq] = replace(steps[outcome.seq], observed_turn=number, outcome=outcome)
        commands = instance.activate(list(outcomes), at)
        rec.commands.append(commands)
        for command in commands:
            if isinstance(command, ScheduleActivity):
                steps[command.seq] = HistoryStep(command.seq, ACTIVITY, command.name, number)
    rec.history = [steps[seq] for seq in sorted(steps)]
    return rec


def ok(seq: int, value: Any = None) -> StepOutcome:
    return StepOutcome(seq, value=value)


# -- a faithful replay --------------------------------------------------------------------


async def checkout(order: str, skus: list[str]) -> dict[str, Any]:
    receipt = await step("charge", order)
    held = await asyncio.gather(*(step("reserve", sku) for sku in skus))
    return {"receipt": receipt, "held": list(held)}


def test_replay_rebuilds_the_instance_and_it_carries_on_like_the_original() -> None:
    turns = [[], [ok(1, "r-1")], [ok(3, True)]]
    rec = record(checkout, "o-1", ["a", "b"], turns=turns)
    assert rec.commands[-1] == []  # still waiting for step 2

    rebuilt = make(checkout, "o-1", ["a", "b"])
    replay(rebuilt, rec.history, rec.turns, rec.turn_times)

    assert rebuilt.turn == rec.turns
    assert rebuilt.pending_seqs == [2]
    assert rebuilt.activate([ok(2, False)], T0) == [
        CompleteWorkflow({"receipt": "r-1", "held": [False, True]})
    ]


def test_replay_of_zero_turns_leaves_a_fresh_instance() -> None:
    instance = make(checkout, "o-1", [])
    replay(instance, [], 0, {})
    assert instance.turn == 0
    assert [c.seq for c in instance.activate([], T0) if isinstance(c, ScheduleActivity)] == [1]


def test_replay_delivers_outcomes_in_the_turn_that_first_saw_them() -> None:
    log: list[str] = []

    async def wf() -> None:
        async def waiter(name: str) -> None:
            await step(name)
            log.append(name)

        await asyncio.gather(waiter("a"), waiter("b"), waiter("c"))
        log.append("done")

    # b's outcome is first seen in turn 2; a's and c's in turn 3 (though recorded later
    # steps could finish first, what matters is the turn that delivered them).
    rec = record(wf, turns=[[], [ok(2)], [ok(1), ok(3)]])
    live = list(log)
    log.clear()

    replay(make(wf), rec.history[:], rec.turns - 1, rec.turn_times)
    assert log == ["b"]
    log.clear()

    instance = make(wf)
    # History in any order: replay sorts it.
    replay(instance, list(reversed(rec.history)), rec.turns - 1, rec.turn_times)
    instance.activate([ok(1), ok(3)], T0)
    assert log == live == ["b", "a", "c", "done"]


def test_replay_reproduces_now_uuid_and_random() -> None:
    seen: list[list[Any]] = []

    async def wf() -> None:
        for _ in range(3):
            seen.append([workflow.now(), workflow.uuid4(), workflow.random().random()])
            await step("tick")

    rec = record(wf, turns=[[], [ok(1)], [ok(2)]])
    live, seen[:] = list(seen), []

    replay(make(wf), rec.history, rec.turns, rec.turn_times)

    assert seen == live
    assert len({row[1] for row in live}) == 3
    assert [row[0] for row in live] == [T0 + timedelta(minutes=n) for n in (1, 2, 3)]


def test_replay_keeps_now_from_going_back_when_turn_times_do() -> None:
    seen: list[datetime] = []

    async def wf() -> None:
        seen.append(workflow.now())
        await step("a")
        seen.append(workflow.now())
        await step("b")

    rec = record(wf, turns=[[], [ok(1)]])
    # A turn recorded by a worker whose clock ran behind.
    times = {1: T0 + timedelta(hours=1), 2: T0 + timedelta(minutes=1)}
    seen.clear()
    replay(make(wf), rec.history, rec.turns, times)
    assert seen == [T0 + timedelta(hours=1), T0 + timedelta(hours=1)]


def test_replay_of_a_delivered_error_raises_it_again_at_the_await() -> None:
    async def wf() -> Any:
        try:
            await step("charge")
        except ValueError:
            return await step("refund")
        return await step("ship")

    error = StepOutcome(1, error=ValueError("declined"))
    rec = record(wf, turns=[[], [error]])
    instance = make(wf)
    replay(instance, rec.history, rec.turns, rec.turn_times)
    assert instance.pending_seqs == [2]
    assert [h.name for h in rec.history] == ["charge", "refund"]


def test_same_history_same_commands_after_replay() -> None:
    async def wf(n: int) -> list[Any]:
        first = await asyncio.gather(*(step("fan", i) for i in range(n)))
        return [*first, await step("after", str(workflow.uuid4()))]

    live = make(wf, 3)
    live.activate([], T0)
    live_commands = live.activate([ok(1), ok(2), ok(3)], T0)

    rec = record(wf, 3, turns=[[]])
    rebuilt = make(wf, 3)
    replay(rebuilt, rec.history, rec.turns, rec.turn_times)
    assert rebuilt.activate([ok(1), ok(2), ok(3)], T0) == live_commands


# -- code that changed under a running workflow -------------------------------------------


def replay_changed(old: Any, new: Any, turns: Sequence[Sequence[StepOutcome]]) -> str:
    rec = record(old, turns=turns)
    with pytest.raises(NonDeterminismError) as caught:
        replay(make(new), rec.history, rec.turns, rec.turn_times)
    message = str(caught.value)
    assert "shop.checkout[run-1]" in message
    return message


def test_a_renamed_step_is_non_determinism_naming_both_sides() -> None:
    async def old() -> None:
        await step("charge")
        await step("ship")

    async def new() -> None:
        await step("charge")
        await step("ship_express")

    message = replay_changed(old, new, [[], [ok(1)]])
    assert "step 2" in message
    assert "'ship'" in message
    assert "'ship_express'" in message


def test_an_extra_step_is_non_determinism() -> None:
    async def old() -> None:
        await step("charge")

    async def new() -> None:
        await asyncio.gather(step("charge"), step("audit"))

    message = replay_changed(old, new, [[]])
    assert "step 2" in message
    assert "'audit'" in message
    assert "does not have" in message


def test_a_missing_step_is_non_determinism() -> None:
    async def old() -> None:
        await asyncio.gather(step("charge"), step("audit"))

    async def new() -> None:
        await step("charge")

    message = replay_changed(old, new, [[]])
    assert "step 2" in message
    assert "'audit'" in message
    assert "did not schedule" in message


def test_a_step_moved_to_a_later_turn_is_non_determinism() -> None:
    async def old() -> None:
        await asyncio.gather(step("a"), step("b"))

    async def new() -> None:
        await step("a")
        await step("b")

    message = replay_changed(old, new, [[], [ok(1)]])
    assert "turn 1" in message and "'b'" in message


def test_finishing_early_is_non_determinism() -> None:
    async def old() -> None:
        side = asyncio.ensure_future(step("side"))
        await step("main")
        await side

    async def new() -> None:
        side = asyncio.ensure_future(step("side"))
        await step("main")
        side.cancel()  # the new code no longer waits for it

    # "main" is step 1 (the main task runs first), "side" step 2 and still pending.
    message = replay_changed(old, new, [[], [ok(1)]])
    assert "finished the workflow" in message
    assert "turn 2" in message


def test_failing_early_is_non_determinism_too() -> None:
    async def old() -> None:
        await step("a")
        await step("b")

    async def new() -> None:
        await step("a")
        raise RuntimeError("new validation")

    message = replay_changed(old, new, [[], [ok(1)]])
    assert "step 2" in message and "'b'" in message


def test_non_determinism_error_is_a_durable_error_with_advice() -> None:
    async def old() -> None:
        await step("x")

    async def new() -> None:
        await step("y")

    message = replay_changed(old, new, [[]])
    assert "retry" in message
    assert issubclass(NonDeterminismError, DurableError)


def test_changed_arguments_with_the_same_step_names_replay_fine() -> None:
    async def old() -> Any:
        return await step("charge", 100)

    async def new() -> Any:
        return await step("charge", 200)

    rec = record(old, turns=[[]])
    instance = make(new)
    replay(instance, rec.history, rec.turns, rec.turn_times)
    assert instance.activate([ok(1, "r")], T0) == [CompleteWorkflow("r")]
