"""The built-in task that calls a failed chord's errbacks, where Celery's backend would.

When a chord's header fails, Celery's result backend never runs the body; it calls the
body's errbacks instead (``chord_error_from_stack``), from the worker that saw the last
header task finish. A durable chord has no backend doing that: its workflow schedules
this task as one more step, with the errbacks and the chord's error, so they are called
once, in a worker, the way Celery calls them (new-style errbacks in-process with a
request, an exception and no traceback; old-style ones sent as tasks with a task id).
"""

from __future__ import annotations

from typing import Any

from celery import Task, shared_task
from celery.app.task import Context

from .._codec import decode_error
from ._walk import ERRBACKS_TASK

__all__ = ["call_chord_errbacks"]


@shared_task(name=ERRBACKS_TASK, bind=True)
def call_chord_errbacks(self: Task[Any, Any], calls: list[dict[str, Any]], error: Any) -> int:
    """Call each entry's errbacks as Celery calls a failed chord body's; returns how many
    stand-in requests were made.

    Args:
        calls: ``{"request": {...}, "errbacks": [...]}`` entries, one per body task (see
            ``_shapes.chord_error_calls``).
        error: the chord's error, as ``_codec.encode_error`` describes it.
    """
    exc = decode_error(error)
    for call in calls:
        request = Context({**call["request"], "errbacks": call["errbacks"], "delivery_info": {}})
        # The backend's own errback dispatch, as chord_error_from_stack uses it; a worker
        # with no result backend has it too (DisabledBackend inherits it).
        self.app.backend._call_task_errbacks(request, exc, None)  # type: ignore[attr-defined]
    return len(calls)
