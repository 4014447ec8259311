"""Running a canvas inside a workflow: every task a durable step, Celery's meaning kept.

``await chain(...)``, ``await group(...)``, ``await chord(...)`` (and chunks, starmap, and
any nesting of them) run here, as workflow code on the run's deterministic loop: a chain
is a sequence of awaits, a group an ``asyncio.gather``, a chord a gather followed by its
body. Each task is scheduled as its own step, so a replay walks the same canvas to the
same steps, and a worker killed anywhere costs only the steps that had not finished.
There is no result backend, no ``chord_unlock`` and no callback carried in a message: the
workflow itself waits for the header and schedules the body.

How Celery would read the canvas (which step gets which arguments and options, what a
failure means) is in :mod:`._shapes`; this module only runs it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from celery.canvas import Signature, _chain, chord, group
from celery.exceptions import ChordError
from celery.utils.functional import maybe_list

from .. import workflow
from .._codec import encode_error
from ..errors import WorkflowAwaitError
from ..runtime import WorkflowInstance, current_instance
from ._shapes import (
    PER_MESSAGE_OPTIONS,
    add_body_callbacks,
    as_signature,
    chain_steps,
    chord_error_calls,
    chunks_group,
    copy_canvas,
    group_members,
    is_chunks,
    merge_call,
    merge_options,
    yields_group,
)

__all__ = ["ERRBACKS_TASK", "CanvasWalk", "await_canvas", "is_workflow_name"]

#: The built-in task that calls a failed chord's errbacks (see ``_errbacks``).
ERRBACKS_TASK = "celery_durable.canvas.chord_errbacks"

# Options of a chain that chain.run consumes instead of passing them to its first task.
_CHAIN_RUN_OPTIONS = frozenset(
    {"chord", "group_id", "group_index", "link", "link_error", "parent_id", "root_id", "task_id"}
)

# Celery's built-in tasks that call another task in-process; routed like that task.
_MAP_TASKS = frozenset({"celery.map", "celery.starmap"})


def is_workflow_name(name: str) -> bool:
    """True if ``name`` is a durable workflow registered in this process."""
    from .._definition import registry

    return name in registry


def _without_none(options: Mapping[str, Any] | None) -> dict[str, Any]:
    # Signature.apply_async dismisses options given as None.
    return {key: value for key, value in (options or {}).items() if value is not None}


class CanvasWalk:
    """Runs one awaited canvas on a workflow instance's loop.

    ``link`` callbacks of the canvas's tasks run as durable steps too, concurrently with
    the rest of the canvas; :meth:`finish_callbacks` waits for them.
    """

    def __init__(self, instance: WorkflowInstance) -> None:
        self.instance = instance
        self._callbacks: list[asyncio.Future[Any]] = []

    @property
    def _where(self) -> str:
        info = self.instance.info
        return f"workflow {info.name}[{info.workflow_id}]"

    async def run(
        self,
        sig: Signature,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
    ) -> Any:
        """Apply ``sig`` as ``sig.apply_async(args, kwargs, **options)`` would, and return
        what ``.get()`` on its result would return."""
        kwargs = dict(kwargs or {})
        call = _without_none(options)
        if isinstance(sig, chord):
            return await self._chord(sig, args, kwargs, call)
        if isinstance(sig, group):
            return await self._group(sig, args, kwargs, call)
        if isinstance(sig, _chain):
            return await self._chain(sig, args, kwargs, call)
        if is_chunks(sig):
            # chunks.apply_async runs a group of starmaps, routed like the task; unlike
            # Celery (which drops them there) options set on the chunks apply too.
            call = {**merge_options(sig.options, call), "route_name": _task_name(sig)}
            return await self._group(chunks_group(sig), args, kwargs, call)
        return await self._task(sig, args, kwargs, call)

    # -- the shapes -----------------------------------------------------------------------

    async def _task(
        self, sig: Signature, args: Sequence[Any], kwargs: dict[str, Any], call: dict[str, Any]
    ) -> Any:
        name = sig.task
        if not name:
            raise WorkflowAwaitError(
                f"{self._where} awaited a signature that names no task; await the signature "
                "of a task (`await task.s(...)`)."
            )
        step_args, step_kwargs, options = merge_call(sig, args, kwargs, call)
        if name in _MAP_TASKS:
            options["route_name"] = options.get("route_name") or _task_name(sig)
        callbacks = maybe_list(options.pop("link", None)) or []
        for key in PER_MESSAGE_OPTIONS:
            options.pop(key, None)
        if is_workflow_name(name):
            # A durable workflow's signature runs as a child run, linked to this one.
            value = await self.instance.start_child(name, step_args, step_kwargs, options)
        else:
            # link_error stays in the options: the worker that runs the step calls the
            # errbacks as it does for any task, with the real request, exception and
            # traceback (a worker with no result backend does too).
            value = await self.instance.schedule_activity(name, step_args, step_kwargs, options)
        for callback in callbacks:
            self._start_callback(callback, value)
        return value

    async def _group(
        self, sig: group, args: Sequence[Any], kwargs: dict[str, Any], call: dict[str, Any]
    ) -> Any:
        if call.get("link") is not None:
            raise TypeError("Cannot add link to group: use a chord")
        if call.get("link_error") is not None:
            raise TypeError("Cannot add link to group: do that on individual tasks")
        options = merge_options(sig.options, call)
        options.pop("task_id", None)
        members = group_members(sig.tasks)
        outcomes = await self._all(members, args, kwargs, options)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # the first failure in order, as GroupResult.get() raises
        if len(members) == 1 and yields_group(members[0]):
            return outcomes[0]  # group.apply_async gives that member's GroupResult itself
        return outcomes

    async def _chain(
        self, sig: _chain, args: Sequence[Any], kwargs: dict[str, Any], call: dict[str, Any]
    ) -> Any:
        options = {**sig.options, **call}
        callbacks = maybe_list(options.get("link")) or []
        errbacks = maybe_list(options.get("link_error")) or []
        first = {k: v for k, v in options.items() if k not in _CHAIN_RUN_OPTIONS}
        partial = tuple(args) + tuple(sig.args) if args and not sig.immutable else sig.args
        steps = chain_steps(sig.tasks, callbacks, errbacks)
        if not steps:
            return None
        value = await self.run(steps[0], partial, kwargs, first)
        for step in steps[1:]:
            value = await self.run(step, (value,))
        return value

    async def _chord(
        self, sig: chord, args: Sequence[Any], kwargs: dict[str, Any], call: dict[str, Any]
    ) -> Any:
        if sig.body is None:
            raise WorkflowAwaitError(
                f"{self._where} awaited a chord without a body; give it one: "
                "`chord(header, body)` or `chord(header)(body)` outside a workflow."
            )
        body = as_signature(sig.body)
        partial = tuple(args) + tuple(sig.args) if args and not sig.immutable else sig.args
        header_kwargs = {**(sig.kwargs.get("kwargs") or {}), **kwargs}
        # As chord.apply_async/run: countdown and eta delay the header only; the chord's
        # other options apply to the header tasks and to the body, and its callbacks and
        # errbacks belong to the body.
        delay = {key: call.pop(key) for key in ("countdown", "eta") if call.get(key) is not None}
        options = {**sig.options, **call}
        for key in ("countdown", "eta"):
            value = options.pop(key, None)
            if value is not None:
                delay.setdefault(key, value)
        add_body_callbacks(
            body,
            maybe_list(options.pop("link", None)) or [],
            maybe_list(options.pop("link_error", None)) or [],
        )
        body.options.update({k: v for k, v in options.items() if k not in PER_MESSAGE_OPTIONS})
        header_options = {
            **{k: v for k, v in options.items() if k not in ("chain", "chord", "task_id")},
            **delay,
        }
        header = sig.tasks
        if isinstance(header, group):
            header_options = merge_options(header.options, header_options)
            header = header.tasks
        members = group_members(maybe_list(header) or [])
        outcomes = await self._all(members, partial, header_kwargs, header_options)
        for index, outcome in enumerate(outcomes):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                # What a result backend makes of a failed header: the chord fails with a
                # ChordError naming the dependency, and the body's errbacks are called.
                error = ChordError(f"Dependency {members[index].task}[{index}] raised {outcome!r}")
                error.__cause__ = outcome
                # Celery hands a group body's members the original error instead.
                await self._call_errbacks(body, outcome if isinstance(body, group) else error)
                raise error
        return await self.run(body, (outcomes,))

    # -- helpers --------------------------------------------------------------------------

    async def _all(
        self,
        members: Iterable[Signature],
        args: Sequence[Any],
        kwargs: Mapping[str, Any],
        options: Mapping[str, Any],
    ) -> list[Any]:
        """Run ``members`` concurrently; their values, or the exceptions they raised."""
        runs = [self.run(member, args, kwargs, options) for member in members]
        if not runs:
            return []
        # Every member runs to its end even when one fails, as in Celery: no step is left
        # running unobserved, and the failure reported is the first one in order.
        return list(await asyncio.gather(*runs, return_exceptions=True))

    async def _call_errbacks(self, body: Signature, error: BaseException) -> None:
        calls = chord_error_calls(body)
        if not calls:
            return
        for entry in calls:
            # The body never ran, so it has no task id; errbacks get a stable stand-in.
            entry["request"]["id"] = str(workflow.uuid4())
        # Celery logs an errback that raises and keeps the chord's error; so does this.
        with contextlib.suppress(Exception):
            await self.instance.schedule_activity(
                ERRBACKS_TASK, (calls, encode_error(error)), {}, {}
            )

    def _start_callback(self, callback: Any, value: Any) -> None:
        # Celery applies a task's link callbacks with its result as the first argument.
        sig = as_signature(callback).clone()
        self._callbacks.append(asyncio.ensure_future(self.run(sig, (value,))))

    async def finish_callbacks(self) -> None:
        """Wait for every ``link`` callback started so far (and those they start)."""
        while self._callbacks:
            pending, self._callbacks = self._callbacks, []
            # A callback's failure is its own, as in Celery: it does not fail the canvas.
            await asyncio.gather(*pending, return_exceptions=True)

    def cancel_callbacks(self) -> None:
        """Cancel the ``link`` callbacks still running."""
        for future in self._callbacks:
            future.cancel()


def _task_name(sig: Signature) -> str | None:
    # The task a chunks/map/starmap signature calls, whose routing it takes.
    task = sig.kwargs.get("task")
    return None if task is None else as_signature(task).task


async def await_canvas(
    sig: Signature,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Any:
    """Run ``sig`` (a task signature or any canvas) inside the running workflow.

    Equivalent of ``sig.apply_async(args, kwargs, **options).get()`` with every task a
    durable step (and every durable workflow's signature a child run). Returns what
    Celery's result would give: a task's return value, a group's list, a chain's last
    value, a chord's body's value.

    Raises:
        NotInWorkflowError: not inside a running workflow.
        WorkflowAwaitError: a signature in the canvas names no task.
        ChordError: a task in a chord's header failed.
        Exception: a task's own exception (a group's first failing member in order).
    """
    instance = current_instance(f"await {getattr(sig, 'name', None) or 'signature'}")
    walk = CanvasWalk(instance)
    try:
        value = await walk.run(copy_canvas(sig), args, kwargs, options)
    except asyncio.CancelledError:
        walk.cancel_callbacks()
        raise
    except Exception:
        await walk.finish_callbacks()
        raise
    await walk.finish_callbacks()
    return value
