"""The deterministic event loop on its own: FIFO order, virtual time, no I/O."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Coroutine
from typing import Any

import pytest

from celery_durable.errors import WorkflowAwaitError
from celery_durable.runtime import WorkflowEventLoop


def run(loop: WorkflowEventLoop, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
    """Run ``coro`` as a task on ``loop`` until nothing is ready, and return the task."""
    task = loop.create_task(coro)
    loop.run_until_quiescent()
    return task


def test_callbacks_run_in_the_order_they_were_scheduled() -> None:
    loop = WorkflowEventLoop()
    order: list[str] = []

    def first() -> None:
        order.append("first")
        # Scheduled while running: goes to the back of the queue, after "second".
        loop.call_soon(order.append, "third")

    loop.call_soon(first)
    loop.call_soon(order.append, "second")
    loop.run_until_quiescent()

    assert order == ["first", "second", "third"]


def test_tasks_interleave_in_fifo_order_at_every_suspension() -> None:
    loop = WorkflowEventLoop()
    order: list[str] = []

    async def worker(name: str) -> None:
        for i in range(3):
            order.append(f"{name}{i}")
            await asyncio.sleep(0)

    async def main() -> None:
        await asyncio.gather(worker("a"), worker("b"), worker("c"))

    task = run(loop, main())

    assert task.done() and task.exception() is None
    assert order == ["a0", "b0", "c0", "a1", "b1", "c1", "a2", "b2", "c2"]


def test_same_program_gives_the_same_trace_every_time() -> None:
    def trace() -> list[str]:
        loop = WorkflowEventLoop()
        order: list[str] = []

        async def worker(name: str, hops: int) -> None:
            for _ in range(hops):
                await asyncio.sleep(0)
            order.append(name)

        async def main() -> None:
            tasks = [asyncio.ensure_future(worker(f"w{i}", (i * 7) % 5)) for i in range(10)]
            done, _ = await asyncio.wait(tasks)
            order.append(str(len(done)))

        run(loop, main())
        return order

    first = trace()
    assert first == trace() == trace()
    assert first[-1] == "10"


def test_cancelled_handles_are_skipped() -> None:
    loop = WorkflowEventLoop()
    order: list[str] = []
    loop.call_soon(order.append, "a")
    loop.call_soon(order.append, "b").cancel()
    loop.call_soon(order.append, "c")
    loop.run_until_quiescent()
    assert order == ["a", "c"]


def test_running_loop_is_set_only_while_running_and_restored_after() -> None:
    loop = WorkflowEventLoop()
    seen: list[object] = []
    loop.call_soon(lambda: seen.append(asyncio.get_running_loop()))
    loop.call_soon(lambda: seen.append(loop.is_running()))

    assert not loop.is_running()
    loop.run_until_quiescent()

    assert seen == [loop, True]
    assert not loop.is_running()
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def test_running_loop_is_restored_when_a_callback_raises() -> None:
    loop = WorkflowEventLoop()

    def boom() -> None:
        raise KeyError("boom")

    # A bare callback (not a task) raising goes to the exception handler, not out.
    handled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: handled.append(context))
    loop.call_soon(boom)
    loop.run_until_quiescent()

    assert len(handled) == 1
    assert isinstance(handled[0]["exception"], KeyError)
    assert not loop.is_running()
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()


def test_loop_nested_inside_a_running_asyncio_loop_restores_it() -> None:
    async def outer() -> tuple[object, object]:
        host = asyncio.get_running_loop()
        loop = WorkflowEventLoop()
        inner: list[object] = []
        loop.call_soon(lambda: inner.append(asyncio.get_running_loop()))
        loop.run_until_quiescent()
        return inner[0], asyncio.get_running_loop() is host

    inner, restored = asyncio.run(outer())
    assert isinstance(inner, WorkflowEventLoop)
    assert restored is True


def test_virtual_time_only_moves_forward() -> None:
    loop = WorkflowEventLoop()
    assert loop.time() == 0.0
    loop.set_time(10.0)
    assert loop.time() == 10.0
    loop.set_time(3.0)
    assert loop.time() == 10.0
    loop.set_time(12.5)
    assert loop.time() == 12.5


def test_sleep_zero_is_allowed() -> None:
    loop = WorkflowEventLoop()

    async def main() -> str:
        await asyncio.sleep(0)
        return "ok"

    assert run(loop, main()).result() == "ok"


@pytest.mark.parametrize(
    "make_awaitable",
    [
        pytest.param(lambda: asyncio.sleep(1), id="asyncio.sleep"),
        pytest.param(
            lambda: asyncio.wait_for(asyncio.get_running_loop().create_future(), 5),
            id="asyncio.wait_for",
        ),
    ],
)
def test_timers_on_a_loop_without_a_workflow_raise_workflow_await_error(
    make_awaitable: Any,
) -> None:
    loop = WorkflowEventLoop()

    async def main() -> None:
        await make_awaitable()

    task = run(loop, main())

    error = task.exception()
    assert isinstance(error, WorkflowAwaitError)
    assert "durable timers" in str(error)
    assert "workflow" in str(error)


def test_call_later_raises_directly() -> None:
    loop = WorkflowEventLoop()
    with pytest.raises(WorkflowAwaitError):
        loop.call_later(1.0, print)
    with pytest.raises(WorkflowAwaitError):
        loop.call_at(5.0, print)


def test_run_in_executor_raises_workflow_await_error() -> None:
    loop = WorkflowEventLoop()

    async def main() -> None:
        await asyncio.get_running_loop().run_in_executor(None, print)

    error = run(loop, main()).exception()
    assert isinstance(error, WorkflowAwaitError)
    assert "Celery task" in str(error)


def test_to_thread_raises_workflow_await_error() -> None:
    loop = WorkflowEventLoop()

    async def main() -> None:
        await asyncio.to_thread(print)

    assert isinstance(run(loop, main()).exception(), WorkflowAwaitError)


def test_network_io_raises_workflow_await_error() -> None:
    loop = WorkflowEventLoop()

    async def main() -> None:
        await asyncio.open_connection("127.0.0.1", 6379)

    assert isinstance(run(loop, main()).exception(), WorkflowAwaitError)


@pytest.mark.parametrize(
    "method",
    [
        "getaddrinfo",
        "create_connection",
        "create_server",
        "subprocess_exec",
        "subprocess_shell",
        "add_reader",
        "sock_recv",
        "add_signal_handler",
        "remove_reader",
        "connect_read_pipe",
        "start_tls",
        "sock_sendfile",
        "set_default_executor",
    ],
)
def test_every_io_entry_point_raises(method: str) -> None:
    loop = WorkflowEventLoop()
    with pytest.raises(WorkflowAwaitError):
        getattr(loop, method)(socket.socket)


@pytest.mark.parametrize("method", ["run_forever", "run_until_complete", "stop"])
def test_workflow_code_cannot_run_or_stop_the_loop(method: str) -> None:
    loop = WorkflowEventLoop()
    with pytest.raises(RuntimeError, match="driven by celery_durable"):
        getattr(loop, method)()


def test_asyncio_shutdown_hooks_are_harmless() -> None:
    loop = WorkflowEventLoop()

    async def main() -> None:
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()

    assert run(loop, main()).exception() is None
    assert loop.get_task_factory() is None


def test_create_task_keeps_its_name() -> None:
    loop = WorkflowEventLoop()

    async def main() -> str:
        task = asyncio.current_task()
        assert task is not None
        return task.get_name()

    task = loop.create_task(main(), name="charge-step")
    loop.run_until_quiescent()
    assert task.result() == "charge-step"


def test_close_drops_pending_callbacks() -> None:
    loop = WorkflowEventLoop()
    order: list[str] = []
    loop.call_soon(order.append, "never")
    loop.close()
    loop.run_until_quiescent()
    assert loop.is_closed()
    assert order == []


def test_owner_is_kept_for_helpers_to_find() -> None:
    owner = object()
    assert WorkflowEventLoop(owner=owner).owner is owner
