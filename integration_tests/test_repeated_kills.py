"""SIGKILL a worker's whole process group three times while two runs are in progress."""

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
def test_runs_survive_three_kills(cluster: Cluster) -> None:
    worker = cluster.worker()
    sequential = wfapp.sequential.apply_async((20,), {"hold": [4, 11, 17]}, app=cluster.client)
    fan_out = wfapp.fan_out.apply_async(
        (200,), {"hold": [30, 200], "pause_after_gather": True}, app=cluster.client
    )
    # Each kill lands while both runs are paused: the sequential one in an activity, the
    # fan-out in one of its gathered activities, then mid-turn, then in its last activity.
    for sequential_point, fan_out_point in [
        ("record-4", "record-30"),
        ("record-11", "turn-after-gather"),
        ("record-17", "record-200"),
    ]:
        cluster.wait_for_pause(sequential.id, sequential_point)
        cluster.wait_for_pause(fan_out.id, fan_out_point)
        cluster.kill(worker)
        worker.restart()

    assert sequential.get(timeout=120) == sequential_result(20)
    assert fan_out.get(timeout=120) == fan_out_result(200)
    records = assert_delivered_once(cluster, sequential.id, sequential_steps(20))
    assert_sequential_turns(cluster, records, sequential.id)
    records = assert_delivered_once(cluster, fan_out.id, fan_out_steps(200))
    assert_fan_out_turns(cluster, records, fan_out.id)
    assert cluster.kills == 3
    # The sequential run had nothing but its held activity in flight at each kill.
    assert_side_effects(
        cluster, sequential.id, range(20), exactly=once_except(20, twice=[4, 11, 17])
    )
    # Other gathered activities may have been running at the first kill: bounds only.
    assert_side_effects(cluster, fan_out.id, range(201), at_least={30: 2, 200: 2})
