"""A run's page in Flower: what it waits for, its buffered signals, its progress, its
incarnation, and a bar per step; everything escaped."""

from __future__ import annotations

import asyncio
import html
import re
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, shared_task
from celery.worker import WorkController
from flowerserver import FlowerServer, serve_flower

from celery_durable import WorkflowHandle, durable_workflow, workflow
from celery_durable.flower._present import MIN_BAR, timeline

TIMEOUT = 30
HOSTILE = "<script>alert(1)</script>"


@shared_task
def echo(value: Any) -> Any:
    return value


@durable_workflow(name="tests.flower_page.waiting")
async def waiting(tag: str, started_over: bool = False) -> str:
    if not started_over:
        await echo.s(tag)
        workflow.continue_as_new(tag, started_over=True)
    workflow.set_status("stage", f"approving {HOSTILE}")
    await echo.s(HOSTILE)
    await asyncio.gather(workflow.sleep(3600), workflow.wait_for_signal("approve"))
    return "approved"


@pytest.fixture
def flower(app: Celery) -> Iterator[FlowerServer]:
    with serve_flower(app) as server:
        yield server


def _wait(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _cell(page: str, element_id: str) -> str:
    found = re.search(rf'<td id="{element_id}">(.*?)</td>', page, re.S)
    assert found, f"no #{element_id} on the page"
    return found.group(1)


def test_the_page_shows_what_the_run_waits_for_and_how_it_got_there(
    app: Celery, worker: WorkController, flower: FlowerServer
) -> None:
    handle: WorkflowHandle[Any] = waiting.apply_async(
        ("t",), workflow_id=f"page-{uuid.uuid4().hex[:8]}"
    )

    def both_open() -> bool:
        steps = handle.history
        return sum(s.state == "SCHEDULED" and s.kind in ("timer", "signal") for s in steps) == 2

    _wait(both_open, "the run did not come to wait for its timer and signal")
    handle.signal("unasked", {"note": HOSTILE})  # no wait takes it: buffered
    status, _, page = flower.get(f"/workflows/{handle.id}")
    assert status == 200
    assert HOSTILE not in page and html.escape(HOSTILE, quote=False) in page

    waits = _cell(page, "run-waiting")
    assert re.search(r"timer #\d+ due \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", waits)
    assert "signal <code>approve</code>" in waits
    signals = _cell(page, "run-signals")
    assert "<code>unasked</code> sent" in signals and "&lt;script&gt;" in signals
    progress = _cell(page, "run-progress")
    assert "<strong>stage</strong>" in progress and "approving &lt;script&gt;" in progress
    incarnation = _cell(page, "run-incarnation")
    assert incarnation.startswith("1: started over 1 time ")

    steps = handle.history
    assert [s.seq for s in steps] == sorted(s.seq for s in steps)
    assert page.count('class="durable-bar"') == len(steps) == 3  # this incarnation's
    task_step = next(s for s in steps if s.kind == "activity")
    assert task_step.worker and f'title="{task_step.worker}"' in page
    node = task_step.worker.rsplit(":", 2)[0]
    assert f">{node}</a>" in page  # linked to Flower's worker page

    handle.signal("approve")
    handle.cancel()


def _step(scheduled: str | None, completed: str | None) -> dict[str, Any]:
    return {"scheduled_at": scheduled, "completed_at": completed}


def test_bars_are_scaled_to_the_runs_span() -> None:
    run = {
        "created_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:01:40+00:00",  # 100 s
        "steps": [
            _step("2026-01-01T00:00:00+00:00", "2026-01-01T00:00:50+00:00"),
            _step("2026-01-01T00:00:50+00:00", "2026-01-01T00:00:50+00:00"),  # an instant
            _step("2026-01-01T00:01:30+00:00", None),  # open: up to now
        ],
    }
    now = 1767225700.0  # 2026-01-01T00:01:40Z
    bars = timeline(run, now)
    assert bars[0] == {"left": 0.0, "width": 50.0, "seconds": 50.0}
    assert bars[1] == {"left": 50.0, "width": MIN_BAR, "seconds": 0.0}
    assert bars[2] == {"left": 90.0, "width": 10.0, "seconds": 10.0}
    # A step after the run's recorded end widens the span rather than overflowing it.
    late = timeline({**run, "steps": [_step("2026-01-01T00:03:20+00:00", None)]}, now + 100)
    assert late[0]["left"] + late[0]["width"] <= 100.0
