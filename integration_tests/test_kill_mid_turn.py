"""SIGKILL a worker's whole process group while a driver turn runs workflow code, between
two awaits (the turn has read new outcomes and not committed), then restart it."""

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
from .cluster import ALL, THREADS, Cluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cluster", ALL, indirect=True)
def test_sequential_run_survives_kill_mid_turn(cluster: Cluster) -> None:
    worker = cluster.worker()
    handle = wfapp.sequential.apply_async((20,), {"pause_at": 9}, app=cluster.client)
    cluster.wait_for_pause(handle.id, "turn-after-9")
    # The paused turn has read the outcome of step 10 (index 9) and not committed it.
    steps = cluster.store.history(handle.id)
    assert [s.state for s in steps[-2:]] == ["DELIVERED", "DONE"]
    assert len(steps) == 10 and cluster.store.require_run(handle.id).turn == 10

    cluster.kill(worker)
    worker.restart()

    assert handle.get(timeout=120) == sequential_result(20)
    records = assert_delivered_once(cluster, handle.id, sequential_steps(20))
    assert_sequential_turns(cluster, records, handle.id)
    # No activity was running when the kill landed.
    assert_side_effects(cluster, handle.id, range(20), exactly=once_except(20))


@pytest.mark.parametrize("cluster", THREADS, indirect=True)
def test_fan_out_survives_kill_mid_turn(cluster: Cluster) -> None:
    worker = cluster.worker()
    handle = wfapp.fan_out.apply_async((200,), {"pause_after_gather": True}, app=cluster.client)
    cluster.wait_for_pause(handle.id, "turn-after-gather")
    # The paused turn has read the last outcomes of the gather and not committed them.
    steps = cluster.store.history(handle.id)
    assert len(steps) == 200 and "DONE" in {s.state for s in steps}

    cluster.kill(worker)
    worker.restart()

    assert handle.get(timeout=120) == fan_out_result(200)
    records = assert_delivered_once(cluster, handle.id, fan_out_steps(200))
    assert_fan_out_turns(cluster, records, handle.id)
    assert_side_effects(cluster, handle.id, range(201), exactly=once_except(201))
