"""``celery -A proj durable ...``: look at runs, their history, and act on them.

Registered under Celery's ``celery.commands`` entry point, so it takes the usual ``-A``
option and reads the app's ``durable_database_url``.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from typing import Any

import click
from celery import Celery
from celery.bin.base import CeleryCommand

from ._config import settings_for, store_for
from ._definition import start_by_name
from .client import WorkflowHandle
from .errors import DurableError
from .worker import GONE_WORKERS_KEPT, Sweeper, worker_id

__all__ = ["durable", "parse_duration"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _app(ctx: click.Context) -> Celery:
    app: Celery = ctx.obj.app
    return app


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


@click.group(cls=click.Group)
@click.pass_context
def durable(ctx: click.Context) -> None:
    """Inspect and operate durable workflow runs."""


@durable.command(cls=CeleryCommand, name="list")
@click.option("--status", help="Only runs with this status (RUNNING, FAILURE, STUCK...).")
@click.option("--workflow", help="Only runs of this workflow (its task name).")
@click.option("--limit", default=50, show_default=True, help="How many runs at most.")
@click.pass_context
def list_runs(ctx: click.Context, status: str | None, workflow: str | None, limit: int) -> None:
    """List recent runs, newest first."""
    runs = store_for(_app(ctx)).list_runs(status=status, workflow=workflow, limit=limit)
    if not runs:
        click.echo("no runs")
        return
    click.echo(f"{'ID':<38} {'STATUS':<8} {'TURNS':>5}  {'CREATED':<19}  WORKFLOW")
    for run in runs:
        created = _when(run.created_at)
        click.echo(f"{run.id:<38} {run.status:<8} {run.turn:>5}  {created:<19}  {run.workflow}")


@durable.command(cls=CeleryCommand)
@click.argument("workflow_id")
@click.pass_context
def show(ctx: click.Context, workflow_id: str) -> None:
    """Show one run: status, arguments, result or error, and every step."""
    app = _app(ctx)
    handle: WorkflowHandle[Any] = WorkflowHandle(workflow_id, app=app)
    try:
        run = store_for(app).require_run(workflow_id)
        codec = settings_for(app).codec
        args, kwargs = codec.loads(
            run.content_type, run.input, f"the input of workflow {run.workflow}[{run.id}]"
        )
        click.echo(f"run:      {run.id}")
        click.echo(f"workflow: {run.workflow}")
        click.echo(f"status:   {run.status} (turn {run.turn})")
        click.echo(f"input:    args={_short(args)} kwargs={_short(kwargs)}")
        click.echo(f"created:  {_when(run.created_at)}  finished: {_when(run.finished_at)}")
        if run.progress:
            click.echo(f"status values: {_short(dict(run.progress), 200)}")
        if run.parent_id:
            click.echo(f"parent:   {run.parent_id}")
        if run.status == "SUCCESS":
            click.echo(f"result:   {_short(handle.result, 200)}")
        if run.error:
            error = run.error
            click.echo(
                f"error:    {error.get('module')}.{error.get('type')}: {error.get('message')}"
            )
        click.echo("steps:")
        for step in handle.history:
            if step.error is None:
                outcome = _short(step.result)
            else:
                outcome = f"error {step.error.get('type')}: {step.error.get('message')}"
            target = f" child={step.child_id}" if step.child_id else ""
            click.echo(
                f"  {step.seq:>4} {step.state:<9} {step.kind:<8} {step.name}"
                f"{_short(step.args, 40)}{target} attempts={step.attempts} -> {outcome}"
            )
    except DurableError as exc:
        raise click.ClickException(str(exc)) from exc


@durable.command(cls=CeleryCommand)
@click.argument("workflow_id")
@click.pass_context
def retry(ctx: click.Context, workflow_id: str) -> None:
    """Resume a STUCK run, or re-run the failed steps of a FAILED one."""
    try:
        WorkflowHandle(workflow_id, app=_app(ctx)).retry()
    except DurableError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{workflow_id}: retrying")


@durable.command(cls=CeleryCommand)
@click.argument("workflow_id")
@click.argument("name")
@click.argument("payload", required=False, default="null")
@click.pass_context
def signal(ctx: click.Context, workflow_id: str, name: str, payload: str) -> None:
    """Send signal NAME with PAYLOAD (JSON) to a run."""
    try:
        value = json.loads(payload)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"PAYLOAD must be JSON: {exc}") from exc
    try:
        WorkflowHandle(workflow_id, app=_app(ctx)).signal(name, value)
    except DurableError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{workflow_id}: signal {name!r} sent")


@durable.command(cls=CeleryCommand)
@click.argument("workflow_id")
@click.pass_context
def cancel(ctx: click.Context, workflow_id: str) -> None:
    """Cancel a run: CancelledError is raised in it at its current await."""
    try:
        WorkflowHandle(workflow_id, app=_app(ctx)).cancel()
    except DurableError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{workflow_id}: cancellation requested")


@durable.command(cls=CeleryCommand)
@click.argument("workflow_id")
@click.option("--reason", default="terminated from the command line", show_default=True)
@click.pass_context
def terminate(ctx: click.Context, workflow_id: str, reason: str) -> None:
    """End a run at once, without running its code."""
    try:
        WorkflowHandle(workflow_id, app=_app(ctx)).terminate(reason)
    except DurableError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{workflow_id}: terminated")


@durable.command(cls=CeleryCommand)
@click.argument("name")
@click.argument("args", required=False, default="[]")
@click.option("--id", "workflow_id", help="Workflow id (starting an existing id is a no-op).")
@click.pass_context
def start(ctx: click.Context, name: str, args: str, workflow_id: str | None) -> None:
    """Start workflow NAME with ARGS, a JSON list of positional arguments."""
    try:
        parsed = json.loads(args)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"ARGS must be a JSON list: {exc}") from exc
    if not isinstance(parsed, list):
        raise click.BadParameter("ARGS must be a JSON list, e.g. '[\"o-1\", 3]'")
    try:
        handle = start_by_name(_app(ctx), name, parsed, workflow_id=workflow_id)
    except (DurableError, TypeError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(handle.id)


@durable.command(cls=CeleryCommand)
@click.pass_context
def sweep(ctx: click.Context) -> None:
    """Run one recovery pass now (re-send lost steps, wake stalled runs)."""
    app = _app(ctx)
    counts = Sweeper(app, worker_id(), "celery-durable-cli").sweep()
    click.echo(", ".join(f"{k}={v}" for k, v in counts.items()))


def parse_duration(text: str) -> float:
    """Seconds in ``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or plain ``3600``.

    Raises:
        click.BadParameter: anything else.
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text.lower())
    if found is None:
        raise click.BadParameter(
            f"{text!r} is not a duration: write a number of seconds (3600) or one with a "
            "unit, s, m, h, d or w (12h, 7d)"
        )
    return float(found.group(1)) * _UNITS[found.group(2) or "s"]


