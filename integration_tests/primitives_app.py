"""Workflows and tasks of the primitive durability tests (timers, local steps, signals,
cancellation, child workflows, retries, continue-as-new, versioning).

Workers import this module with ``--include`` (see ``test_primitives_durability``). Side
effects go to ``wfapp``'s ``effects.log`` as ``(run, index)`` lines, so the tests count
them with :meth:`~integration_tests.cluster.Cluster.effects`; pauses use
:func:`~integration_tests.wfapp.pause_once`.

``DURABLE_IT_VARIANT`` picks which version of :func:`deployed` a worker runs, as a deploy
would: ``v1`` (the original), ``broken`` (its first step changed without a guard, so runs
started by ``v1`` cannot be replayed) and ``fixed`` (the same change behind
``workflow.patched``).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from typing import Any

from celery import shared_task

from celery_durable import durable_workflow, workflow
from celery_durable.workflow import RetryPolicy

from .wfapp import _append_effect, _dir, pause_once, record

VARIANT = os.environ.get("DURABLE_IT_VARIANT", "v1")

#: Effect indexes of the saga's compensations.
REFUND, RELEASE = 100, 101


class FlakyError(Exception):
    """Raised by :func:`flaky` until it has failed often enough."""


def _run_id(task: Any) -> str:
    return str(task.request.get("durable_run") or "no-run")


@shared_task(bind=True, name="primitives_it.note")
def note(self: Any, i: int, value: Any) -> Any:
    """Log one side effect under index ``i`` and return ``value`` unchanged."""
    _append_effect(f"{_run_id(self)}\t{i}\t{os.getpid()}\n")
    return value


@shared_task(bind=True, name="primitives_it.flaky")
def flaky(self: Any, i: int, failures: int) -> int:
    """Fail the first ``failures`` executions for ``(run, i)``, then return how many ran.

    Execution ``k`` (1-based) logs its side effect under index ``10 * i + k``, so a
    duplicate execution shows up as an index that should not exist.
    """
    run_id = _run_id(self)
    fd = os.open(_dir() / f"attempts-{run_id}-{i}", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)
    ran = len((_dir() / f"attempts-{run_id}-{i}").read_bytes())
    _append_effect(f"{run_id}\t{10 * i + ran}\t{os.getpid()}\n")
    if ran <= failures:
        raise FlakyError(f"attempt {ran} of step {i} fails on purpose")
    return ran


def local_effect(run_id: str, i: int, pause: bool) -> str:
    """A local step: log one side effect, optionally block (before its result is
    recorded), and return a value no second execution would repeat."""
    _append_effect(f"{run_id}\t{i}\t{os.getpid()}\n")
    if pause:
        pause_once(run_id, f"local-{i}")
    return f"{os.getpid()}-{uuid.uuid4().hex}"


# -- workflows ----------------------------------------------------------------------------


@durable_workflow
async def nap(seconds: float) -> dict[str, float]:
    """``record(0)``, a durable sleep, ``record(1)``; returns the workflow's clock on both
    sides of the sleep (UNIX seconds)."""
    await record.s(0)
    before = workflow.now().timestamp()
    await workflow.sleep(seconds)
    after = workflow.now().timestamp()
    await record.s(1)
    return {"before": before, "after": after}


@durable_workflow
async def local_then_use(pause_inside: bool = False, pause_after: bool = False) -> str:
    """``record(0)``, a local step (index 1) whose result ``note(2, ...)`` uses.

    ``pause_inside``: the local step blocks after its side effect, before the driver has
    recorded its result. ``pause_after``: the workflow blocks in the turn that receives
    the (recorded) result.
    """
    run_id = workflow.info().workflow_id
    await record.s(0)
    token: str = await workflow.step(local_effect, run_id, 1, pause_inside)
    if pause_after:
        pause_once(run_id, "after-local-1")
    used: str = await note.s(2, token)
    return used


@durable_workflow
async def collect(n: int, pause_after_first: bool = False) -> list[Any]:
    """Wait for ``n`` signals ``item``; after each, ``note(i, payload)``. Returns the
    payloads in the order received. ``pause_after_first``: block in the turn that
    receives the first one."""
    got = []
    for i in range(n):
        payload = await workflow.wait_for_signal("item")
        got.append(payload)
        if i == 0 and pause_after_first:
            pause_once(workflow.info().workflow_id, "after-signal-0")
        await note.s(i, payload)
    return got


@durable_workflow
async def saga(hold_refund: bool = False) -> str:
    """Charge (``record(0)``), then sleep an hour; when cancelled, refund
    (``record(REFUND)``) and release (``record(RELEASE)``), then end cancelled."""
    await record.s(0)
    try:
        await workflow.sleep(3600)
    except asyncio.CancelledError:
        workflow.set_status("compensating", True)
        await record.s(REFUND, hold=hold_refund)
        await record.s(RELEASE)
        raise
    return "not cancelled"


@durable_workflow
async def child_sum(n: int, hold: int = -1) -> int:
    """``n`` activities in sequence (like ``wfapp.sequential``); ``hold`` blocks once."""
    total = 0
    for i in range(n):
        total = await record.s(i, total, hold=(i == hold))
    return total


@durable_workflow
async def parent(n: int, hold: int = -1, pause_after_child: bool = False) -> dict[str, int]:
    """Run :func:`child_sum` as a child workflow, then ``record(50, child's result)``."""
    child: int = await child_sum.s(n, hold)
    if pause_after_child:
        pause_once(workflow.info().workflow_id, "after-child")
    final: int = await record.s(50, child)
    return {"child": child, "final": final}


@durable_workflow
async def retried(failures: int, initial_interval: float) -> int:
    """``flaky(0, failures)`` through ``workflow.execute`` with durable backoff."""
    policy = RetryPolicy(max_attempts=failures + 1, initial_interval=initial_interval, backoff=2.0)
    result: int = await workflow.execute(flaky.s(0, failures), retry=policy)
    return result


@durable_workflow
async def countdown(i: int, n: int, total: int = 0, hold: int = -1, pause_at: int = -1) -> int:
    """One ``record(i)`` per incarnation, then continue-as-new until ``i`` reaches ``n``.

    ``hold``: the activity of that incarnation blocks once. ``pause_at``: that
    incarnation blocks in the turn that receives its activity's result, before it
    continues as new.
    """
    total = await record.s(i, total, hold=(i == hold))
    if i == pause_at:
        pause_once(workflow.info().workflow_id, f"turn-after-{i}")
    if i + 1 < n:
        workflow.continue_as_new(i + 1, n, total, hold, pause_at)
    return total


@durable_workflow
async def deployed(go_index: int = 1) -> int:
    """``record(0)`` (``note(0, 0)`` in new code), wait for signal ``go``, then
    ``record(go_index, first + go)``."""
    if VARIANT == "broken":
        first: int = await note.s(0, 0)  # changed without a guard: replay diverges
    elif VARIANT == "fixed" and workflow.patched("note-first"):
        first = await note.s(0, 0)
    else:
        first = await record.s(0)
    go: int = await workflow.wait_for_signal("go")
    result: int = await record.s(go_index, first + go)
    return result
