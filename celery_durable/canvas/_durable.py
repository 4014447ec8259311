"""``durable(canvas)``: run an existing Celery canvas as one durable workflow run.

The canvas is stored as data (signatures are dicts) in the input of a built-in workflow,
``celery_durable.canvas``, which awaits it: every task of the canvas becomes a step of
that run, a chord's body is scheduled by the workflow once its header is recorded, and
no result backend is involved. The built-in workflow is defined when this module is
imported, which importing ``celery_durable`` does, so every worker has it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery, current_app
from celery.canvas import Signature, signature

from .._definition import durable_workflow
from ..client import WorkflowHandle
from ._shapes import to_data
from ._walk import await_canvas

__all__ = ["CANVAS_WORKFLOW", "DurableCanvas", "durable", "run_canvas"]

#: The name of the built-in workflow that runs a canvas durably.
CANVAS_WORKFLOW = "celery_durable.canvas"


@durable_workflow(name=CANVAS_WORKFLOW)
async def run_canvas(
    canvas: dict[str, Any],
    args: list[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """The built-in workflow behind :func:`durable`: await ``canvas`` (a signature as a
    dict), applied with partial ``args``/``kwargs`` and call ``options``."""
    return await await_canvas(signature(canvas), tuple(args or ()), kwargs or {}, options or {})


class DurableCanvas:
    """A signature or canvas to run as a durable workflow run; made by :func:`durable`.

    Start it like the canvas itself, with :meth:`apply_async` or :meth:`delay`; both
    return a :class:`~celery_durable.WorkflowHandle` whose ``get()`` returns what the
    canvas's ``AsyncResult.get()`` would.
    """

    def __init__(self, sig: Signature | Mapping[str, Any], app: Celery | None = None) -> None:
        if isinstance(sig, Mapping) and not isinstance(sig, Signature):
            sig = signature(dict(sig))
        if not isinstance(sig, Signature):
            raise TypeError(
                f"durable() takes a Celery signature or canvas (task.s(...), chain, group, "
                f"chord, chunks...) or its dict form, got {sig!r}"
            )
        self.signature = sig
        self.app = app

    def apply_async(
        self,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        app: Celery | None = None,
        driver_options: Mapping[str, Any] | None = None,
        **options: Any,
    ) -> WorkflowHandle[Any]:
        """Start the run, like the canvas's own ``apply_async``.

        Args:
            args: partial arguments, prepended to the first task(s)' as Celery does.
            kwargs: partial keyword arguments for the first task(s).
            workflow_id: the run's id; starting again with an id that exists returns the
                existing run instead of starting a second one. ``task_id`` is taken as
                the workflow id when this is not given.
            app: the Celery app (default: the one given to :func:`durable`, else the
                current app).
            driver_options: routing of the run's driver turns (``queue``,
                ``routing_key``, ``priority``).
            **options: Celery options for the canvas (``queue``, ``countdown``...),
                applied to its tasks as ``apply_async`` would apply them.

        Raises:
            WorkflowIdError: the store cannot keep ``workflow_id`` (empty, longer than
                255 characters, or containing ``/``).
            WorkflowEncodeError: the canvas or arguments cannot be encoded by the app's
                serializer.
        """
        if workflow_id is None:
            workflow_id = options.pop("task_id", None)
        call = {key: value for key, value in options.items() if value is not None}
        return run_canvas.apply_async(
            (to_data(self.signature), list(args or ()), dict(kwargs or {}), call),
            workflow_id=workflow_id,
            app=app or self.app or current_app,
            **dict(driver_options or {}),
        )

    def delay(self, *args: Any, **kwargs: Any) -> WorkflowHandle[Any]:
        """Start the run with partial arguments, like the canvas's ``delay``."""
        return self.apply_async(args, kwargs)

    def __repr__(self) -> str:
        return f"durable({self.signature!r})"


def durable(sig: Signature | Mapping[str, Any], app: Celery | None = None) -> DurableCanvas:
    """Make a Celery signature or canvas durable: one workflow run, every task a step.

    Example::

        from celery import chord, group
        from celery_durable.canvas import durable

        handle = durable(chord(group(fetch.s(u) for u in urls), merge.s())).apply_async()
        handle.get(timeout=60)  # what the chord's AsyncResult.get() would return

    The canvas keeps Celery's meaning (arguments passed along a chain, a group's list, a
    chord's body called with its header's results, errbacks called on failure), while a
    worker killed at any point costs only the tasks that had not finished: the run
    resumes from its recorded steps, and the chord's body runs once.

    Raises:
        TypeError: ``sig`` is not a signature or canvas.
    """
    return DurableCanvas(sig, app=app)
