"""``await signature`` inside a workflow.

Celery's :class:`~celery.canvas.Signature` is not awaitable on its own; importing
celery_durable gives it an ``__await__`` that, inside a running workflow, schedules the
task as a durable step and waits for its recorded outcome. Outside a workflow it raises
:class:`~celery_durable.errors.NotInWorkflowError` rather than silently doing nothing.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Generator
from typing import Any

from celery.canvas import Signature, _chain, chord, group
from celery.result import AsyncResult

from .._instance import current_instance
from ..errors import WorkflowAwaitError

__all__ = ["install", "is_workflow_name"]


#: Set by the workflow registry: tells whether a task name belongs to a durable workflow.
def is_workflow_name(name: str) -> bool:
    """True if ``name`` is a durable workflow registered in this process."""
    from .._definition import registry

    return name in registry


# Options that describe one particular message, not the step: the driver sets its own.
_PER_MESSAGE_OPTIONS = frozenset({"task_id", "parent_id", "root_id", "reply_to", "chord"})


def _await_signature(sig: Signature) -> Generator[Any, None, Any]:
    instance = current_instance(f"await {sig.name or 'signature'}")
    where = f"workflow {instance.info.name}[{instance.info.workflow_id}]"
    if isinstance(sig, (group, _chain, chord)):
        raise WorkflowAwaitError(
            f"{where} awaited a {type(sig).__name__}; awaiting canvas primitives is not "
            "supported yet. Await each signature (asyncio.gather for a group) instead."
        )
    name = sig.task
    if name is None:
        raise WorkflowAwaitError(
            f"{where} awaited a signature that names no task; await the signature of a "
            "task (`await task.s(...)`)."
        )
    if is_workflow_name(name):
        raise WorkflowAwaitError(
            f"{where} awaited the durable workflow {name!r}; child workflows are not "
            "supported yet. Start it with .delay() and keep its workflow id, or await the "
            "tasks it runs directly."
        )
    options = {k: v for k, v in sig.options.items() if k not in _PER_MESSAGE_OPTIONS}
    future = instance.schedule_activity(name, sig.args, sig.kwargs, options)
    return (yield from future)


def _await_async_result(result: AsyncResult[Any]) -> Generator[Any, None, Any]:
    raise WorkflowAwaitError(
        f"an AsyncResult ({result.id}) was awaited. Inside a @durable_workflow, await the "
        "task's signature instead of calling it: `await task.s(...)`, not "
        "`await task.delay(...)`."
    )
    yield  # pragma: no cover - makes this a generator, as __await__ must return one


def install() -> None:
    """Make signatures awaitable (idempotent)."""
    Signature.__await__ = _await_signature  # type: ignore[attr-defined]
    # asyncio.gather keys a dict by its arguments; a signature is a dict (unhashable), so
    # give it identity hashing. Distinct live objects never share an identity hash, so no
    # two signatures are mistaken for one.
    Signature.__hash__ = object.__hash__  # type: ignore[assignment]
    AsyncResult.__await__ = _await_async_result  # type: ignore[attr-defined]
    # isinstance(x, Awaitable) results are cached per class; registering resets the cache
    # for any class checked before the patch.
    collections.abc.Awaitable.register(Signature)
    collections.abc.Awaitable.register(AsyncResult)
