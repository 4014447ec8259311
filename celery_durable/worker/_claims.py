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
from ..store import Recorded
from ._identity import worker_id
from ._messages import (
    HEADER_DISPATCH,
    HEADER_DRIVER,
    HEADER_RUN,
    HEADER_SEQ,
    HEADER_WORKFLOW,
    publish_wake,
)
from ._retrying import retry_while_unreachable
from ._wakes import OutcomeHint, wake

__all__ = [
    "held_dispatches",
    "on_task_failure",
    "on_task_received",
    "on_task_revoked",
    "on_task_success",
]

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


def _requests_held() -> list[Any]:
    """Every request this worker process holds: prefetched, waiting for an ETA, running.

    Celery drops its reserved and scheduled requests when the broker connection is lost
    (their messages cannot be acknowledged any more), so a claim on a message that
    vanished with the broker is not renewed and expires.
    """
    sets = (
        worker_state.active_requests,
        worker_state.reserved_requests,
        getattr(worker_state, "scheduled_requests", ()),  # Celery >= 5.7
    )
    for _ in range(5):
        try:
            # The consumer changes these sets while another thread (the sweeper) reads.
            return [r for held in sets for r in tuple(held)]
        except RuntimeError:
            continue
    return []


def _dispatch_of(request: Any) -> str | None:
    """The dispatch id of a step request (None for any other task)."""
    request_dict = getattr(request, "request_dict", None) or {}
    if _durable_headers(request_dict) is None:
        return None
    return str(request_dict.get(HEADER_DISPATCH) or request.id)


def held_dispatches() -> set[str]:
    """Dispatch ids of the step messages this worker holds (whose claims it renews)."""
    return {d for d in map(_dispatch_of, _requests_held()) if d is not None}


def _holds_another(request: Any, run_id: str, seq: int) -> bool:
    """Whether this process holds a live request for the step other than ``request``."""
    return any(
        other is not request and _durable_headers(other.request_dict) == (run_id, seq)
        for other in _requests_held()
    )


# Ids of messages this worker dropped as duplicates: their "revoked" signal is ours.
_dropped: set[str] = set()


def on_task_received(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Claim a step's message at receipt, or drop it as a duplicate before it runs."""
    if request is None:
        return
    headers = _durable_headers(request.request_dict)
    if headers is None:
        return
    run_id, seq = headers
    app = request.task.app
    retries = int(request.request_dict.get("retries") or 0)
    dispatch_id = str(request.request_dict.get(HEADER_DISPATCH) or request.id)
    store = store_for(app)
    try:
        if store.claim_step(run_id, seq, dispatch_id, worker_id(), retries):
            return
        wake = None
        if not _holds_another(request, run_id, seq):
            # If this worker claimed the step for this very message and holds it no
            # more, Celery requeued the message after the process running it died
            # (task_acks_late with task_reject_on_worker_lost, which reports nothing
            # else): count the loss and send the step again after its backoff.
            policy = settings_for(app).loss_policy
            wake = store.release_step(
                run_id, seq, policy, holder=worker_id(), dispatch_id=dispatch_id
            )
    except Exception:
        # Without the store we cannot know; running a duplicate beats losing the step.
        logger.exception("could not claim step %s of run %s; running it anyway", seq, run_id)
        return
    if wake is not None:
        publish_wake(app, wake[1], wake[0], wake[2])
    logger.info(
        "dropping duplicate message %s for step %s of run %s (already claimed or re-sent)",
        request.id,
        seq,
        run_id,
    )
    _dropped.add(request.id)
    worker_state.revoked.add(request.id)


def _record(
    task: Any,
    error: BaseException | None = None,
    value: Any = None,
    request: Any = None,
    patience: float | None = None,
    here: bool = True,
) -> None:
    """Record a step's outcome, retrying while the store is unreachable.

    The outcome exists only in this process until it is written: while the store is
    away (a restart, a failover, a connection cut) the write is retried with backoff,
    for ``patience`` seconds (None: as long as this process lives). Meanwhile the worker
    still holds the request, so it keeps renewing the step's claim and no other worker
    runs the step again. ``here=False``: this is not where tasks run (the consumer of a
    prefork worker), so the wake goes to the broker.
    """
    request = task.request if request is None else request
    headers = _durable_headers(request)
    if headers is None:
        return
    run_id, seq = headers
    app: Celery = task.app
    store = store_for(app)
    if error is not None:
        outcome: dict[str, Any] = {"error": encode_error(error)}
    else:
        try:
            what = f"the result of step {seq} ({task.name}) of run {run_id}"
            outcome = {"result": settings_for(app).codec.dumps(value, what)}
        except Exception as exc:
            outcome = {"error": encode_error(exc)}
    what = f"the outcome of step {seq} ({task.name}) of run {run_id}"
    attempts = 0

    def write() -> Recorded:
        nonlocal attempts
        attempts += 1
        return store.record_outcome(run_id, seq, retrying=attempts > 1, **outcome)

    recorded = retry_while_unreachable(write, what, patience)
    if recorded is None or not recorded.woken:
        return
    workflow = _header(request, HEADER_WORKFLOW)
    driver = _header(request, HEADER_DRIVER) or {}
    if workflow is None:
        run = store.require_run(run_id)
        workflow, driver = run.workflow, run.options
    if here:
        # Usually the next turn is driven in this process, or handed to the one on this
        # machine that keeps the run's coroutine: no broker message, no replay; and,
        # with the outcome in hand, no read of the run either.
        hint = None
        if recorded.recorded and recorded.events is not None:
            hint = OutcomeHint(seq, str(task.name), recorded.events, **outcome)
        wake(app, workflow, run_id, driver, holder=recorded.driver, hint=hint)
    else:
        publish_wake(app, workflow, run_id, driver)


def on_task_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    """Record a step's result where it ran."""
    if sender is not None:
        _record(sender, value=result)


def on_task_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
    """Record a step's exception where it ran; a lost worker process is not an outcome."""
    if sender is None or exception is None:
        return
    if isinstance(exception, WorkerLostError):
        # The process running the step died: a crash to recover from, not the step's
        # outcome. Send it again after a backoff, or fail it once lost too often.
        headers = _durable_headers(sender.request)
        if headers is not None:
            policy = settings_for(sender.app).loss_policy
            wake = retry_while_unreachable(
                lambda: store_for(sender.app).release_step(*headers, policy, worker_id()),
                f"the loss of step {headers[1]} of run {headers[0]}",
                patience=30.0,
            )
            if wake is not None:
                publish_wake(sender.app, wake[1], wake[0], wake[2])
        return
    _record(sender, error=exception)


def on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    """Record a revoked step as failed with ``TaskRevokedError`` (not our own drops)."""
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
    # the step's headers come from the revoked request itself. This runs in the consumer
    # loop, so it does not wait long for a store that is away: the claim then expires.
    _record(
        sender,
        error=TaskRevokedError(f"task {task_id} was revoked"),
        request=getattr(request, "request_dict", request),
        patience=5.0,
        here=False,
    )
