"""Two workers on one queue, with duplicate wake and step messages published on purpose:
racing driver turns and duplicate deliveries must never corrupt a run's history."""

from __future__ import annotations

import time

import pytest

from celery_durable.worker import publish_wake, resend

from . import wfapp
from .checks import (
    assert_delivered_once,
    assert_fan_out_turns,
    assert_side_effects,
    fan_out_result,
    fan_out_steps,
    once_except,
)
from .cluster import ALL, Cluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cluster", ALL, indirect=True)
def test_two_workers_and_duplicate_messages_keep_history_exact(cluster: Cluster) -> None:
    cluster.worker("w1")
    cluster.worker("w2")
    handle = wfapp.fan_out.apply_async((200,), app=cluster.client)

    deadline = time.monotonic() + 120
    while not handle.ready() and time.monotonic() < deadline:
        for _ in range(3):  # every driver turn races with others on the same run
            publish_wake(cluster.client, wfapp.fan_out.name, handle.id, {})
        # A second copy of every step not yet claimed, as a broker redelivery would make.
        resend(cluster.client, cluster.store.dispatches_to_resend(handle.id), copies=True)
        time.sleep(0.05)

    assert handle.get(timeout=10) == fan_out_result(200)
    records = assert_delivered_once(cluster, handle.id, fan_out_steps(200))
    assert_fan_out_turns(cluster, records, handle.id)
    # Nobody was killed: every activity ran exactly once, whichever copy won.
    assert cluster.kills == 0
    assert_side_effects(cluster, handle.id, range(201), exactly=once_except(201))
