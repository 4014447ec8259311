"""WorkflowInstance on its own: coroutines driven activation by activation, no Celery."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Generator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from celery_durable import workflow
from celery_durable.errors import (
    NotInWorkflowError,
    WorkflowArgumentsError,
    WorkflowAwaitError,
    WorkflowEncodeError,
)
from celery_durable.runtime import (
    CancelStep,
    Command,
    CompleteWorkflow,
    ContinueAsNew,
    FailWorkflow,
    ScheduleActivity,
    StartTimer,
    StepOutcome,
    WorkflowInfo,
    WorkflowInstance,
    current_instance,
)

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


class step:  # lower case: reads like the task signatures it stands in for
    """An awaitable that schedules activity ``name`` on the running instance."""

    def __init__(self, name: str, *args: Any, **kwargs: Any) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs

    def __await__(self) -> Generator[Any, None, Any]:
        instance = current_instance(f"await {self.name}")
        future = instance.schedule_activity(self.name, self.args, self.kwargs, {})
        return (yield from future)


def make(fn: Any, *args: Any, workflow_id: str = "wf-1", **kwargs: Any) -> WorkflowInstance:
    return WorkflowInstance(fn, args, kwargs, WorkflowInfo(workflow_id, "tests.wf", T0))


def names(commands: list[Command]) -> list[tuple[int, str]]:
    return [(c.seq, c.name) for c in commands if isinstance(c, ScheduleActivity)]


def ok(seq: int, value: Any = None) -> StepOutcome:
    return StepOutcome(seq, value=value)


def err(seq: int, error: BaseException) -> StepOutcome:
    return StepOutcome(seq, error=error)


# -- commands -----------------------------------------------------------------------------


def test_first_activation_starts_the_coroutine_and_returns_its_first_step() -> None:
    async def wf(order: str) -> str:
        receipt = await step("charge", order, cents=5)
        return f"done {receipt}"

    instance = make(wf, "o-1")
    commands = instance.activate([], T0)

    assert commands == [
        ScheduleActivity(1, "charge", ("o-1",), {"cents": 5}, {}),
    ]
    assert instance.pending_seqs == [1]
    assert not instance.finished

    assert instance.activate([ok(1, "r-1")], T0) == [CompleteWorkflow("done r-1")]
    assert instance.finished
    assert instance.pending_seqs == []


def test_a_workflow_with_no_awaits_completes_in_its_first_activation() -> None:
    async def wf(x: int) -> int:
        return x * 2

    assert make(wf, 21).activate([], T0) == [CompleteWorkflow(42)]


def test_activating_a_finished_instance_is_an_error() -> None:
    async def wf() -> None:
        return None

    instance = make(wf)
    instance.activate([], T0)
    with pytest.raises(RuntimeError, match="already finished"):
        instance.activate([], T0)


def test_sequential_awaits_issue_one_step_per_activation() -> None:
    async def wf() -> list[Any]:
        return [await step("a"), await step("b"), await step("c")]

    instance = make(wf)
    assert names(instance.activate([], T0)) == [(1, "a")]
    assert names(instance.activate([ok(1, 1)], T0)) == [(2, "b")]
    assert names(instance.activate([ok(2, 2)], T0)) == [(3, "c")]
    assert instance.activate([ok(3, 3)], T0) == [CompleteWorkflow([1, 2, 3])]
    assert instance.turn == 4


def test_gather_issues_all_steps_at_once_in_argument_order() -> None:
    async def wf(items: list[str]) -> list[Any]:
        return list(await asyncio.gather(*(step("reserve", i) for i in items)))

    instance = make(wf, ["x", "y", "z"])
    commands = instance.activate([], T0)

    assert [(c.seq, c.args) for c in commands if isinstance(c, ScheduleActivity)] == [
        (1, ("x",)),
        (2, ("y",)),
        (3, ("z",)),
    ]
    # Outcomes may arrive in any order and over several turns; gather keeps arg order.
    assert instance.activate([ok(3, "Z")], T0) == []
    assert instance.activate([ok(1, "X"), ok(2, "Y")], T0) == [CompleteWorkflow(["X", "Y", "Z"])]


def test_gather_propagates_the_first_error_delivered() -> None:
    async def wf() -> Any:
        return await asyncio.gather(step("a"), step("b"))

    instance = make(wf)
    instance.activate([], T0)
    boom = ValueError("b failed")
    cancelled, outcome = instance.activate([err(2, boom)], T0)

    assert isinstance(outcome, FailWorkflow)
    assert outcome.error is boom
    assert cancelled == CancelStep(1)  # nobody waits for "a" any more


def test_gather_return_exceptions_collects_errors_as_values() -> None:
    async def wf() -> list[str]:
        results = await asyncio.gather(step("a"), step("b"), return_exceptions=True)
        return [type(r).__name__ for r in results]

    instance = make(wf)
    instance.activate([], T0)
    assert instance.activate([ok(1, 1), err(2, KeyError("k"))], T0) == [
        CompleteWorkflow(["int", "KeyError"])
    ]


def test_create_task_steps_are_issued_in_task_creation_order() -> None:
    async def child(name: str) -> Any:
        return await step(name)

    async def wf() -> list[Any]:
        first = asyncio.ensure_future(child("first"))
        second = asyncio.get_running_loop().create_task(child("second"))
        own = await step("own")
        return [own, await second, await first]

    instance = make(wf)
    # The main task issues "own" before the child tasks get their first turn.
    assert names(instance.activate([], T0)) == [(1, "own"), (2, "first"), (3, "second")]
    assert instance.activate([ok(3, "s"), ok(2, "f"), ok(1, "o")], T0) == [
        CompleteWorkflow(["o", "s", "f"])
    ]


def test_asyncio_wait_first_completed_sees_what_was_delivered() -> None:
    async def wf() -> list[str]:
        fast = asyncio.ensure_future(step("fast"))
        slow = asyncio.ensure_future(step("slow"))
        done, pending = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
        winner = [t.result() for t in done]
        for task in pending:
            task.cancel()
        return winner

    instance = make(wf)
    assert names(instance.activate([], T0)) == [(1, "fast"), (2, "slow")]
    # The loser is cancelled, which cancels its step (a revoke for a task).
    assert instance.activate([ok(2, "slow won")], T0) == [
        CancelStep(1),
        CompleteWorkflow(["slow won"]),
    ]


def test_outcome_of_a_cancelled_step_is_dropped() -> None:
    async def wf() -> str:
        a = asyncio.ensure_future(step("a"))
        b = asyncio.ensure_future(step("b"))
        await asyncio.sleep(0)
        a.cancel()
        return str(await b)

    instance = make(wf)
    instance.activate([], T0)
    # The result for the cancelled step 1 must not disturb anything.
    assert instance.activate([ok(1, "late"), ok(2, "b")], T0) == [CompleteWorkflow("b")]


def test_unknown_outcome_is_ignored() -> None:
    async def wf() -> Any:
        return await step("a")

    instance = make(wf)
    instance.activate([], T0)
    assert instance.activate([ok(99, "stray")], T0) == []
    assert instance.pending_seqs == [1]


def test_step_error_is_raised_at_the_await_and_can_be_handled() -> None:
    class PaymentDeclined(Exception):
        pass

    async def wf() -> str:
        try:
            await step("charge")
        except PaymentDeclined as exc:
            return await step("refund", str(exc))
        return "charged"

    instance = make(wf)
    instance.activate([], T0)
    commands = instance.activate([err(1, PaymentDeclined("card expired"))], T0)
    assert [(c.name, c.args) for c in commands if isinstance(c, ScheduleActivity)] == [
        ("refund", ("card expired",))
    ]
    assert instance.activate([ok(2, "refunded")], T0) == [CompleteWorkflow("refunded")]


def test_finally_blocks_can_schedule_compensation() -> None:
    async def wf() -> None:
        try:
            await step("charge")
        finally:
            await step("release")

    instance = make(wf)
    instance.activate([], T0)
    boom = RuntimeError("declined")
    assert names(instance.activate([err(1, boom)], T0)) == [(2, "release")]
    [failed] = instance.activate([ok(2)], T0)
    assert isinstance(failed, FailWorkflow) and failed.error is boom


def test_unhandled_error_fails_the_workflow_with_that_exception() -> None:
    async def wf() -> None:
        await step("a")
        raise LookupError("no such order")

    instance = make(wf)
    instance.activate([], T0)
    [failed] = instance.activate([ok(1)], T0)
    assert isinstance(failed, FailWorkflow)
    assert isinstance(failed.error, LookupError)
    assert str(failed.error) == "no such order"
    assert instance.finished


def test_arguments_that_do_not_fit_fail_the_workflow_before_its_code_runs() -> None:
    ran = []

    async def wf(order_id: str, *, cents: int = 0) -> None:
        ran.append(order_id)

    [failed] = make(wf, "o-1", "extra", workflow_id="wf-args").activate([], T0)
    assert isinstance(failed, FailWorkflow)
    assert isinstance(failed.error, WorkflowArgumentsError)
    assert isinstance(failed.error, TypeError)
    message = str(failed.error)
    assert message.startswith("workflow tests.wf[wf-args]: the arguments args=['o-1', 'extra']")
    assert "do not match wf(order_id, *, cents=0): too many positional arguments" in message
    [missing] = make(wf, cents=1).activate([], T0)
    assert isinstance(missing, FailWorkflow)
    assert "missing a required argument: 'order_id'" in str(missing.error)
    assert ran == []


def test_cancelling_the_main_task_fails_the_workflow_with_cancelled_error() -> None:
    async def wf() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        await step("a")

    [failed] = make(wf).activate([], T0)[-1:]
    assert isinstance(failed, FailWorkflow)
    assert isinstance(failed.error, asyncio.CancelledError)


def test_outcomes_are_delivered_in_the_order_given() -> None:
    async def waiter(name: str, log: list[str]) -> None:
        await step(name)
        log.append(name)

    async def wf(log: list[str]) -> list[str]:
        await asyncio.gather(waiter("a", log), waiter("b", log), waiter("c", log))
        return log

    forward = make(wf, [])
    forward.activate([], T0)
    assert forward.activate([ok(1), ok(2), ok(3)], T0) == [CompleteWorkflow(["a", "b", "c"])]

    backward = make(wf, [])
    backward.activate([], T0)
    assert backward.activate([ok(3), ok(1), ok(2)], T0) == [CompleteWorkflow(["c", "a", "b"])]


def test_same_code_and_same_outcomes_give_the_same_commands() -> None:
    async def child(i: int) -> Any:
        if i % 2:
            return await step("odd", i)
        await asyncio.sleep(0)
        return await step("even", i)

    async def wf(n: int) -> list[Any]:
        tasks = [asyncio.ensure_future(child(i)) for i in range(n)]
        first = await tasks[0]
        rest = await asyncio.gather(*tasks[1:])
        token = workflow.uuid4()
        return [first, *rest, await step("finish", str(token), workflow.random().random())]

    def trace() -> list[list[Command]]:
        instance = make(wf, 5)
        turns = [instance.activate([], T0)]
        turns.append(instance.activate([ok(4, "d"), ok(2, "b")], T0 + timedelta(seconds=1)))
        turns.append(instance.activate([ok(1, "a"), ok(3, "c"), ok(5, "e")], T0))
        turns.append(instance.activate([ok(6, "f")], T0))
        return turns

    first = trace()
    assert first == trace()
    assert isinstance(first[-1][-1], CompleteWorkflow)


# -- encoding of step inputs --------------------------------------------------------------


def test_encode_hook_sets_the_payload_of_each_step() -> None:
    async def wf() -> Any:
        return await step("a", 1, k=2)

    def encode(command: ScheduleActivity) -> Any:
        return ("application/x-test", repr((command.seq, command.args, dict(command.kwargs))))

    instance = WorkflowInstance(wf, (), {}, WorkflowInfo("wf-1", "tests.wf", T0), encode=encode)
    [command] = instance.activate([], T0)
    assert isinstance(command, ScheduleActivity)
    assert command.payload == ("application/x-test", "(1, (1,), {'k': 2})")


def test_encode_error_is_raised_at_the_await_and_uses_no_sequence_number() -> None:
    async def wf() -> Any:
        try:
            await step("bad", object())
        except WorkflowEncodeError as exc:
            return [str(exc), await step("good")]
        return None

    def encode(command: ScheduleActivity) -> Any:
        if command.name == "bad":
            raise WorkflowEncodeError("cannot encode the arguments of bad")
        return ("t", b"")

    instance = WorkflowInstance(wf, (), {}, WorkflowInfo("wf-1", "tests.wf", T0), encode=encode)
    assert names(instance.activate([], T0)) == [(1, "good")]
    assert instance.activate([ok(1, "g")], T0) == [
        CompleteWorkflow(["cannot encode the arguments of bad", "g"])
    ]


# -- time, randomness, info ---------------------------------------------------------------


def test_workflow_now_follows_turn_times_and_never_goes_back() -> None:
    seen: list[datetime] = []

    async def wf() -> None:
        for _ in range(4):
            seen.append(workflow.now())
            await step("tick")
        seen.append(workflow.now())

    instance = make(wf)
    times = [
        T0 + timedelta(seconds=5),
        T0 + timedelta(seconds=60),
        T0 + timedelta(seconds=30),  # a worker with a slow clock
        T0 - timedelta(days=1),
        T0 + timedelta(seconds=90),
    ]
    for seq, at in enumerate(times):
        instance.activate([ok(seq)] if seq else [], at)

    assert seen == [
        T0 + timedelta(seconds=5),
        T0 + timedelta(seconds=60),
        T0 + timedelta(seconds=60),
        T0 + timedelta(seconds=60),
        T0 + timedelta(seconds=90),
    ]
    assert instance.loop.time() == 90.0


def test_workflow_now_is_timezone_aware_utc() -> None:
    async def wf() -> datetime:
        return workflow.now()

    [done] = make(wf).activate([], T0)
    assert isinstance(done, CompleteWorkflow)
    assert done.result.tzinfo is not None
    assert done.result.utcoffset() == timedelta(0)


def test_uuid4_and_random_are_deterministic_per_run() -> None:
    async def wf() -> list[Any]:
        first = workflow.uuid4()
        await step("a")
        return [
            first,
            workflow.uuid4(),
            workflow.random().random(),
            workflow.random().randint(0, 10**9),
        ]

    def values(workflow_id: str) -> list[Any]:
        instance = make(wf, workflow_id=workflow_id)
        instance.activate([], T0)
        [done] = instance.activate([ok(1)], T0)
        assert isinstance(done, CompleteWorkflow)
        return list(done.result)

    run_a = values("run-a")
    assert run_a == values("run-a")
    assert run_a != values("run-b")
    first, second = run_a[0], run_a[1]
    assert isinstance(first, uuid.UUID) and first.version == 4
    assert first != second


def test_info_describes_the_running_workflow() -> None:
    async def wf() -> WorkflowInfo:
        return workflow.info()

    [done] = make(wf, workflow_id="order-7").activate([], T0)
    assert isinstance(done, CompleteWorkflow)
    assert done.result == WorkflowInfo("order-7", "tests.wf", T0)


@pytest.mark.parametrize(
    ("helper", "label"),
    [
        (workflow.now, "workflow.now()"),
        (workflow.uuid4, "workflow.uuid4()"),
        (workflow.random, "workflow.random()"),
        (workflow.info, "workflow.info()"),
    ],
)
def test_helpers_outside_a_workflow_raise_not_in_workflow(helper: Any, label: str) -> None:
    with pytest.raises(NotInWorkflowError, match=label.replace("(", r"\(").replace(")", r"\)")):
        helper()

    async def in_plain_asyncio() -> None:
        helper()

    # A running loop that is not a workflow's is not enough.
    with pytest.raises(NotInWorkflowError, match="@durable_workflow"):
        asyncio.run(in_plain_asyncio())


def test_not_in_workflow_error_is_a_runtime_error() -> None:
    assert issubclass(NotInWorkflowError, RuntimeError)


# -- I/O is refused inside workflow code --------------------------------------------------


def test_sleep_with_a_delay_is_a_durable_timer_step() -> None:
    async def wf() -> str:
        await asyncio.sleep(5)
        return "woke"

    instance = make(wf)
    assert instance.activate([], T0) == [StartTimer(1, 5.0, delay=5.0)]
    assert instance.activate([ok(1, None)], T0 + timedelta(seconds=5)) == [CompleteWorkflow("woke")]


def test_a_timer_counts_its_delay_from_the_turn_and_code_after_it_never_sees_an_earlier_time() -> (
    None
):
    async def wf() -> tuple[datetime, datetime]:
        before = workflow.now()
        await asyncio.sleep(5)
        after = workflow.now()
        await asyncio.sleep(1)
        return before, after

    instance = make(wf)
    # The store counts the delay from its own clock when the turn commits.
    assert instance.activate([], T0) == [StartTimer(1, 5.0, delay=5.0)]
    # The timer went off by the store's clock; the host running the next turn is a
    # minute behind it. The workflow's clock still moves to the deadline, never back.
    [second] = instance.activate([ok(1)], T0 - timedelta(seconds=60))
    assert second == StartTimer(2, 6.0, delay=1.0)
    [done] = instance.activate([ok(2)], T0 - timedelta(seconds=60))
    assert isinstance(done, CompleteWorkflow)
    assert done.result == (T0, T0 + timedelta(seconds=5))


def test_run_in_executor_fails_the_workflow_with_workflow_await_error() -> None:
    async def wf() -> None:
        await asyncio.get_running_loop().run_in_executor(None, print, "hi")

    [failed] = make(wf).activate([], T0)
    assert isinstance(failed, FailWorkflow)
    assert isinstance(failed.error, WorkflowAwaitError)
    assert "deterministic" in str(failed.error)


def test_workflow_can_catch_workflow_await_error_and_carry_on() -> None:
    async def wf() -> Any:
        try:
            await asyncio.get_running_loop().run_in_executor(None, print, "hi")
        except WorkflowAwaitError:
            return await step("instead")
        return None

    assert names(make(wf).activate([], T0)) == [(1, "instead")]


# -- the end of an instance ---------------------------------------------------------------


def test_steps_left_open_when_the_workflow_ends_are_cancelled() -> None:
    async def wf() -> str:
        left = asyncio.ensure_future(step("fire and forget"))
        await asyncio.sleep(0)
        return "done" if not left.done() else "waited?"

    commands = make(wf).activate([], T0)

    assert commands[0] == ScheduleActivity(1, "fire and forget")
    assert commands[1:] == [CancelStep(1), CompleteWorkflow("done")]


def test_close_ends_the_coroutine_without_issuing_what_its_finally_block_awaits() -> None:
    ran: list[str] = []

    async def wf() -> None:
        try:
            await step("charge")
        finally:
            ran.append("finally")
            await step("refund")  # a compensation: it must not run outside a turn
            ran.append("after refund")

    instance = make(wf)
    instance.activate([], T0)

    instance.close()
    instance.close()  # idempotent

    assert ran == ["finally"]
    assert instance.finished
    with pytest.raises(RuntimeError, match="already finished"):
        instance.activate([ok(1)], T0)


def test_a_timer_longer_than_ten_years_or_nan_is_a_value_error() -> None:
    async def wf(seconds: float) -> str:
        try:
            await asyncio.sleep(seconds)
        except ValueError as exc:
            return str(exc)
        return "slept"

    for seconds in (float("nan"), float("inf"), 3651 * 86400.0):
        [done] = make(wf, seconds, workflow_id="sleepy").activate([], T0)
        assert isinstance(done, CompleteWorkflow)
        if "Invalid delay: NaN" in done.result:
            continue  # Python 3.13's asyncio.sleep refuses NaN itself
        assert "tests.wf[sleepy]" in done.result and "ten years" in done.result


def test_continue_as_new_checks_the_arguments_against_the_workflow() -> None:
    async def wf(n: int) -> None:
        try:
            workflow.continue_as_new(n, n)
        except TypeError as exc:
            workflow.continue_as_new(len(str(exc)))

    [restart] = make(wf, 1).activate([], T0)
    assert isinstance(restart, ContinueAsNew) and restart.args[0] > 0
