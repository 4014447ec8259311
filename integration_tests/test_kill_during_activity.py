"""SIGKILL a worker's whole process group while activities run, then restart it."""

from __future__ import annotations

import pytest

from . import wfapp
from .checks import (
    assert_delivered_once,
    assert_fan_out_turns,
    assert_sequential_turns,
    assert_side_effects,
    fan_out_result,
    fan_out_steps,
    once_except,
    sequential_result,
    sequential_steps,
)
from .cluster import ALL, Cluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cluster", ALL, indirect=True)
def test_sequential_run_survives_kill_while_an_activity_runs(cluster: Cluster) -> None:
    worker = cluster.worker()
    handle = wfapp.sequential.apply_async((20,), {"hold": [7]}, app=cluster.client)
    cluster.wait_for_pause(handle.id, "record-7")

    cluster.kill(worker)
    worker.restart()

    assert handle.get(timeout=120) == sequential_result(20)
    records = assert_delivered_once(cluster, handle.id, sequential_steps(20))
    assert_sequential_turns(cluster, records, handle.id)
    # Activity 7 had run its side effect when it was killed, so it ran again; every
    # other one finished before the kill or started after the restart.
    assert_side_effects(cluster, handle.id, range(20), exactly=once_except(20, twice=[7]))


@pytest.mark.parametrize("cluster", ALL, indirect=True)
def test_fan_out_survives_kill_while_activities_run(cluster: Cluster) -> None:
    held = [50, 100, 150]  # one per worker slot: the kill finds every slot mid-activity
    worker = cluster.worker(concurrency=len(held))
    handle = wfapp.fan_out.apply_async((200,), {"hold": held}, app=cluster.client)
    for i in held:
        cluster.wait_for_pause(handle.id, f"record-{i}")

    cluster.kill(worker)
    worker.restart()

    assert handle.get(timeout=120) == fan_out_result(200)
    records = assert_delivered_once(cluster, handle.id, fan_out_steps(200))
    assert_fan_out_turns(cluster, records, handle.id)
    # While every slot was held no other activity was between its side effect and its
    # recorded outcome, so only the held ones ran twice.
    assert_side_effects(cluster, handle.id, range(201), exactly=once_except(201, twice=held))
