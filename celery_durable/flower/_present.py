"""Runs and steps as plain JSON-able data, for the Flower pages and the JSON API."""

from __future__ import annotations

import json
import time
from datetime import datetime
from typing import Any

from celery import Celery

from .._config import settings_for, store_for
from ..client import StepInfo, WorkflowHandle
from ..errors import DurableError
from ..store import RunRecord, SignalRecord

__all__ = [
    "ACTIONS",
    "PAGE_LIMIT",
    "STATUSES",
    "act",
    "is_run",
    "run_detail",
    "run_page",
    "run_summary",
    "short",
    "timeline",
]

#: Statuses shown as filters even when no run has them yet.
STATUSES = ("PENDING", "RUNNING", "SUCCESS", "FAILURE", "CANCELLED", "TERMINATED", "STUCK")
#: The actions a run accepts, as in ``celery durable signal|cancel|terminate|retry``.
ACTIONS = ("signal", "cancel", "terminate", "retry")
#: The most runs one page (or one API call) returns: a page never loads everything.
PAGE_LIMIT = 500
#: The most buffered signals a run page lists.
SIGNALS_SHOWN = 100
#: The narrowest bar of the timeline (percent of the run's span), so instants show.
MIN_BAR = 0.5


def short(value: Any, width: int = 120) -> str:
    """``value`` as JSON, cut to ``width`` characters (the page offers the whole of it)."""
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def _iso(ts: float | datetime | None) -> str | None:
    if ts is None:
        return None
    if isinstance(ts, datetime):
        # In the server's zone, as the floats below: the pages show both side by side.
        return ts.astimezone().isoformat()
    return datetime.fromtimestamp(ts).astimezone().isoformat()


def is_run(app: Celery, run_id: str) -> bool:
    """Whether the store has a run with this id (one primary-key read)."""
    return store_for(app).get_status(run_id) is not None


def run_summary(run: RunRecord) -> dict[str, Any]:
    """One line of the run list."""
    end = run.finished_at
    duration = None if run.started_at is None or end is None else end - run.started_at
    return {
        "id": run.id,
        "workflow": run.workflow,
        "status": run.status,
        "turns": run.turn,
        "created_at": _iso(run.created_at),
        "started_at": _iso(run.started_at),
        "finished_at": _iso(end),
        "duration": duration,
        "parent_id": run.parent_id,
    }


def run_page(
    app: Celery,
    *,
    status: str | None = None,
    workflow: str | None = None,
    search: str | None = None,
    offset: int = 0,
    limit: int = 50,
) -> dict[str, Any]:
    """A page of runs newest first, with the counts per status under the same filters."""
    store = store_for(app)
    limit = max(1, min(limit, PAGE_LIMIT))
    offset = max(0, offset)
    counts = store.count_runs_by_status(workflow=workflow, search=search)
    runs = store.list_runs(
        status=status, workflow=workflow, limit=limit, offset=offset, search=search
    )
    total = counts.get(status, 0) if status else sum(counts.values())
    return {
        "runs": [run_summary(r) for r in runs],
        "counts": counts,
        "total": total,
        "offset": offset,
        "limit": limit,
    }


def run_detail(app: Celery, run_id: str) -> dict[str, Any]:
    """Everything about one run: input, result or error, every step.

    Raises:
        WorkflowNotFoundError: no run with this id.
    """
    store = store_for(app)
    run = store.require_run(run_id)
    handle: WorkflowHandle[Any] = WorkflowHandle(run_id, app=app)
    detail = run_summary(run)
    try:
        args, kwargs = settings_for(app).codec.loads(
            run.content_type, run.input, f"the input of workflow {run.workflow}[{run.id}]"
        )
        detail["input"] = {"args": args, "kwargs": kwargs}
    except DurableError as exc:
        # An input this app may not decode is shown as such, not executed or guessed at.
        detail["input"] = {"unreadable": str(exc)}
    detail["result"] = None
    if run.status == "SUCCESS":
        try:
            detail["result"] = handle.result
        except DurableError as exc:
            detail["result"] = {"unreadable": str(exc)}
    detail["error"] = run.error
    detail["cancel_requested"] = run.cancel_requested
    detail["status_values"] = dict(run.progress or {})
    detail["incarnation"] = run.incarnation
    detail["attempt"] = run.attempt
    detail["steps"] = [_step(step) for step in handle.history]
    open_steps = [s for s in detail["steps"] if s["state"] == "SCHEDULED"]
    detail["open_timers"] = [s for s in open_steps if s["kind"] == "timer"]
    detail["open_waits"] = [s for s in open_steps if s["kind"] == "signal"]
    detail["buffered_signals"] = [
        _signal(app, run, signal) for signal in store.buffered_signals(run_id, SIGNALS_SHOWN)
    ]
    detail["children"] = [s["child_id"] for s in detail["steps"] if s["child_id"]]
    return detail


