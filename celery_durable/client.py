"""Handles on workflow runs, usable from any process that can reach the store."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

from celery import Celery, current_app

from ._codec import decode_error, encode_error
from ._config import settings_for, store_for
from .errors import (
    DurableError,
    WorkflowFailedError,
    WorkflowTerminatedError,
    WorkflowTimeoutError,
)
from .store import FAILURE, FINISHED, STUCK, SUCCESS, RunRecord, Store
from .worker import publish_resumed, publish_wake

__all__ = ["StepInfo", "WorkflowHandle"]

R = TypeVar("R")


def _dt(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc)


@dataclass(frozen=True)
class StepInfo:
    """One step of a run's history, decoded for people and tools."""

    seq: int
    kind: str
    name: str
    state: str
    args: list[Any]
    kwargs: dict[str, Any]
    result: Any
    error: dict[str, Any] | None
    attempts: int
    task_id: str
    scheduled_at: datetime | None
    completed_at: datetime | None
    child_id: str | None = None
    #: When a timer fires; None for other kinds of step.
    due_at: datetime | None = None
    #: The worker that took the step last (its id in the store: node name, pid, a
    #: random part); None if none has.
    worker: str | None = None
    #: How many times the step was lost with its worker and sent again.
    losses: int = 0


def bound_app(app: Celery | None) -> Celery:
    """``app`` itself, or the app current now; never the thread-local ``current_app`` proxy.

    The proxy is looked up again on every use, so a handle keeping it would read through
    whichever app is current in the thread using it (a web server's worker thread: the
    default store) rather than the app that started the run.
    """
    target = current_app if app is None else app
    resolve = getattr(target, "_get_current_object", None)
    return resolve() if callable(resolve) else target


