"""The Celery app that ``compare_celery.py`` (and ``local_steps.py``, ``canvas_vs_celery.py``)
measures: the same tasks, run two ways.

Imported both by the benchmark script (which starts runs and waits for them) and by the
``celery worker`` processes it starts (``-A comparison_app``). Everything that differs
between machines comes from environment variables, which the script sets before it
imports this module and passes on to the workers:

| variable | meaning |
|---|---|
| ``BENCH_BROKER_URL`` | the broker both sides use |
| ``BENCH_RESULT_URL`` | the Celery result backend (for ``chain``/``chord`` only) |
| ``BENCH_STORE_URL`` | ``durable_database_url`` |
| ``BENCH_QUEUE`` | the one queue every message of the benchmark goes to |
| ``BENCH_PROFILE_DIR`` | if set, each worker process writes its cProfile stats here |
| ``BENCH_PROFILE_CLOCK`` | ``cpu`` to profile CPU time instead of wall time |
| ``BENCH_COUNT_DIR`` | if set, each process writes its SQL and message counts here |
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import time
from typing import Any

from celery import Celery, signals

from celery_durable import durable_workflow, workflow

COUNT_DIR = os.environ.get("BENCH_COUNT_DIR") or ""
if COUNT_DIR:
    # Before the store's engine exists, so that its first statement is counted too.
    import round_trips

    round_trips.install(COUNT_DIR)

QUEUE = os.environ.get("BENCH_QUEUE", "durable_bench")

app = Celery(
    "durable_bench",
    broker=os.environ.get("BENCH_BROKER_URL", "redis://127.0.0.1:6379/14"),
    backend=os.environ.get("BENCH_RESULT_URL", "redis://127.0.0.1:6379/15"),
)
app.conf.update(
    task_default_queue=QUEUE,
    durable_database_url=os.environ.get(
        "BENCH_STORE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/durable_bench"
    ),
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)


@app.task(name="bench.add_one")
def add_one(x: int) -> int:
    """The unit of work: as small as possible, so the engines' overhead is what is timed."""
    return x + 1


@app.task(name="bench.total")
def total(values: list[int]) -> int:
    """The chord's callback."""
    return sum(values)


@durable_workflow(name="bench.sequential")
async def sequential(n: int) -> int:
    """``n`` activities one after another: the durable twin of ``chain`` of ``n``."""
    x = 0
    for _ in range(n):
        x = await add_one.s(x)
    return x


@durable_workflow(name="bench.fanout")
async def fanout(n: int) -> int:
    """``n`` activities at once, then their sum: the durable twin of a ``chord`` of ``n``."""
    values = await asyncio.gather(*(add_one.s(i) for i in range(n)))
    return sum(values)


def plus_one(x: int) -> int:
    """The local steps' work: as cheap as ``add_one``, run inside the driver."""
    return x + 1


@durable_workflow(name="bench.local_steps")
async def local_steps(n: int) -> int:
    """``n`` local steps (``workflow.step``) one after another, no task at all."""
    x = 0
    for _ in range(n):
        x = await workflow.step(plus_one, x)
    return x


#: The workflows whose rows the benchmarks delete before they run.
WORKFLOWS = [sequential.name, fanout.name, local_steps.name]


_profiler: list[cProfile.Profile] = []


def _start_profile(**_: Any) -> None:
    for inherited in _profiler:  # a forked child stops its parent's copy
        inherited.disable()
    cpu = os.environ.get("BENCH_PROFILE_CLOCK") == "cpu"
    _profiler[:] = [cProfile.Profile(time.process_time) if cpu else cProfile.Profile()]
    _profiler[0].enable()


def _dump_profile(role: str) -> None:
    if _profiler:
        _profiler[0].disable()
        _profiler[0].dump_stats(os.path.join(PROFILE_DIR, f"{role}-{os.getpid()}.prof"))


PROFILE_DIR = os.environ.get("BENCH_PROFILE_DIR") or ""
if PROFILE_DIR:
    signals.worker_init.connect(_start_profile, weak=False)
    signals.worker_shutdown.connect(lambda **_: _dump_profile("main"), weak=False)
    signals.worker_process_init.connect(_start_profile, weak=False)
    signals.worker_process_shutdown.connect(lambda **_: _dump_profile("child"), weak=False)