def _step(step: StepInfo) -> dict[str, Any]:
    return {
        "seq": step.seq,
        "kind": step.kind,
        "name": step.name,
        "state": step.state,
        "args": step.args,
        "kwargs": step.kwargs,
        "result": step.result,
        "error": step.error,
        "attempts": step.attempts,
        "task_id": step.task_id,
        "scheduled_at": _iso(step.scheduled_at),
        "completed_at": _iso(step.completed_at),
        "due_at": _iso(step.due_at),
        "child_id": step.child_id,
        "worker": step.worker,
        # A worker's id is "<node name>:<pid>:<random part>"; Flower knows the node.
        "worker_node": step.worker.rsplit(":", 2)[0] if step.worker else None,
        "losses": step.losses,
    }


def _signal(app: Celery, run: RunRecord, signal: SignalRecord) -> dict[str, Any]:
    what = f"signal {signal.name!r} to workflow {run.workflow}[{run.id}]"
    try:
        payload = settings_for(app).codec.loads(signal.content_type, signal.payload, what)
    except DurableError as exc:
        payload = {"unreadable": str(exc)}
    return {"name": signal.name, "sent_at": _iso(signal.created_at), "payload": payload}


def _seconds(iso: str | None) -> float | None:
    return None if iso is None else datetime.fromisoformat(iso).timestamp()


def timeline(run: dict[str, Any], now: float | None = None) -> list[dict[str, float]]:
    """Where each step's bar sits in the run's span, as ``left`` and ``width`` percents,
    and how many ``seconds`` it lasts (so far).

    ``run`` is what :func:`run_detail` returns. A step's bar goes from when its message
    was sent (or it was scheduled) to when it finished, an open step's to ``now``. The
    span is the run's, from its creation to its end (now for a run still going), widened
    to take in every step; the narrowest bar is :data:`MIN_BAR` wide so instants show.
    """
    now = time.time() if now is None else now
    start = _seconds(run["created_at"]) or now
    end = _seconds(run["finished_at"]) or now
    spans = []
    for step in run["steps"]:
        began = _seconds(step["scheduled_at"]) or start
        done = _seconds(step["completed_at"]) or now
        spans.append((began, max(began, done)))
    low = min([start, *(b for b, _ in spans)])
    width = max(max([end, *(d for _, d in spans)]) - low, 1e-6)
    return [
        {
            "left": round(min(100.0 * (began - low) / width, 100.0 - MIN_BAR), 2),
            "width": round(max(MIN_BAR, 100.0 * (done - began) / width), 2),
            "seconds": done - began,
        }
        for began, done in spans
    ]


def act(app: Celery, run_id: str, action: str, fields: dict[str, Any]) -> str:
    """Do ``action`` on the run as the CLI does; returns what the CLI would print.

    Raises:
        DurableError: what the CLI reports (unknown run, run already finished...).
        ValueError: an unknown action or a signal without a name.
    """
    handle: WorkflowHandle[Any] = WorkflowHandle(run_id, app=app)
    if action == "signal":
        name = str(fields.get("name") or "")
        if not name:
            raise ValueError("a signal needs a name")
        handle.signal(name, fields.get("payload"))
        return f"{run_id}: signal {name!r} sent"
    if action == "cancel":
        handle.cancel()
        return f"{run_id}: cancellation requested"
    if action == "terminate":
        handle.terminate(str(fields.get("reason") or "terminated from Flower"))
        return f"{run_id}: terminated"
    if action == "retry":
        handle.retry()
        return f"{run_id}: retrying"
    raise ValueError(f"unknown action {action!r}; one of {', '.join(ACTIONS)}")