class WorkflowHandle(Generic[R]):
    """A run of a workflow, by id; behaves like Celery's ``AsyncResult`` where it can.

    Args:
        id: the workflow id (what ``apply_async(workflow_id=...)`` took, or a generated one).
        app: the Celery app whose ``durable_database_url`` holds the run (default: current).

    Example::

        handle = checkout.delay("o-1", ["a", "b"])
        handle.get(timeout=30)
        WorkflowHandle(handle.id, app=app).status   # from any process
    """

    def __init__(self, id: str, app: Celery | None = None) -> None:
        self.id = id
        self.app = bound_app(app)

    @property
    def workflow_id(self) -> str:
        """Same as :attr:`id`."""
        return self.id

    @property
    def _store(self) -> Store:
        return store_for(self.app)

    def _run(self) -> RunRecord:
        return self._store.require_run(self.id)

    def __repr__(self) -> str:
        return f"<WorkflowHandle: {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, WorkflowHandle) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    # -- state, like AsyncResult ---------------------------------------------------------

    @property
    def status(self) -> str:
        """PENDING, RUNNING, SUCCESS, FAILURE, CANCELLED, TERMINATED or STUCK.

        Raises:
            WorkflowNotFoundError: no run has this id.
        """
        status = self._store.get_status(self.id)
        if status is None:
            self._run()  # raises the clear "not found" error
        return str(status)

    state = status

    @property
    def workflow(self) -> str:
        """The name of the workflow this run belongs to."""
        return self._run().workflow

    def ready(self) -> bool:
        """True once the run has finished (succeeded or failed)."""
        return self.status in FINISHED

    def successful(self) -> bool:
        """True if the run finished with a result."""
        return self.status == SUCCESS

    def failed(self) -> bool:
        """True if the run finished with an exception."""
        return self.status == FAILURE

    @property
    def result(self) -> Any:
        """The return value when successful, the exception when failed, else None.

        Raises:
            ContentDisallowedError: the result is stored in a content type the app does
                not accept (``result_accept_content``); it is not decoded.
        """
        run = self._run()
        if run.status == SUCCESS:
            return self._value(run)
        if run.status in (*FINISHED, STUCK):
            return self._exception(run)
        return None

    @property
    def traceback(self) -> str | None:
        """The traceback text of a failed (or stuck) run."""
        run = self._run()
        return None if run.error is None else str(run.error.get("traceback") or "") or None

    def get(
        self,
        timeout: float | None = None,
        propagate: bool = True,
        interval: float = 0.2,
    ) -> R:
        """Wait for the run to finish and return its result, like ``AsyncResult.get``.

        Args:
            timeout: seconds to wait at most (None: forever).
            propagate: re-raise the run's exception if it failed (else return it).
            interval: the longest pause between two looks at the store.

        Raises:
            WorkflowTimeoutError: the run did not finish within ``timeout``.
            Exception: the workflow's own exception when it failed (and ``propagate``).
            NonDeterminismError: the run is STUCK (fix the code and :meth:`retry`).
        """
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        pause = 0.002
        store = self._store
        while True:
            polled = store.poll_status(self.id)
            if polled is None:
                self._run()  # raises WorkflowNotFoundError
                continue
            status, age = polled
            if status in FINISHED or status == STUCK:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise WorkflowTimeoutError(
                    f"workflow run {self.id} did not finish within {timeout} s "
                    f"(it is {status}); wait longer or check `celery durable show {self.id}`"
                )
            time.sleep(
                pause if deadline is None else min(pause, max(0.0, deadline - time.monotonic()))
            )
            # Pausing a twentieth of the run's age (or of the time waited, if longer)
            # sees the end at most ~5% late (doubling the pause could add up to the
            # whole wait again), in about as many looks at the store as doubling once
            # the pause reaches ``interval``. By the run's age, not the wait's: waiting
            # on many runs one after another does not poll each anew from 2 ms.
            waited = time.monotonic() - started
            pause = min(max(0.002, max(waited, age) / 20), interval)
        run = self._run()
        if run.status == SUCCESS:
            return self._value(run)  # type: ignore[no-any-return]
        exc = self._exception(run)
        if propagate or run.status == STUCK:
            raise exc
        return exc  # type: ignore[return-value]

    def _value(self, run: RunRecord) -> Any:
        if run.result is None:
            return None
        what = f"the result of workflow {run.workflow}[{run.id}]"
        return settings_for(self.app).codec.loads(run.content_type, run.result, what, result=True)

    @staticmethod
    def _exception(run: RunRecord) -> BaseException:
        if not run.error:
            return WorkflowFailedError(f"workflow {run.workflow}[{run.id}] failed")
        return decode_error(run.error)

    # -- history and operations ----------------------------------------------------------

    @property
    def history(self) -> list[StepInfo]:
        """The run's steps in order, with their arguments and outcomes.

        Raises:
            ContentDisallowedError: a step's input or outcome is stored in a content type
                the app does not accept (it is not decoded).
        """
        codec = settings_for(self.app).codec
        steps = []
        for record in self._store.history(self.id):
            what = f"step {record.seq} ({record.name}) of workflow run {self.id}"
            decoded = None
            if record.input:
                decoded = codec.loads(record.content_type, record.input, f"the input of {what}")
            # Tasks and children have [args, kwargs, options]; timers, signal waits and
            # patch markers have no input.
            args, kwargs = (decoded[0], decoded[1]) if isinstance(decoded, list) else ([], {})
            result = None
            if record.outcome == "ok" and record.result is not None:
                result = codec.loads(record.content_type, record.result, f"the outcome of {what}")
            steps.append(
                StepInfo(
                    seq=record.seq,
                    kind=record.kind,
                    name=record.name,
                    state=record.state,
                    args=list(args),
                    kwargs=dict(kwargs),
                    result=result,
                    error=record.error,
                    attempts=record.attempts,
                    task_id=record.dispatch_id,
                    scheduled_at=_dt(record.dispatched_at),
                    completed_at=_dt(record.completed_at),
                    child_id=record.child_id,
                    due_at=_dt(record.due_at),
                    worker=record.claimed_by,
                    losses=record.losses,
                )
            )
        return steps

    def describe(self) -> dict[str, Any]:
        """A summary of the run: status, times (datetimes), error, step counts, status values."""
        run = self._run()
        counts: dict[str, int] = {}
        for record in self._store.history(self.id):
            counts[record.state] = counts.get(record.state, 0) + 1
        return {
            "id": run.id,
            "workflow": run.workflow,
            "status": run.status,
            "turns": run.turn,
            "created_at": _dt(run.created_at),
            "started_at": _dt(run.started_at),
            "finished_at": _dt(run.finished_at),
            "steps": counts,
            "status_values": dict(run.progress or {}),
            "attempt": run.attempt,
            "parent_id": run.parent_id,
            "cancel_requested": run.cancel_requested,
            "error": run.error,
        }

    def signal(self, name: str, payload: Any = None) -> None:
        """Send signal ``name`` with ``payload`` to the run, from any process.

        Inside the workflow, ``await workflow.wait_for_signal(name)`` returns the payload.
        Signals sent before the wait are buffered; several of one name arrive in order.

        Raises:
            SignalError: the run has finished or does not exist.
            WorkflowEncodeError: the payload cannot be encoded by the serializer.
        """
        content_type, data = settings_for(self.app).codec.dumps(
            payload, f"the payload of signal {name!r} to workflow run {self.id}"
        )
        wake = self._store.send_signal(self.id, name, content_type, data)
        if wake is not None:
            publish_wake(self.app, wake[1], wake[0], wake[2])

    def cancel(self) -> None:
        """Cancel the run: ``asyncio.CancelledError`` is raised at its current await.

        Its pending tasks are revoked (best effort) and child workflows cancelled. The
        workflow may catch the error and compensate; it then ends as CANCELLED, or with
        its own result if it returns one.

        Raises:
            DurableError: the run has already finished.
        """
        wake = self._store.request_cancel(self.id)
        if wake is not None:
            publish_wake(self.app, wake[1], wake[0], wake[2])

    def terminate(self, reason: str = "terminated") -> None:
        """End the run at once, without running workflow code; it becomes TERMINATED.

        Its child workflows (and theirs, at every level) are terminated in the same
        transaction; pending tasks are revoked (best effort).

        Raises:
            DurableError: the run has already finished.
        """
        run = self._run()
        root = f"{run.workflow}[{self.id}]"
        ended = self._store.terminate(
            self.id,
            encode_error(WorkflowTerminatedError(f"workflow {root} was terminated: {reason}")),
            descendant_error=lambda child: encode_error(
                WorkflowTerminatedError(
                    f"workflow {child.workflow}[{child.id}] was terminated with workflow "
                    f"{root}: {reason}"
                )
            ),
        )
        revoke = [c.dispatch_id for c in ended.cancelled if c.kind == "activity"]
        if revoke:
            # Best effort: a late outcome of such a step is dropped anyway.
            with contextlib.suppress(Exception):
                self.app.control.revoke(revoke)
        if ended.parent is not None:
            publish_wake(self.app, ended.parent[1], ended.parent[0], ended.parent[2])

    def retry(self) -> None:
        """Resume a STUCK run, or re-run the failed steps of a FAILED one.

        A STUCK run continues from its history (deploy the fixed code first). A FAILED
        run goes back one turn: the steps whose failure ended it run again, and the
        workflow code sees their new outcomes. A failed child workflow among them is
        retried the same way.

        Raises:
            DurableError: the run is not STUCK or FAILED, or cannot be rewound (one of
                the failed steps is a child run that was cancelled or terminated).
        """
        children = self._failed_children()
        self._store.resume(self.id)
        for child in children:
            # After the parent's step is open again, so that the child's end lands on it.
            child.retry()
        publish_resumed(self.app, self.id)

    def _failed_children(self) -> list[WorkflowHandle[Any]]:
        """Child runs whose failure ended this FAILED run; they must be retried with it."""
        store = self._store
        run = store.require_run(self.id)
        if run.status != FAILURE:
            return []
        children: list[WorkflowHandle[Any]] = []
        for step in store.history(self.id):
            if step.kind != "child" or step.child_id is None or step.outcome != "error":
                continue
            if step.observed_turn != run.turn:
                continue
            status = store.get_status(step.child_id)
            if status not in (FAILURE, STUCK):
                raise DurableError(
                    f"workflow {run.workflow}[{self.id}] failed because its child run "
                    f"{step.child_id} ended {status}, which cannot be retried; start a new "
                    "run instead"
                )
            children.append(WorkflowHandle(step.child_id, app=self.app))
        return children
