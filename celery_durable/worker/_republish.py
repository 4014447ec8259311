"""Publishing steps again from what the store kept: after a lost message, a dead worker
or a retry. The one place that turns a stored :class:`~celery_durable.store.Dispatch`
back into a task message.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

from celery import Celery

from .._codec import encode_error
from .._config import settings_for, store_for
from ..errors import ContentDisallowedError
from ..store import Dispatch
from ._messages import publish_step, publish_wake, step_headers

__all__ = ["publish_resumed", "resend", "retry_run"]

logger = logging.getLogger(__name__)


def resend(app: Celery, dispatches: Iterable[Dispatch], copies: bool = False) -> int:
    """Publish each dispatch again; returns how many were sent.

    ``copies`` means the earlier message of the same dispatch may still be delivered, so
    this one gets a task id of its own (see :func:`publish_step`).

    A dispatch whose stored input the app refuses to decode (see
    :class:`~celery_durable.errors.ContentDisallowedError`) is not sent: its run is
    parked as STUCK with the reason, and the others are sent all the same.
    """
    items = list(dispatches)
    if not items:
        return 0
    codec = settings_for(app).codec
    sent = 0
    with app.producer_or_acquire() as producer:
        for dispatch in items:
            label = f"step {dispatch.seq} ({dispatch.name}) of workflow {dispatch.workflow}"
            try:
                args, kwargs, options = codec.loads(
                    dispatch.content_type,
                    dispatch.input,
                    f"the input of {label}[{dispatch.run_id}]",
                )
            except ContentDisallowedError as exc:
                # One bad row stops its own run, never the recovery of every other.
                logger.error("%s; its run is parked as STUCK", exc)
                store_for(app).park_unreadable(dispatch.run_id, encode_error(exc))
                continue
            publish_step(
                app,
                dispatch.name,
                args,
                kwargs,
                options,
                dispatch.dispatch_id,
                step_headers(
                    dispatch.run_id, dispatch.seq, dispatch.workflow, dispatch.driver_options
                ),
                producer=producer,
                task_id=str(uuid.uuid4()) if copies else None,
            )
            sent += 1
    return sent


def retry_run(app: Celery, run_id: str) -> None:
    """Put a STUCK or FAILED run back to work and send what it now waits for.

    The store rewinds the run (see ``Store.resume``); the steps it scheduled again are
    published and the run is woken.

    Raises:
        WorkflowNotFoundError: no such run.
        DurableError: the run is neither STUCK nor FAILED, or cannot be rewound.
    """
    store_for(app).resume(run_id)
    publish_resumed(app, run_id)


def publish_resumed(app: Celery, run_id: str) -> None:
    """Send the steps a resumed run scheduled again, and wake it."""
    store = store_for(app)
    run = store.require_run(run_id)
    resend(app, store.dispatches_to_resend(run_id))
    publish_wake(app, run.workflow, run.id, run.options)