@durable.command(cls=CeleryCommand)
@click.option(
    "--older-than",
    "older_than",
    required=True,
    help="Delete runs that finished longer ago than this: 7d, 12h, 30m, or seconds.",
)
@click.option("--dry-run", is_flag=True, help="Only count what would be deleted.")
@click.pass_context
def purge(ctx: click.Context, older_than: str, dry_run: bool) -> None:
    """Delete finished runs (with their children, steps and signals) now.

    A run goes only with its whole family: a child never before its top-level run, and
    no family while any of its runs is still running or STUCK. Deletes in batches, each
    its own short transaction, so workers carry on meanwhile.
    """
    age = parse_duration(older_than)
    store = store_for(_app(ctx))
    if dry_run:
        counted = store.count_expired(age)
        click.echo(
            f"would delete {counted.runs} runs ({counted.steps} steps, "
            f"{counted.signals} signals) finished more than {older_than} ago"
        )
        return
    runs = steps = signals = 0
    mark = None
    while True:
        batch = store.purge_finished(age, after=mark)
        runs, steps, signals = runs + batch.runs, steps + batch.steps, signals + batch.signals
        mark = batch.resume_after
        if mark is None:
            break
    orphans, at = store.purge_orphan_signals()
    while at:
        deleted, at = store.purge_orphan_signals(at)
        orphans += deleted
    workers = 0
    while True:
        forgotten = store.forget_workers(GONE_WORKERS_KEPT)
        workers += forgotten
        if not forgotten:
            break
    click.echo(
        f"deleted {runs} runs ({steps} steps, {signals} signals) finished more than "
        f"{older_than} ago, {orphans} consumed signals of earlier incarnations, "
        f"{workers} rows of gone workers"
    )


@durable.command(
    cls=CeleryCommand,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("flower_argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def flower(ctx: click.Context, flower_argv: tuple[str, ...]) -> None:
    """Start Flower (any of its options: --port, --url_prefix, --basic_auth...) with a
    Workflows tab and the /api/durable JSON API. Needs ``celery-durable[flower]``."""
    try:
        from flower.command import flower as flower_command

        from .flower import install
    except ImportError as exc:
        raise click.ClickException(
            f"Flower is not installed ({exc}); pip install 'celery-durable[flower]'"
        ) from exc
    install()
    ctx.invoke(flower_command, tornado_argv=flower_argv)
