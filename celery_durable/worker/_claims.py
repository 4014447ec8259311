"""The signal handlers that tie a Celery task message to a durable step.

* ``task_received`` (worker main process): a step message may run only if it carries the
  step's current dispatch id and the step is not yet claimed; any other copy (a broker
  redelivery, a sweeper re-send that lost the race) is dropped as revoked before it runs.
* ``task_success`` / ``task_failure`` / ``task_revoked`` (where the task ran): record the
  outcome under ``(run, seq)`` once and wake the driver with one message per burst.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.exceptions import TaskRevokedError, WorkerLostError
from celery.worker import state as worker_state

from .._codec import encode_error
from .._config import settings_for, store_for
from ._identity import worker_id
from ._messages import (
    HEADER_DISPATCH,
    HEADER_DRIVER,
    HEADER_RUN,
    HEADER_SEQ,
    HEADER_WORKFLOW,
    publish_wake,
)
from ._republish import resend

__all__ = ["on_task_failure", "on_task_received", "on_task_revoked", "on_task_success"]

logger = logging.getLogger(__name__)


def _header(source: Any, key: str) -> Any:
    # Headers arrive as a dict (a worker Request) or as attributes (a task's Context).
    if isinstance(source, dict):
        return source.get(key)
    return getattr(source, key, None)


def _durable_headers(source: Any) -> tuple[str, int] | None:
    run_id = _header(source, HEADER_RUN)
    seq = _header(source, HEADER_SEQ)
    if run_id is None or seq is None:
        return None
    return str(run_id), int(seq)


# Ids of messages this worker dropped as duplicates: their "revoked" signal is ours.
_dropped: set[str] = set()


def on_task_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is None:
        return
    headers = _durable_headers(request.request_dict)
    if headers is None:
        return
    run_id, seq = headers
    app = request.task.app
    retries = int(request.request_dict.get("retries") or 0)
    try:
        dispatch_id = str(request.request_dict.get(HEADER_DISPATCH) or request.id)
        claimed = store_for(app).claim_step(run_id, seq, dispatch_id, worker_id(), retries)
    except Exception:
        # Without the store we cannot know; running a duplicate beats losing the step.
        logger.exception("could not claim step %s of run %s; running it anyway", seq, run_id)
        return
    if not claimed:
        logger.info(
            "dropping duplicate message %s for step %s of run %s (already claimed or re-sent)",
            request.id,
            seq,
            run_id,
        )
        _dropped.add(request.id)
        worker_state.revoked.add(request.id)


def _record(
    task: Any, error: BaseException | None = None, value: Any = None, request: Any = None
) -> None:
    request = task.request if request is None else request
    headers = _durable_headers(request)
    if headers is None:
        return
    run_id, seq = headers
    app: Celery = task.app
    store = store_for(app)
    if error is not None:
        _recorded, wake = store.record_outcome(run_id, seq, error=encode_error(error))
    else:
        try:
            what = f"the result of step {seq} ({task.name}) of run {run_id}"
            payload = settings_for(app).codec.dumps(value, what)
        except Exception as exc:
            _recorded, wake = store.record_outcome(run_id, seq, error=encode_error(exc))
        else:
            _recorded, wake = store.record_outcome(run_id, seq, result=payload)
    if wake:
        workflow = _header(request, HEADER_WORKFLOW)
        driver = _header(request, HEADER_DRIVER) or {}
        if workflow is None:
            run = store.require_run(run_id)
            workflow, driver = run.workflow, run.options
        publish_wake(app, workflow, run_id, driver)


def on_task_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if sender is not None:
        _record(sender, value=result)


def on_task_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    if sender is None or exception is None:
        return
    if isinstance(exception, WorkerLostError):
        # The process running the step died: that is a crash to recover from, not the
        # step's outcome. Give it a new dispatch and send it again.
        headers = _durable_headers(sender.request)
        if headers is not None:
            dispatch = store_for(sender.app).release_step(*headers)
            if dispatch is not None:
                resend(sender.app, [dispatch])
        return
    _record(sender, error=exception)


def on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is None or sender is None:
        return
    task_id = getattr(request, "id", None) or getattr(request, "task_id", None)
    if task_id in _dropped:
        # Our own drop of a duplicate. Forget the id again, so that a later Celery retry
        # of the copy that won (same task id) is not taken for revoked too.
        _dropped.discard(task_id)
        worker_state.revoked.discard(task_id)
        return
    # Revocation is reported by the worker's main process, outside the task's context:
    # the step's headers come from the revoked request itself.
    _record(
        sender,
        error=TaskRevokedError(f"task {task_id} was revoked"),
        request=getattr(request, "request_dict", request),
    )
