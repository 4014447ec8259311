"""Deploys: a warm shutdown (SIGTERM, as every deploy and ``celery multi restart`` sends)
and a rolling restart of every worker run each step exactly once.

A worker that is draining keeps renewing the claims of the steps it still runs, so no
other worker takes it for dead, even when its steps outlast ``durable_worker_timeout``
several times over.
"""

from __future__ import annotations

import time

import pytest

from . import wfapp
from .checks import assert_side_effects
from .cluster import ALL, PREFORK, Cluster

pytestmark = pytest.mark.integration

#: Short, so that a worker whose heartbeats stopped would be taken for dead mid-step.
SHORT_TIMEOUT = {"DURABLE_IT_WORKER_TIMEOUT": "2"}


def wait_for_effect(cluster: Cluster, run_id: str, index: int, timeout: float = 60) -> None:
    """Wait until step ``index`` of the run has started somewhere."""
    deadline = time.monotonic() + timeout
    while cluster.effects()[(run_id, index)] == 0:
        assert time.monotonic() < deadline, f"step {index} of {run_id} never started"
        time.sleep(0.05)


def slow_result(n: int) -> int:
    return sum(wfapp.step_value(i) for i in range(n))


@pytest.mark.parametrize("cluster", ALL, indirect=True)
def test_a_warm_shutdown_lets_a_long_step_finish_without_running_it_again(
    cluster: Cluster,
) -> None:
    # The step takes three worker timeouts; the stopping worker must stay "alive".
    stopping = cluster.worker("w1", env=SHORT_TIMEOUT)
    handle = wfapp.slow_steps.apply_async((3, 6.0), app=cluster.client)
    wait_for_effect(cluster, handle.id, 0)
    cluster.worker("w2", env=SHORT_TIMEOUT)

    assert stopping.terminate() == 0

    assert handle.get(timeout=120) == slow_result(3)
    assert_side_effects(cluster, handle.id, range(3), exactly={0: 1, 1: 1, 2: 1})


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_a_rolling_restart_of_every_worker_runs_each_step_once(cluster: Cluster) -> None:
    workers = [cluster.worker(f"w{i}", concurrency=2, env=SHORT_TIMEOUT) for i in (1, 2)]
    handles = [wfapp.slow_steps.apply_async((6, 1.5), app=cluster.client) for _ in range(3)]
    wait_for_effect(cluster, handles[0].id, 0)

    # Each worker in turn: stop it warm while it runs steps, start it again, go on.
    for _ in range(2):
        for worker in workers:
            assert worker.terminate() == 0
            worker.start()

    for handle in handles:
        assert handle.get(timeout=180) == slow_result(6)
        assert_side_effects(cluster, handle.id, range(6), exactly={i: 1 for i in range(6)})
