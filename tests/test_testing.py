"""The pytest fixtures celery_durable ships for users' own tests."""

from __future__ import annotations

from celery import Celery, shared_task
from celery.worker import WorkController

from celery_durable import _config, durable_workflow
from celery_durable.testing import durable_app, durable_worker

# Users enable them with ``pytest_plugins = ["celery_durable.testing"]``; importing them
# into the module does the same for this file only.
__all__ = ["durable_app", "durable_worker"]


@shared_task
def triple(x: int) -> int:
    return x * 3


@durable_workflow
async def triples_twice(x: int) -> int:
    return int(await triple.s(await triple.s(x)))


def test_the_fixtures_run_a_workflow(durable_app: Celery, durable_worker: WorkController) -> None:
    handle = triples_twice.delay(2)
    assert handle.get(timeout=30) == 18
    assert [step.result for step in handle.history] == [6, 18]
    assert _config.settings_for(durable_app).database_url.endswith("/durable.sqlite3")
