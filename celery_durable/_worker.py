"""Worker integration: claim step messages, record their outcomes, run the sweeper.

Connected once, when celery_durable is imported:

* ``task_received`` (worker main process): a step message may run only if it carries the
  step's current dispatch id and the step is not yet claimed; any other copy (a broker
  redelivery, a sweeper re-send that lost the race) is dropped as revoked before it runs.
* ``task_success`` / ``task_failure`` / ``task_revoked`` (where the task ran): record the
  outcome under ``(run, seq)`` once and wake the driver with one message per burst.
* A worker bootstep that starts the :class:`~celery_durable._sweeper.Sweeper`.
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

from celery import Celery, bootsteps, signals
from celery.exceptions import WorkerLostError
from celery.worker import state as worker_state

from ._codec import encode_error
from ._config import settings_for, store_for
from ._messages import HEADER_DISPATCH, HEADER_RUN, HEADER_SEQ, publish_wake
from ._sweeper import Sweeper, resend

__all__ = ["DurableWorkerStep", "connect"]

logger = logging.getLogger(__name__)

HEADER_WORKFLOW = "durable_workflow"
HEADER_DRIVER = "durable_driver"

# This worker process's identity in the store; set by the bootstep, with a fallback for
# workers started without it.
_identity: dict[str, str] = {}


def worker_id() -> str:
    """The id under which this worker claims steps."""
    if "id" not in _identity:
        _identity["id"] = f"{os.uname().nodename}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        _identity.setdefault("hostname", os.uname().nodename)
    return _identity["id"]


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


def _on_task_received(sender: Any = None, request: Any = None, **_: Any) -> None:
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


def _on_task_success(sender: Any = None, result: Any = None, **_: Any) -> None:
    if sender is not None:
        _record(sender, value=result)


def _on_task_failure(sender: Any = None, exception: BaseException | None = None, **_: Any) -> None:
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


def _on_task_revoked(sender: Any = None, request: Any = None, **_: Any) -> None:
    if request is None or sender is None:
        return
    task_id = getattr(request, "id", None) or getattr(request, "task_id", None)
    if task_id in _dropped:
        # Our own drop of a duplicate. Forget the id again, so that a later Celery retry
        # of the copy that won (same task id) is not taken for revoked too.
        _dropped.discard(task_id)
        worker_state.revoked.discard(task_id)
        return
    from celery.exceptions import TaskRevokedError

    # Revocation is reported by the worker's main process, outside the task's context:
    # the step's headers come from the revoked request itself.
    _record(
        sender,
        error=TaskRevokedError(f"task {task_id} was revoked"),
        request=getattr(request, "request_dict", request),
    )


class DurableWorkerStep(bootsteps.StartStopStep):
    """Starts this worker's sweeper and registers the worker in the store."""

    label = "celery_durable"
    # The sweeper thread must not run while the prefork pool forks its children: a child
    # forked while that thread holds a lock (an import, the store's, SQLite's) inherits it
    # held forever. Started after the pool, later forks (replacing a dead child) find the
    # store already built and the thread mostly idle.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.sweeper: Sweeper | None = None

    def start(self, worker: Any) -> None:
        _identity["id"] = f"{worker.hostname}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        _identity["hostname"] = worker.hostname
        settings_for(worker.app)  # fail at start, with the fix, on a bad setting
        try:
            store_for(worker.app).ensure_schema()  # here, not first in the sweeper thread
        except Exception:
            logger.exception("celery_durable: the store is not reachable yet; will retry")
        self.sweeper = Sweeper(worker.app, _identity["id"], worker.hostname)
        self.sweeper.start()

    def stop(self, worker: Any) -> None:
        if self.sweeper is not None:
            self.sweeper.stop()

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)


def _on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    if "id" not in _identity or sender is None:
        return
    try:
        store_for(sender.app).worker_stopped(_identity["id"])
    except Exception:
        logger.exception("could not record this worker's shutdown")


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    # worker_init comes before the worker builds its blueprint from app.steps.
    if sender is not None:
        sender.app.steps["worker"].add(DurableWorkerStep)


_connected = False


def connect() -> None:
    """Connect the signal handlers and the bootstep (idempotent)."""
    global _connected
    if _connected:
        return
    _connected = True
    signals.task_received.connect(_on_task_received, weak=False)
    signals.task_success.connect(_on_task_success, weak=False)
    signals.task_failure.connect(_on_task_failure, weak=False)
    signals.task_revoked.connect(_on_task_revoked, weak=False)
    signals.worker_shutdown.connect(_on_worker_shutdown, weak=False)
    signals.worker_init.connect(_on_worker_init, weak=False)
