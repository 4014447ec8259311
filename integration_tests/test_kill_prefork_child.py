"""SIGKILL one prefork child (the worker's main process survives and replaces it)."""

from __future__ import annotations

import pytest

from . import wfapp
from .checks import (
    assert_delivered_once,
    assert_sequential_turns,
    assert_side_effects,
    once_except,
    sequential_result,
    sequential_steps,
)
from .cluster import PREFORK, Cluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_run_survives_kill_of_the_child_running_an_activity(cluster: Cluster) -> None:
    worker = cluster.worker()
    handle = wfapp.sequential.apply_async((20,), {"hold": [5]}, app=cluster.client)
    pid = cluster.wait_for_pause(handle.id, "record-5")
    assert pid in worker.child_pids()

    cluster.kill_pid(pid)

    assert handle.get(timeout=120) == sequential_result(20)
    records = assert_delivered_once(cluster, handle.id, sequential_steps(20))
    assert_sequential_turns(cluster, records, handle.id)
    assert_side_effects(cluster, handle.id, range(20), exactly=once_except(20, twice=[5]))


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_run_survives_kill_of_the_child_running_a_driver_turn(cluster: Cluster) -> None:
    worker = cluster.worker()
    handle = wfapp.sequential.apply_async((20,), {"pause_at": 5}, app=cluster.client)
    pid = cluster.wait_for_pause(handle.id, "turn-after-5")
    assert pid in worker.child_pids()

    cluster.kill_pid(pid)

    assert handle.get(timeout=120) == sequential_result(20)
    records = assert_delivered_once(cluster, handle.id, sequential_steps(20))
    assert_sequential_turns(cluster, records, handle.id)
    assert_side_effects(cluster, handle.id, range(20), exactly=once_except(20))
