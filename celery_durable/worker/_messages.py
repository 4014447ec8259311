"""The two kinds of message celery_durable sends, and the headers that mark them.

* A **step message** is the user's own task, unchanged, under its own name, with a task
  id equal to the step's dispatch id and headers naming the run and step. Workers record
  its outcome from signal handlers (see ``_claims``).
* A **wake message** is the workflow's driver task with the run id as its only argument,
  marked by the ``durable_wake`` header (:func:`is_wake`). A driver task message without
  it is a *start request*: the workflow sent by name with its own arguments (see
  ``driver._start``).

Both carry the run id as their Celery ``root_id`` and ``parent_id``, so Flower's task
page (and any tool reading Celery's task tree) names the run each message belongs to
(:func:`lineage`); a wake's arguments read ``run=<run id>`` there.

Publishing always happens after the transaction that made the message necessary has
committed; a message lost between the two is re-sent by the sweeper.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from celery import Celery
from kombu import Producer

__all__ = [
    "DRIVER_OPTION_KEYS",
    "HEADER_DISPATCH",
    "HEADER_RUN",
    "HEADER_SEQ",
    "HEADER_WAKE",
    "batched",
    "is_wake",
    "lineage",
    "publish_step",
    "publish_wake",
    "step_headers",
]

HEADER_RUN = "durable_run"
HEADER_SEQ = "durable_seq"
HEADER_WORKFLOW = "durable_workflow"
HEADER_DRIVER = "durable_driver"
HEADER_WAKE = "durable_wake"
HEADER_DISPATCH = "durable_dispatch"

#: Routing options of a driver (wake) message that are kept with the run.
DRIVER_OPTION_KEYS = ("queue", "routing_key", "exchange", "priority")


def step_headers(
    run_id: str, seq: int, workflow: str, driver_options: Mapping[str, Any]
) -> dict[str, Any]:
    """Headers that tie a task message to step ``seq`` of a run."""
    return {
        HEADER_RUN: run_id,
        HEADER_SEQ: seq,
        HEADER_WORKFLOW: workflow,
        HEADER_DRIVER: dict(driver_options),
    }


def lineage(run_id: str, options: dict[str, Any]) -> dict[str, Any]:
    """Set a message's Celery ``root_id`` and ``parent_id`` to the run it belongs to.

    Celery would otherwise take them from whatever task happens to be sending: a driver
    turn's random task id, or no task at all, so that Flower shows a run's messages as
    unrelated trees. The run id is the one name that stays the same for every message of
    a run, and the one Flower's "root" and "parent" links can lead back from (its
    ``/task/<run id>`` opens the run's page). Options already set are kept.
    """
    options.setdefault("root_id", run_id)
    options.setdefault("parent_id", run_id)
    return options


def batched(producer: Producer, count: int) -> AbstractContextManager[Any]:
    """Group the ``count`` publishes made inside into few round trips where the
    transport can (kombu's ``Producer.batch``: one Redis pipeline), else send each.

    A turn that fans out to a thousand steps otherwise waits for a thousand round trips
    (and, on Redis, builds a client object for each). A batch is only flushed when the
    block ends, so single messages are sent at once.
    """
    batch = getattr(producer, "batch", None)  # kombu >= 5.7
    return batch() if batch is not None and count > 1 else nullcontext()


def publish_step(
    app: Celery,
    name: str,
    args: Any,
    kwargs: Any,
    options: Mapping[str, Any],
    dispatch_id: str,
    headers: dict[str, Any],
    producer: Producer | None = None,
    task_id: str | None = None,
) -> None:
    """Send the task ``name`` as one dispatch of a step.

    The dispatch id travels in a header; the Celery task id is the dispatch id for the
    first copy and a fresh id for re-sent copies (``task_id``), because a worker drops a
    losing copy by revoking its task id, which must not also revoke the copy that won.
    """
    opts = dict(options)
    merged = dict(opts.pop("headers", None) or {})
    merged.update(headers)
    merged[HEADER_DISPATCH] = dispatch_id
    task_id = task_id or dispatch_id
    # The outcome is recorded in the store; a copy in the result backend would be a
    # second write per step that nothing reads (a step can still ask for one with
    # .set(ignore_result=False)). Nor is the step a child of the driver turn sending it.
    opts.setdefault("ignore_result", True)
    opts["add_to_parent"] = False
    run_id = merged.get(HEADER_RUN)
    if run_id is not None:
        lineage(str(run_id), opts)
        # With root and parent given, Celery no longer applies task_inherit_parent_priority
        # from the sending task; the step's parent is its run, so it inherits the run's.
        priority = (merged.get(HEADER_DRIVER) or {}).get("priority")
        if priority is not None and app.conf.task_inherit_parent_priority:
            opts.setdefault("priority", priority)
    task = app.tasks.get(name)
    if task is not None:
        # The registered task knows its own routing, serializer and default options.
        task.apply_async(
            tuple(args), dict(kwargs), task_id=task_id, headers=merged, producer=producer, **opts
        )
    else:
        app.send_task(
            name,
            tuple(args),
            dict(kwargs),
            task_id=task_id,
            headers=merged,
            producer=producer,
            **opts,
        )


def publish_wake(
    app: Celery,
    workflow: str,
    run_id: str,
    driver_options: Mapping[str, Any],
    producer: Producer | None = None,
) -> None:
    """Ask a worker to drive ``run_id``: the workflow's driver task, ``run=<id>`` in Flower."""
    options = {k: v for k, v in driver_options.items() if k in DRIVER_OPTION_KEYS}
    app.send_task(
        workflow,
        (run_id,),
        headers={HEADER_WAKE: True},
        producer=producer,
        # A turn's return value is not the run's result (that is in the store).
        ignore_result=True,
        add_to_parent=False,
        # What Flower shows as the task's arguments, and searches.
        argsrepr=f"run={run_id}",
        **lineage(run_id, options),
    )


def is_wake(request: Any) -> bool:
    """True when a driver task's ``request`` (its ``task.request``) is a wake message
    sent by :func:`publish_wake`; False for a start request, which has no such header.

    Celery hands a message's own headers to the task as attributes of the request: the
    worker builds the request from the message headers (task protocol 2, and protocol 1
    messages, which it converts). A message whose body lacks ``args`` is converted
    differently and keeps them only in ``request.headers`` (which Celery 5.3 and later
    also fill for the others). Either place marks a wake: taking a wake for a start
    request would start a run with the run id as its argument.
    """
    if getattr(request, HEADER_WAKE, None):
        return True
    headers = getattr(request, "headers", None)
    return isinstance(headers, Mapping) and bool(headers.get(HEADER_WAKE))
