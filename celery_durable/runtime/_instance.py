"""One workflow run's coroutine, driven activation by activation.

A :class:`WorkflowInstance` owns a :class:`WorkflowEventLoop` and the run's main task.
Each :meth:`~WorkflowInstance.activate` delivers step outcomes, runs the loop until every
task is blocked, and returns the commands the code issued meanwhile. It does no I/O: the
driver decides where the outcomes come from and what the commands turn into.
"""

from __future__ import annotations

import asyncio
import asyncio.events as asyncio_events
import contextlib
import contextvars
import inspect
import random
import reprlib
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any, NoReturn

from ..errors import NotInWorkflowError, WorkflowArgumentsError, WorkflowAwaitError
from ._commands import (
    PATCH,
    CancelStep,
    Command,
    CompleteWorkflow,
    ContinueAsNew,
    FailWorkflow,
    RecordPatch,
    RunLocal,
    ScheduleActivity,
    SetStatus,
    StartChild,
    StartTimer,
    StepCommand,
    StepOutcome,
    WaitSignal,
    WorkflowInfo,
)
from ._loop import WorkflowEventLoop

__all__ = ["MAX_TIMER_SECONDS", "ContinueAsNewRequest", "WorkflowInstance", "current_instance"]

WorkflowFunction = Callable[..., Coroutine[Any, Any, Any]]

#: The longest durable timer: longer is almost surely a unit mistake (or NaN/infinity).
MAX_TIMER_SECONDS = 3650 * 24 * 3600.0


class ContinueAsNewRequest(BaseException):
    """Raised by ``workflow.continue_as_new``; ends the coroutine like a return would.

    A ``BaseException`` so that a broad ``except Exception`` in workflow code cannot
    swallow it.
    """

    def __init__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        super().__init__(args, dict(kwargs))
        self.call_args = args
        self.call_kwargs = dict(kwargs)


class _DurableTimer(asyncio.TimerHandle):
    """A timer handle whose cancellation cancels the durable timer step too."""

    def __init__(
        self,
        instance: WorkflowInstance,
        seq: int,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        context: contextvars.Context | None,
    ) -> None:
        super().__init__(when, callback, args, instance.loop, context=context)
        self._instance = instance
        self._seq = seq

    def cancel(self) -> None:
        if not self.cancelled() and self._seq in self._instance._timers:
            self._instance._timers.pop(self._seq, None)
            self._instance._issued.append(CancelStep(self._seq))
        super().cancel()


