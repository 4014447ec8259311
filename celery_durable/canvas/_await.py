"""``await signature`` inside a workflow.

Celery's :class:`~celery.canvas.Signature` is not awaitable on its own; importing
celery_durable gives it an ``__await__`` that, inside a running workflow, runs the task
(or the whole canvas: chain, group, chord, chunks, starmap) as durable steps and returns
what the canvas's result would. Outside a workflow it raises
:class:`~celery_durable.errors.NotInWorkflowError` rather than silently doing nothing.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Generator
from typing import Any

from celery.canvas import Signature
from celery.result import AsyncResult

from ..errors import WorkflowAwaitError
from ._walk import await_canvas, is_workflow_name

__all__ = ["install", "is_workflow_name"]


def _await_signature(sig: Signature) -> Generator[Any, None, Any]:
    return (yield from await_canvas(sig).__await__())


def _await_async_result(result: AsyncResult[Any]) -> Generator[Any, None, Any]:
    raise WorkflowAwaitError(
        f"an AsyncResult ({result.id}) was awaited. Inside a @durable_workflow, await the "
        "task's signature instead of calling it: `await task.s(...)`, not "
        "`await task.delay(...)`."
    )
    yield  # pragma: no cover - makes this a generator, as __await__ must return one


def install() -> None:
    """Make signatures awaitable (idempotent)."""
    Signature.__await__ = _await_signature  # type: ignore[method-assign,assignment]
    # asyncio.gather keys a dict by its arguments; a signature is a dict (unhashable), so
    # give it identity hashing. Distinct live objects never share an identity hash, so no
    # two signatures are mistaken for one.
    Signature.__hash__ = object.__hash__  # type: ignore[assignment]
    AsyncResult.__await__ = _await_async_result  # type: ignore[attr-defined]
    # isinstance(x, Awaitable) results are cached per class; registering resets the cache
    # for any class checked before the patch.
    collections.abc.Awaitable.register(Signature)
    collections.abc.Awaitable.register(AsyncResult)
