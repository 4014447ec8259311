"""Creating runs, and the driver task's messages that start one.

A workflow's driver task receives two kinds of message. A *wake* (``publish_wake``,
marked by the ``durable_wake`` header) carries a run id and drives that run. Any other
message is a *start request*: a process that does not import the workflow's module
(``app.send_task("proj.checkout", args=[...])``, Celery beat, a ``link`` callback sent by
name) knows only the task name and sends the workflow's own arguments as the task's.
Such a message creates a run with those arguments under the message's task id, so a
copy delivered again finds the run the first one made instead of starting a second, and
then drives it in the same task.

Arguments that do not fit the workflow are not checked here: the run is created anyway
and its first turn fails it (``WorkflowArgumentsError``), so the request stays visible
in the store with its input, instead of vanishing with a log line.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

from celery import Celery

from .._config import settings_for, store_for
from ..errors import DurableError
from ..store import NewRun
from ..worker import DRIVER_OPTION_KEYS, is_wake
from ._ids import check_workflow_id
from ._local import local_turns

__all__ = ["create_run", "driver_options", "on_driver_message"]

logger = logging.getLogger(__name__)


def driver_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The routing options (``queue``, ``routing_key``...) kept with a run for its wakes."""
    return {k: v for k, v in options.items() if k in DRIVER_OPTION_KEYS}


def create_run(
    app: Celery,
    workflow: str,
    run_id: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
) -> bool:
    """Insert a ``PENDING`` run of ``workflow`` unless ``run_id`` exists; True if it was
    created (the caller then wakes or drives it).

    Raises:
        WorkflowIdError: the store cannot keep ``run_id`` (see :func:`check_workflow_id`).
        WorkflowEncodeError: the serializer cannot encode the arguments.
        DurableError: ``run_id`` belongs to a run of another workflow.
    """
    check_workflow_id(run_id, workflow)
    label = f"workflow {workflow}[{run_id}]"
    content_type, payload = settings_for(app).codec.dumps(
        [list(args), dict(kwargs)], f"the arguments of {label}"
    )
    store = store_for(app)
    if store.create_run(NewRun(run_id, workflow, content_type, payload, dict(options))):
        return True
    existing = store.require_run(run_id)
    if existing.workflow != workflow:
        raise DurableError(
            f"workflow id {run_id!r} already belongs to a run of {existing.workflow!r}, "
            f"not {workflow!r}; choose another workflow_id (or task id)"
        )
    return False


def on_driver_message(
    app: Celery,
    workflow: str,
    fn: Callable[..., Coroutine[Any, Any, Any]],
    request: Any,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    options: Mapping[str, Any],
) -> str | None:
    """Handle one message of the driver task ``workflow``; returns the run's status.

    A wake drives the run it names. A start request (see the module docstring) creates
    a run of ``fn`` with the message's ``args`` and ``kwargs``, its id the message's task
    id and its later wakes routed by the workflow's own ``options``, and drives it.

    Raises:
        WorkflowEncodeError: a start request whose arguments the app's serializer cannot
            encode (a message in another accepted content type); the task fails, and
            Celery logs the error.
        WorkflowIdError: a start request whose task id the store cannot keep as a
            workflow id (too long, or containing ``/``).
        DurableError: a start request whose task id is a run of another workflow.
    """
    if is_wake(request):
        if len(args) != 1 or kwargs:
            logger.error(
                "workflow %s: a wake message must carry one run id, not args=%r kwargs=%r; "
                "ignored (start runs by sending the task without the durable_wake header)",
                workflow,
                args,
                kwargs,
            )
            return None
        return local_turns.drive_here(app, workflow, fn, str(args[0]))
    # A message without a task id only comes from calling the task directly.
    run_id = str(getattr(request, "id", None) or uuid.uuid4())
    if create_run(app, workflow, run_id, args, kwargs, driver_options(options)):
        logger.info("workflow %s[%s] started by a message sent by name", workflow, run_id)
    else:
        # The same start delivered again (a redelivery, a retried send): the run exists,
        # and driving it again does nothing unless it has something new to do.
        logger.info(
            "workflow %s[%s]: start message delivered again; the run exists", workflow, run_id
        )
    return local_turns.drive_here(app, workflow, fn, run_id)
