"""A minute of chaos: three workers on one broker and store while 200 workflows run.

Every few seconds a random worker is SIGKILLed or stopped warm (SIGTERM) and a
replacement starts; the test's own redis-server is restarted empty once and its own
PostgreSQL once. The workflows use every kind of step: sequences, fan-outs, timers,
signals and child workflows. Afterwards:

* every run finished with the right result, and nothing is left RUNNING;
* no step ran twice unless a fault (a kill or a restart, never a warm stop) came
  between its executions, and none ran more often than the faults in that time allow.

A summary of what was injected and what was counted is printed (``pytest -s`` shows it).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from celery_durable import StoreUnavailableError, WorkflowHandle

from . import chaos_app
from .cluster import SETUPS, Cluster
from .own_services import OwnPostgres, OwnRedis
from .worker_process import WorkerProcess

pytestmark = pytest.mark.integration

RUNS = 200
CHAOS_SECONDS = 60.0
SETTINGS = {"DURABLE_IT_WORKER_TIMEOUT": "4"}


def _retrying(call: Any, *args: Any) -> Any:
    """Call ``call`` from the test process, waiting out the store's own restart."""
    deadline = time.monotonic() + 60
    while True:
        try:
            return call(*args)
        except StoreUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_two_hundred_workflows_survive_a_minute_of_chaos(
    own_redis: OwnRedis, own_postgres: OwnPostgres, tmp_path: Path
) -> None:
    cluster = Cluster(
        SETUPS["redis-postgres-threads"],
        tmp_path,
        broker_url=own_redis.url,
        store_url=own_postgres.url,
    )
    chaos = random.Random(1234)  # the same faults, in the same order, on every run
    include = [chaos_app.__name__]
    faults: list[tuple[float, str]] = []  # (time, what): the ones that may cost a re-run
    injected: Counter[str] = Counter()
    names = iter(range(4, 1000))
    try:
        workers = [
            cluster.worker(f"w{i}", concurrency=2, env=SETTINGS, pool=pool, include=include)
            for i, pool in ((1, "prefork"), (2, "prefork"), (3, "threads"))
        ]
        kinds = [chaos_app.KINDS[i % len(chaos_app.KINDS)] for i in range(RUNS)]
        handles: list[tuple[str, WorkflowHandle[int]]] = []
        signalled: set[str] = set()
        started = time.monotonic()
        next_fault = started + 3
        restarted = {"redis": False, "postgres": False}
        while time.monotonic() - started < CHAOS_SECONDS:
            elapsed = time.monotonic() - started
            # Start the runs over the first three quarters of the minute.
            due = min(RUNS, int(RUNS * elapsed / (0.75 * CHAOS_SECONDS)) + 1)
            while len(handles) < due:
                kind = kinds[len(handles)]
                handle = _retrying(
                    lambda kind=kind: chaos_app.mixed.apply_async((kind,), app=cluster.client)
                )
                handles.append((kind, handle))
            # Signal runs a few seconds after they started.
            for kind, handle in handles[: max(0, len(handles) - 10)]:
                if kind == "signal" and handle.id not in signalled:
                    _retrying(handle.signal, "go", 1000)
                    signalled.add(handle.id)
            if time.monotonic() >= next_fault:
                next_fault = time.monotonic() + chaos.uniform(2.0, 4.0)
                if elapsed > 20 and not restarted["redis"]:
                    restarted["redis"] = True
                    faults.append((time.time(), "redis restarted empty"))
                    own_redis.restart_empty()
                    injected["redis restarted empty"] += 1
                elif elapsed > 40 and not restarted["postgres"]:
                    restarted["postgres"] = True
                    faults.append((time.time(), "postgres restarted"))
                    own_postgres.restart("immediate")
                    injected["postgres restarted"] += 1
                else:
                    victim = chaos.choice([w for w in workers if w.running])
                    if chaos.random() < 0.5:
                        faults.append((time.time(), f"SIGKILL {victim.nodename}"))
                        cluster.kill(victim)
                        injected["SIGKILL"] += 1
                    else:
                        victim.terminate()
                        injected["SIGTERM"] += 1
                    workers.remove(victim)
                    workers.append(_replacement(cluster, victim, next(names), include))
                    injected["replacements started"] += 1
            time.sleep(0.05)

        for kind, handle in handles:
            if kind == "signal" and handle.id not in signalled:
                _retrying(handle.signal, "go", 1000)
        results = Counter()
        for kind, handle in handles:
            assert _retrying(handle.get, 180) == chaos_app.expected(kind), handle.id
            results[kind] += 1
        still = _retrying(lambda: cluster.store.list_runs(status="RUNNING", limit=10))
        assert still == [], f"runs left RUNNING: {[r.id for r in still]}"

        reruns = _check_side_effects(cluster, faults)
        print(
            f"\nchaos: {len(handles)} runs ({dict(results)}) all correct; injected "
            f"{dict(injected)}; steps executed {sum(cluster.effects().values())}, of which "
            f"{reruns} re-runs, each after a fault"
        )
    finally:
        cluster.close()


def _replacement(
    cluster: Cluster, victim: WorkerProcess, number: int, include: list[str]
) -> WorkerProcess:
    """Start a worker in place of ``victim``: half the time under its node name (a
    supervisor restarting it), half the time under a new one (a new container)."""
    if number % 2:
        victim.start()
        return victim
    return cluster.worker(
        f"w{number}", concurrency=2, env=SETTINGS, pool=victim.pool, include=include
    )


def _check_side_effects(cluster: Cluster, faults: list[tuple[float, str]]) -> int:
    """No step ran twice without a fault between its executions, nor more often than
    those faults allow; returns the number of re-runs."""
    reruns = 0
    for (run_id, index), times in cluster.effect_times().items():
        if len(times) == 1:
            continue
        between = [what for at, what in faults if times[0] <= at <= times[-1]]
        assert len(times) <= 1 + len(between), (
            f"step {index} of {run_id} ran {len(times)} times with only {between} between "
            f"its first and last execution"
        )
        reruns += len(times) - 1
    return reruns