class WorkflowInstance:
    """A workflow coroutine suspended between driver turns."""

    def __init__(
        self,
        fn: WorkflowFunction,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        info: WorkflowInfo,
        encode: Callable[[ScheduleActivity | StartChild], Any] | None = None,
        seq_base: int = 0,
    ) -> None:
        self.info = info
        # Encodes a step's input as it is issued, so that a value the serializer cannot
        # take fails at the workflow's await rather than later in the driver.
        self._encode = encode
        self.loop = WorkflowEventLoop(owner=self)
        self.now = info.start_time
        self.random = random.Random(f"{info.workflow_id}/{seq_base}")
        self.turn = 0
        self._fn = fn
        self._args = tuple(args)
        self._kwargs = dict(kwargs)
        self._main: asyncio.Task[Any] | None = None
        self._next_seq = seq_base + 1
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._timers: dict[int, _DurableTimer] = {}
        self._patches: dict[str, bool] = {}
        self._issued: list[Command] = []
        self.finished = False
        #: Set by replay: the (kind, name) of every recorded step, by seq.
        self.recorded: Mapping[int, tuple[str, str]] = {}
        self.replaying = False
        self._closing = False

    # -- called by workflow code (through the public helpers) ----------------------------

    def _allocate(self, kind: str, patch_id: str | None = None) -> int:
        if self._closing:
            # A finally block awaiting a step while close() throws the coroutine away:
            # start nothing, and let the close end quietly.
            raise GeneratorExit
        # A patch marker the code no longer asks about (a retired patch) keeps its place
        # in history; step over it so later steps keep their numbers. That holds after
        # replay too, for a marker that was the last step recorded: its number is taken.
        while True:
            recorded = self.recorded.get(self._next_seq)
            if recorded is None or recorded[0] != PATCH:
                break
            if self.replaying and recorded == (PATCH, patch_id):
                break
            self._next_seq += 1
        seq = self._next_seq
        self._next_seq += 1
        return seq

    def _wait(self, command: StepCommand) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        seq = command.seq
        self._waiting[seq] = future

        def _on_done(done: asyncio.Future[Any]) -> None:
            if done.cancelled() and self._waiting.pop(seq, None) is not None:
                self._issued.append(CancelStep(seq))

        future.add_done_callback(_on_done)
        self._issued.append(command)
        return future

    def schedule_activity(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> asyncio.Future[Any]:
        """Issue a :class:`ScheduleActivity` and return the future its outcome resolves."""
        return self._wait(self._with_input(ScheduleActivity, name, args, kwargs, options))

    def start_child(
        self,
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> asyncio.Future[Any]:
        """Issue a :class:`StartChild`; the future resolves with the child's result."""
        return self._wait(self._with_input(StartChild, name, args, kwargs, options))

    def _with_input(
        self,
        kind: type[ScheduleActivity] | type[StartChild],
        name: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> ScheduleActivity | StartChild:
        # Encoded before a seq is taken: input the serializer refuses fails at the await
        # and leaves the step numbering as if the step had never been asked for.
        command = kind(self._next_seq, name, tuple(args), dict(kwargs), dict(options))
        if self._encode is not None:
            command = replace(command, payload=self._encode(command))
        return replace(command, seq=self._allocate(command.kind))

    def run_local(
        self, fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> asyncio.Future[Any]:
        """Issue a :class:`RunLocal` for ``fn``; the driver runs it and records the outcome."""
        name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
        seq = self._allocate(RunLocal.kind)
        return self._wait(RunLocal(seq, name, fn, tuple(args), dict(kwargs)))

    def wait_signal(self, name: str) -> asyncio.Future[Any]:
        """Issue a :class:`WaitSignal`; the future resolves with the signal's payload."""
        return self._wait(WaitSignal(self._allocate(WaitSignal.kind), name))

    def start_timer(
        self,
        when: float,
        callback: Callable[..., object],
        args: tuple[Any, ...],
        context: contextvars.Context | None,
    ) -> asyncio.TimerHandle:
        """Issue a :class:`StartTimer`; ``callback`` runs in the turn that sees it fire."""
        delay = when - self.loop.time()
        if not delay <= MAX_TIMER_SECONDS:  # also refuses NaN, which would never fire
            raise ValueError(
                f"workflow {self.info.name}[{self.info.workflow_id}]: a durable timer of "
                f"{delay!r} s is not a duration a workflow can wait (NaN, infinite or more "
                "than ten years); pass seconds (or a timedelta), not milliseconds or a "
                "timestamp, and wait forever on a signal instead of an endless sleep"
            )
        seq = self._allocate(StartTimer.kind)
        when = max(when, self.loop.time())
        handle = _DurableTimer(self, seq, when, callback, args, context)
        self._timers[seq] = handle
        self._issued.append(StartTimer(seq, when, when - self.loop.time()))
        return handle

    def _advance_to(self, seconds: float) -> None:
        """Move the workflow's clock forward (never back) to ``seconds`` after its start."""
        if seconds > self.loop.time():
            self.loop.set_time(seconds)
            self.now = max(self.now, self.info.start_time + timedelta(seconds=seconds))

    def patched(self, patch_id: str) -> bool:
        """True if this run takes the new code path guarded by ``patch_id``.

        A run that is past this point in its history took the old path (False); every
        other execution takes the new one and records that it did (True).
        """
        if patch_id in self._patches:
            return self._patches[patch_id]
        use = True
        if self.replaying:
            # Markers of retired patches may come first: the code asks about this patch
            # where it asked about them before.
            seq = self._next_seq
            while (
                self.recorded.get(seq, ("", ""))[0] == PATCH and self.recorded[seq][1] != patch_id
            ):
                seq += 1
            use = self.recorded.get(seq) == (PATCH, patch_id)
        if use:
            self._issued.append(RecordPatch(self._allocate(PATCH, patch_id), patch_id))
        self._patches[patch_id] = use
        return use

    def set_status(self, key: str, value: Any) -> None:
        """Issue a :class:`SetStatus`."""
        self._issued.append(SetStatus(key, value))

    def continue_as_new(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> NoReturn:
        """End the coroutine with a :class:`ContinueAsNewRequest` for these arguments.

        Raises:
            TypeError: the arguments do not fit the workflow function; checked here, where
                the code can still handle it, because the new run could not even start.
        """
        try:
            inspect.signature(self._fn).bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"workflow {self.info.name}[{self.info.workflow_id}]: the arguments given to "
                f"continue_as_new do not match {getattr(self._fn, '__name__', 'it')}: {exc}"
            ) from None
        raise ContinueAsNewRequest(tuple(args), kwargs)

    # -- called by the driver -----------------------------------------------------------

    def activate(
        self, outcomes: Sequence[StepOutcome], now: datetime, cancel: bool = False
    ) -> list[Command]:
        """Deliver ``outcomes`` in order, run until blocked, and return the new commands.

        The first activation starts the coroutine. ``now`` is the turn's recorded time;
        it never moves the workflow's clock backwards. ``cancel`` raises CancelledError
        in the workflow at its current await (after the outcomes are delivered).
        """
        if self.finished:
            raise RuntimeError(f"workflow {self.info.workflow_id} has already finished")
        self.turn += 1
        if now > self.now:
            self.now = now
        self.loop.set_time((self.now - self.info.start_time).total_seconds())
        if self._main is None:
            self._main = self.loop.create_task(self._start())
        for outcome in outcomes:
            timer = self._timers.pop(outcome.seq, None)
            if timer is not None:
                if not timer.cancelled():
                    # The timer went off by the store's clock; the host running this turn
                    # may be behind it. Code after a sleep never sees a time before its
                    # deadline (replay delivers it in the same turn, so it agrees).
                    self._advance_to(timer.when())
                    self.loop.fire(timer)
                continue
            future = self._waiting.pop(outcome.seq, None)
            # A future the code already cancelled (or a step it never awaited again after
            # a code change) has nobody waiting: its outcome is simply dropped.
            if future is None or future.done():
                continue
            if outcome.error is not None:
                future.set_exception(outcome.error)
            else:
                future.set_result(outcome.value)
        if cancel:
            self._main.cancel()
        self.loop.run_until_quiescent()
        issued, self._issued = self._issued, []
        if self._main.done():
            self.finished = True
            # Nothing will ever wait for the steps still open (tasks started and left
            # running, a child not awaited): cancel them, which revokes the tasks and
            # cancels the children, as a finished Temporal workflow does.
            for seq in sorted([*self._waiting, *self._timers]):
                issued.append(CancelStep(seq))
            self._waiting.clear()
            self._timers.clear()
            issued.append(self._outcome(self._main, self.info))
            self.loop.close()
        return issued

    def _start(self) -> Coroutine[Any, Any, Any]:
        """The workflow's coroutine, called with the run's arguments.

        Arguments that do not fit the function give a coroutine raising
        :class:`WorkflowArgumentsError` instead: the run then fails like any workflow
        exception, with the reason and its input kept. Runs started through the API are
        checked before they are created; a run started by a message sent by name
        (``app.send_task``, Celery beat) can only be checked here.
        """
        try:
            inspect.signature(self._fn).bind(*self._args, **self._kwargs)
        except TypeError as exc:
            return _raise(self._arguments_error(exc))
        except ValueError:
            pass  # no signature to check against (a builtin): let the call decide
        return self._fn(*self._args, **self._kwargs)

    def _arguments_error(self, exc: TypeError) -> WorkflowArgumentsError:
        name = self.info.name
        fn = getattr(self._fn, "__name__", "the workflow function")
        short = reprlib.Repr()  # a message, not a dump of whatever was sent
        short.maxstring = short.maxother = 60
        # Names and defaults say what to pass; annotations may be unevaluated strings.
        signature = inspect.signature(self._fn)
        bare = signature.replace(
            parameters=[p.replace(annotation=p.empty) for p in signature.parameters.values()],
            return_annotation=signature.empty,
        )
        return WorkflowArgumentsError(
            f"workflow {name}[{self.info.workflow_id}]: the arguments args="
            f"{short.repr(list(self._args))} kwargs={short.repr(self._kwargs)} do not match "
            f"{fn}{bare}: {exc}. Start it with arguments that fit "
            f"that signature; a message sent by name passes its args and kwargs to the "
            f"workflow unchanged, e.g. app.send_task({name!r}, args=[...], kwargs={{...}})."
        )

    @staticmethod
    def _outcome(
        task: asyncio.Task[Any], info: WorkflowInfo
    ) -> CompleteWorkflow | FailWorkflow | ContinueAsNew:
        if task.cancelled():
            return FailWorkflow(asyncio.CancelledError())
        error = task.exception()
        if isinstance(error, ContinueAsNewRequest):
            return ContinueAsNew(error.call_args, error.call_kwargs)
        if isinstance(error, TypeError) and "can't be used in 'await' expression" in str(error):
            # Python's own message does not say what to await instead.
            wrapped = WorkflowAwaitError(
                f"workflow {info.name}[{info.workflow_id}]: {error}. Inside a workflow, "
                "await task signatures (`await task.s(...)`), coroutines and asyncio "
                "primitives such as asyncio.gather."
            )
            wrapped.__cause__ = error
            wrapped.__traceback__ = error.__traceback__
            return FailWorkflow(wrapped)
        if error is not None:
            return FailWorkflow(error)
        return CompleteWorkflow(task.result())

    def close(self) -> None:
        """Throw the suspended coroutine away without running the workflow any further.

        For the driver, when it drops an instance (cache eviction, a lost race, a failed
        replay). Python closes a suspended coroutine when it is garbage collected, which
        runs its ``finally`` blocks with no workflow loop running, in whatever thread
        collects it: a step awaited there (a saga's compensation) would fail with
        NotInWorkflowError as an "exception ignored". Here those blocks run on this
        instance's loop and a step they await ends the close without issuing anything;
        the run's next turn, wherever it runs, replays them for real. Idempotent.
        """
        if self._closing:
            return
        self._closing = True
        self.finished = True
        tasks = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
        previous = asyncio_events._get_running_loop()
        asyncio_events._set_running_loop(self.loop)
        try:
            for task in tasks:
                task._log_destroy_pending = False  # type: ignore[attr-defined]
                # Code that insists on running (awaits a plain future, swallows the exit)
                # is dropped all the same.
                with contextlib.suppress(BaseException):
                    task.get_coro().close()
        finally:
            asyncio_events._set_running_loop(previous)
        self.loop.close()

    @property
    def pending_seqs(self) -> list[int]:
        """Steps issued and still awaited, in order."""
        return sorted([*self._waiting, *self._timers])


def current_instance(helper: str) -> WorkflowInstance:
    """The instance whose loop is running now, or a :class:`NotInWorkflowError`.

    ``helper`` names what the caller tried to use, for the error message.
    """
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    owner = getattr(loop, "owner", None)
    if not isinstance(owner, WorkflowInstance):
        raise NotInWorkflowError(
            f"{helper} can only be used inside a running @durable_workflow; outside one, "
            "start tasks with .delay()/.apply_async() and workflows with their .delay()"
        )
    return owner


async def _raise(error: BaseException) -> NoReturn:
    raise error
