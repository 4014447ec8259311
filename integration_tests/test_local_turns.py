"""The next turn of a run is driven where the run is suspended: no wake messages through
the broker and no replays, on one worker or between two on one machine."""

from __future__ import annotations

import re

import pytest

from . import wfapp
from .checks import assert_side_effects, once_except, sequential_result
from .cluster import ALL, Cluster

pytestmark = pytest.mark.integration

STEPS = 30


def _driver_messages(log: str) -> int:
    """Driver tasks a worker received for the ``sequential`` workflow (start and wakes)."""
    return len(re.findall(r"Task \S*sequential\[[^\]]+\] received", log))


def _replays(log: str, run_id: str) -> int:
    return sum(1 for line in log.splitlines() if "replaying" in line and run_id in line)


@pytest.mark.parametrize("cluster", ALL, indirect=True)
def test_a_sequential_run_is_driven_where_it_is_suspended(cluster: Cluster) -> None:
    worker = cluster.worker(concurrency=2)
    handle = wfapp.sequential.apply_async((STEPS,), app=cluster.client)

    assert handle.get(timeout=120) == sequential_result(STEPS)
    assert_side_effects(cluster, handle.id, range(STEPS), exactly=once_except(STEPS))
    log = "".join(path.read_text() for path in worker.logs)
    # The start is the only driver message: every later turn was handed to the process
    # holding the run (or taken by the one that recorded the outcome), and none replayed.
    assert _driver_messages(log) == 1
    assert _replays(log, handle.id) == 0


@pytest.mark.parametrize(
    "cluster", ["redis-postgres-threads", "rabbitmq-sqlite-threads"], indirect=True
)
def test_two_workers_on_one_machine_hand_a_run_to_each_other(cluster: Cluster) -> None:
    workers = [cluster.worker("w1", concurrency=1), cluster.worker("w2", concurrency=1)]
    handle = wfapp.sequential.apply_async((STEPS,), app=cluster.client)

    assert handle.get(timeout=120) == sequential_result(STEPS)
    assert_side_effects(cluster, handle.id, range(STEPS), exactly=once_except(STEPS))
    logs = ["".join(path.read_text() for path in w.logs) for w in workers]
    # Steps ran on both workers, yet the run stayed with the process that held it.
    assert all("succeeded" in log for log in logs)
    assert sum(_driver_messages(log) for log in logs) == 1
    assert sum(_replays(log, handle.id) for log in logs) == 0
