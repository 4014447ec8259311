"""Versioning with ``workflow.patched()``: deploying new code under runs in flight.

A deploy is simulated by changing a module-level version. The driver keeps no suspended
runs here (``durable_cache_size = 0``), so every turn rebuilds its run from history with
the code of the moment, as a freshly started worker would. (Clearing the cache instead
would race with the turn that is about to put its run back into it.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery, shared_task

from celery_durable import NonDeterminismError, WorkflowHandle, durable_workflow, workflow

pytestmark = pytest.mark.usefixtures("worker")

TIMEOUT = 30

#: Which code is "deployed": 1 before the fix, 2 with the fix behind patched("fix"),
#: 3 with the patch retired (only the new path left).
deployed = {"version": 1}
#: The patch ids the code of ``asks_patches`` asks about, in order.
asks: list[str] = []


@pytest.fixture(autouse=True)
def _reset_code(app: Celery, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setitem(app.conf, "durable_cache_size", 0)
    yield
    deployed["version"] = 1
    asks.clear()


def deploy(version: int | None = None, patches: list[str] | None = None) -> None:
    if version is not None:
        deployed["version"] = version
    if patches is not None:
        asks[:] = patches


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def waits_on(handle: WorkflowHandle[Any], name: str) -> Callable[[], bool]:
    return lambda: any(
        s.kind == "signal" and s.name == name and s.state == "SCHEDULED" for s in handle.history
    )


@shared_task
def round_old(cents: int) -> str:
    return f"old:{cents // 100}"


@shared_task
def round_new(cents: int) -> str:
    return f"new:{round(cents / 100)}"


async def rounded(cents: int) -> str:
    if deployed["version"] == 1:
        return str(await round_old.s(cents))
    if deployed["version"] == 2:
        if workflow.patched("fix-rounding"):
            return str(await round_new.s(cents))
        return str(await round_old.s(cents))
    return str(await round_new.s(cents))


@durable_workflow
async def invoice(cents: int) -> str:
    await workflow.wait_for_signal("go")
    total = await rounded(cents)
    await workflow.wait_for_signal("finish")
    return total


def run_to(handle: WorkflowHandle[Any], signal: str) -> None:
    """Send ``signal`` and wait for the run's next wait."""
    handle.signal(signal)
    if signal == "go":
        wait_until(waits_on(handle, "finish"), "the run to pass the versioned code")


def test_a_run_past_the_patch_point_replays_the_old_path(app: Celery) -> None:
    handle = invoice.delay(250)
    run_to(handle, "go")  # took the old path under version 1

    deploy(version=2)
    handle.signal("finish")

    assert handle.get(timeout=TIMEOUT) == "old:2"
    assert [s.name for s in handle.history] == ["go", round_old.name, "finish"]


def test_a_new_run_takes_the_new_path_and_records_it(app: Celery) -> None:
    deploy(version=2)
    handle = invoice.delay(250)
    run_to(handle, "go")
    handle.signal("finish")

    assert handle.get(timeout=TIMEOUT) == "new:2"
    assert [(s.kind, s.name) for s in handle.history] == [
        ("signal", "go"),
        ("patch", "fix-rounding"),
        ("activity", round_new.name),
        ("signal", "finish"),
    ]


def test_a_run_before_the_patch_point_takes_the_new_path(app: Celery) -> None:
    handle = invoice.delay(250)
    wait_until(waits_on(handle, "go"), "the run to wait before the versioned code")

    deploy(version=2)
    run_to(handle, "go")
    handle.signal("finish")

    assert handle.get(timeout=TIMEOUT) == "new:2"


def test_retiring_a_patch_keeps_runs_that_took_the_new_path_replaying(app: Celery) -> None:
    deploy(version=2)
    handle = invoice.delay(250)
    run_to(handle, "go")  # took the new path and recorded the patch marker

    deploy(version=3)  # patched() call and old branch removed
    handle.signal("finish")

    assert handle.get(timeout=TIMEOUT) == "new:2"
    assert [s.kind for s in handle.history] == ["signal", "patch", "activity", "signal"]


def test_retiring_a_patch_too_early_parks_old_runs_as_stuck(app: Celery) -> None:
    handle = invoice.delay(250)
    run_to(handle, "go")  # took the old path, with no marker

    deploy(version=3)  # the old path is gone while this run still needs it
    handle.signal("finish")

    with pytest.raises(NonDeterminismError, match=round_old.name):
        handle.get(timeout=TIMEOUT)
    assert handle.status == "STUCK"

    deploy(version=2)  # put the patch back: the run resumes
    handle.retry()
    assert handle.get(timeout=TIMEOUT) == "old:2"


# -- several patches ----------------------------------------------------------------------


@durable_workflow
async def asks_patches() -> list[bool]:
    await workflow.wait_for_signal("go")
    took = [workflow.patched(patch) for patch in list(asks)]
    await workflow.wait_for_signal("finish")
    return took


def test_a_patch_asked_twice_gives_the_same_answer(app: Celery) -> None:
    deploy(patches=["a", "a"])
    handle = asks_patches.delay()
    handle.signal("go")
    handle.signal("finish")
    assert handle.get(timeout=TIMEOUT) == [True, True]
    assert [s.kind for s in handle.history].count("patch") == 1


def test_retiring_the_first_of_two_patches_keeps_the_second(app: Celery) -> None:
    deploy(patches=["a", "b"])
    handle = asks_patches.delay()
    handle.signal("go")
    wait_until(waits_on(handle, "finish"), "the run to take both patches")

    deploy(patches=["b"])  # patch "a" retired, "b" still in the code
    handle.signal("finish")

    assert handle.get(timeout=TIMEOUT) == [True]


@shared_task
def echo(value: Any) -> Any:
    return value


@durable_workflow
async def patch_ends_a_turn() -> str:
    finish = asyncio.ensure_future(workflow.wait_for_signal("finish"))
    await workflow.wait_for_signal("go")
    if "late" in asks:
        workflow.patched("late")  # the last step this turn records
    await finish
    return str(await echo.s("after"))


def test_retiring_a_patch_recorded_last_in_a_turn(app: Celery) -> None:
    deploy(patches=["late"])
    handle = patch_ends_a_turn.delay()
    handle.signal("go")
    wait_until(lambda: any(s.kind == "patch" for s in handle.history), "the patch marker")

    deploy(patches=[])
    handle.signal("finish")

    assert handle.get(timeout=TIMEOUT) == "after"
    assert [s.kind for s in handle.history] == ["signal", "signal", "patch", "activity"]
