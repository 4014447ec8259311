"""Messages the broker loses (a purge stands in for a broker crash) are sent again from
SQL by the sweeper."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from celery_durable.store import _schema

from . import wfapp
from .checks import (
    assert_delivered_once,
    assert_side_effects,
    fan_out_result,
    fan_out_steps,
    once_except,
    sequential_result,
    sequential_steps,
)
from .cluster import ONE_PER_BROKER, Cluster

pytestmark = pytest.mark.integration


def _wait_for_messages(cluster: Cluster, queue: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while cluster.broker.queue_length(queue) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queue} never held {count} messages")
        time.sleep(0.05)


@pytest.mark.parametrize("cluster", ONE_PER_BROKER, indirect=True)
def test_purged_step_messages_are_sent_again(cluster: Cluster) -> None:
    activities = cluster.broker.new_queue("it-act")
    cluster.worker("drivers")  # consumes only the workflow queue for now
    handle = wfapp.fan_out.apply_async((200,), {"activity_queue": activities}, app=cluster.client)
    _wait_for_messages(cluster, activities, 200)

    cluster.broker.purge(activities)
    cluster.worker("activities", queues=[activities])

    assert handle.get(timeout=120) == fan_out_result(200)
    assert_delivered_once(cluster, handle.id, fan_out_steps(200))
    # Every message of the first 200 steps was purged, so each ran from a re-send.
    with cluster.store.engine.connect() as conn:
        redispatches = conn.execute(
            select(_schema.steps.c.redispatches).where(
                _schema.steps.c.run_id == handle.id, _schema.steps.c.seq <= 200
            )
        ).scalars()
        assert min(redispatches) >= 1
    assert_side_effects(cluster, handle.id, range(201), exactly=once_except(201))


@pytest.mark.parametrize("cluster", ONE_PER_BROKER, indirect=True)
def test_purged_wake_message_is_sent_again(cluster: Cluster) -> None:
    handle = wfapp.sequential.apply_async((3,), app=cluster.client)
    _wait_for_messages(cluster, cluster.queue, 1)
    cluster.broker.purge(cluster.queue)  # the run exists; its only wake is gone

    cluster.worker()

    assert handle.get(timeout=60) == sequential_result(3)
    assert_delivered_once(cluster, handle.id, sequential_steps(3))
    assert_side_effects(cluster, handle.id, range(3), exactly=once_except(3))
