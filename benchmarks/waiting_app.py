"""The Celery app that ``waiting_runs.py`` measures: runs that wait, and a plain task.

Imported by the benchmark script and by the ``celery worker`` it starts
(``-A waiting_app``). Settings come from the environment, set by the script:

| variable | meaning |
|---|---|
| ``BENCH_BROKER_URL`` | the broker |
| ``BENCH_RESULT_URL`` | result backend, used by the plain task only (its latency) |
| ``BENCH_STORE_URL`` | ``durable_database_url`` |
| ``BENCH_QUEUE`` | the one queue every message of the benchmark goes to |
| ``BENCH_CACHE_SIZE`` | ``durable_cache_size``, if set |

Every other ``durable_*`` setting keeps its default: what is measured is the library as
shipped.
"""

from __future__ import annotations

import os
import time

from celery import Celery

from celery_durable import durable_workflow, workflow

app = Celery(
    "waiting_bench",
    broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14"),
    backend=os.environ.get("BENCH_RESULT_URL", "redis://127.0.0.1:6379/15"),
)
app.conf.update(
    task_default_queue=os.environ.get("BENCH_QUEUE", "durable_waiting_bench"),
    durable_database_url=os.environ.get(
        "BENCH_STORE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/durable_waiting_bench"
    ),
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)
if os.environ.get("BENCH_CACHE_SIZE"):
    app.conf.durable_cache_size = int(os.environ["BENCH_CACHE_SIZE"])


@app.task(name="waiting_bench.started_at")
def started_at() -> float:
    """A plain task: returns the time it started running (its latency is the measure)."""
    return time.time()


@durable_workflow(name="waiting_bench.sleeper")
async def sleeper(seconds: float) -> float:
    """Sleep durably; returns the workflow's clock after waking (UNIX seconds)."""
    await workflow.sleep(seconds)
    return workflow.now().timestamp()


@durable_workflow(name="waiting_bench.waiter")
async def waiter() -> object:
    """Wait for the signal ``go`` and return its payload."""
    return await workflow.wait_for_signal("go")


#: The workflows whose rows the benchmark deletes before and after it runs.
WORKFLOWS = [sleeper.name, waiter.name]
