"""SIGKILL a worker's whole process group after a driver turn committed new steps and
before it published their messages, then restart it: the sweeper must send them."""

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
from .cluster import ALL, PREFORK, Cluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_sequential_run_survives_kill_before_publish(cluster: Cluster) -> None:
    cluster.pause_publish_at(10)
    worker = cluster.worker()
    handle = wfapp.sequential.apply_async((20,), app=cluster.client)
    cluster.wait_for_pause(handle.id, "publish")
    # Turn 10 committed step 10, then stopped short of sending its message.
    assert len(cluster.store.history(handle.id)) == 10
    assert cluster.store.require_run(handle.id).turn == 10

    cluster.kill(worker)
    worker.restart()

    assert handle.get(timeout=120) == sequential_result(20)
    records = assert_delivered_once(cluster, handle.id, sequential_steps(20))
    assert_sequential_turns(cluster, records, handle.id)
    # Nothing was running when the kill landed: step 10 had not even been sent.
    assert_side_effects(cluster, handle.id, range(20), exactly=once_except(20))


@pytest.mark.parametrize("cluster", ALL, indirect=True)
def test_fan_out_survives_kill_halfway_through_publishing(cluster: Cluster) -> None:
    cluster.pause_publish_at(101)  # steps 1-100 are sent, 101-200 are not
    worker = cluster.worker()
    handle = wfapp.fan_out.apply_async((200,), app=cluster.client)
    cluster.wait_for_pause(handle.id, "publish")
    assert len(cluster.store.history(handle.id)) == 200  # all committed before publishing

    cluster.kill(worker)
    worker.restart()

    assert handle.get(timeout=120) == fan_out_result(200)
    records = assert_delivered_once(cluster, handle.id, fan_out_steps(200))
    assert_fan_out_turns(cluster, records, handle.id)
    # Activities of the sent half may have been running when the kill landed; the other
    # half (and the last step) only ever ran after the restart.
    assert_side_effects(cluster, handle.id, range(201), exactly={i: 1 for i in range(100, 201)})
