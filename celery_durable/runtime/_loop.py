"""A deterministic asyncio event loop with no I/O.

Workflow code runs on :class:`WorkflowEventLoop`: callbacks run strictly in the order
they were scheduled (a FIFO ready queue), time is virtual and only moves when the driver
says so, and anything that would touch the outside world raises a clear error instead.
Running the same coroutine with the same inputs therefore always takes the same path,
which is what lets a driver replay a run from its history.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from asyncio import events
from collections import deque
from collections.abc import Callable, Coroutine, Generator
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from ..errors import WorkflowAwaitError

if TYPE_CHECKING:
    from typing_extensions import TypeVarTuple, Unpack

    _Ts = TypeVarTuple("_Ts")

__all__ = ["WorkflowEventLoop"]

_T = TypeVar("_T")
logger = logging.getLogger(__name__)


class WorkflowEventLoop(asyncio.AbstractEventLoop):
    """Runs callbacks in FIFO order until nothing is ready; never blocks, never does I/O."""

    def __init__(self, owner: object = None) -> None:
        self._ready: deque[asyncio.Handle] = deque()
        self._time = 0.0
        self._closed = False
        self._running = False
        self._exception_handler: Any = None
        #: What this loop runs for (the runtime's workflow instance); helpers find it here.
        self.owner = owner

    # -- running -------------------------------------------------------------------------

    def run_until_quiescent(self) -> None:
        """Run ready callbacks, including those they schedule, until none is left."""
        previous = events._get_running_loop()
        events._set_running_loop(self)
        self._running = True
        try:
            while self._ready:
                handle = self._ready.popleft()
                if not handle._cancelled:
                    handle._run()
        finally:
            self._running = False
            events._set_running_loop(previous)

    def set_time(self, seconds: float) -> None:
        """Move virtual time forward (never back) to ``seconds``."""
        self._time = max(self._time, seconds)

    def time(self) -> float:
        return self._time

    def is_running(self) -> bool:
        return self._running

    def is_closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        self._ready.clear()
        self._closed = True

    def get_debug(self) -> bool:
        return False

    def set_debug(self, enabled: bool) -> None:
        pass

    # -- scheduling ----------------------------------------------------------------------

    def call_soon(
        self,
        callback: Callable[[Unpack[_Ts]], object],
        *args: Unpack[_Ts],
        context: contextvars.Context | None = None,
    ) -> asyncio.Handle:
        handle = asyncio.Handle(callback, args, self, context=context)
        self._ready.append(handle)
        return handle

    # The loop is only ever used from the driver's thread, so "threadsafe" is the same.
    call_soon_threadsafe = call_soon

    def call_later(
        self,
        delay: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: Unpack[_Ts],
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        return self.call_at(self._time + delay, callback, *args, context=context)

    def call_at(
        self,
        when: float,
        callback: Callable[[Unpack[_Ts]], object],
        *args: Unpack[_Ts],
        context: contextvars.Context | None = None,
    ) -> asyncio.TimerHandle:
        start_timer = getattr(self.owner, "start_timer", None)
        if start_timer is None:
            raise WorkflowAwaitError(
                f"{self._label()}: this loop has no durable timers: asyncio timers work only "
                "inside a running workflow"
            )
        handle: asyncio.TimerHandle = start_timer(when, callback, args, context)
        return handle

    def fire(self, handle: asyncio.TimerHandle) -> None:
        """Run a timer's callback in this activation (its durable timer went off)."""
        self._ready.append(handle)

    def create_future(self) -> asyncio.Future[Any]:
        return asyncio.Future(loop=self)

    def create_task(
        self,
        coro: Coroutine[Any, Any, _T] | Generator[Any, None, _T],
        *,
        name: str | None = None,
        context: contextvars.Context | None = None,
    ) -> asyncio.Task[_T]:
        if context is None:
            return asyncio.Task(coro, loop=self, name=name)
        return asyncio.Task(coro, loop=self, name=name, context=context)  # type: ignore[call-arg]

    # -- errors --------------------------------------------------------------------------

    def get_exception_handler(self) -> Any:
        return self._exception_handler

    def set_exception_handler(self, handler: Any) -> None:
        self._exception_handler = handler

    def default_exception_handler(self, context: dict[str, Any]) -> None:
        # Unretrieved task exceptions end up here; the workflow's own outcome is taken
        # from its main task, so these are only worth a log line.
        logger.debug("workflow loop: %s", context.get("message"), exc_info=context.get("exception"))

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if self._exception_handler is not None:
            self._exception_handler(self, context)
        else:
            self.default_exception_handler(context)

    # -- the outside world is not reachable from a workflow ------------------------------

    def _label(self) -> str:
        info = getattr(self.owner, "info", None)
        if info is None:
            return "workflow"
        return f"workflow {info.name}[{info.workflow_id}]"

    def _no_io(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise WorkflowAwaitError(
            f"{self._label()}: workflow code cannot do I/O or use threads (sockets, "
            "subprocesses, executors): it is replayed from history and must be deterministic; "
            "move that work into a Celery task and await its signature"
        )

    run_in_executor = _no_io  # type: ignore[assignment]
    getaddrinfo = _no_io
    getnameinfo = _no_io
    create_connection = _no_io
    create_server = _no_io
    create_datagram_endpoint = _no_io
    create_unix_connection = _no_io
    create_unix_server = _no_io
    subprocess_exec = _no_io
    subprocess_shell = _no_io
    add_reader = _no_io  # type: ignore[assignment]
    add_writer = _no_io  # type: ignore[assignment]
    sock_recv = _no_io
    sock_sendall = _no_io
    sock_connect = _no_io
    sock_accept = _no_io
    add_signal_handler = _no_io  # type: ignore[assignment]
    remove_signal_handler = _no_io
    remove_reader = _no_io
    remove_writer = _no_io
    connect_read_pipe = _no_io
    connect_write_pipe = _no_io
    connect_accepted_socket = _no_io
    start_tls = _no_io
    sendfile = _no_io
    sock_recv_into = _no_io
    sock_recvfrom = _no_io
    sock_recvfrom_into = _no_io
    sock_sendto = _no_io
    sock_sendfile = _no_io
    set_default_executor = _no_io

    # -- the driver runs the loop (run_until_quiescent), never the workflow's code ------

    def _not_here(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise RuntimeError(
            f"{self._label()}: a workflow's event loop is driven by celery_durable; workflow "
            "code cannot run, stop or reconfigure it"
        )

    run_forever = _not_here
    run_until_complete = _not_here
    stop = _not_here
    set_task_factory = _not_here

    def get_task_factory(self) -> None:
        return None

    def _timer_handle_cancelled(self, handle: asyncio.TimerHandle) -> None:
        pass  # no timer is ever scheduled (call_at refuses them)

    async def shutdown_asyncgens(self) -> None:
        pass

    async def shutdown_default_executor(self, timeout: float | None = None) -> None:
        pass
