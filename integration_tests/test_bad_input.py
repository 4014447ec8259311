"""Mistakes in workflow code and failing activities, over a real worker."""

from __future__ import annotations

import pytest

from . import wfapp
from .checks import RECORD, assert_side_effects
from .cluster import PREFORK, THREADS, Cluster

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_awaiting_a_plain_object_fails_the_run_and_keeps_its_history(cluster: Cluster) -> None:
    cluster.worker()
    handle = wfapp.awaits_plain_object.apply_async(("o-1",), app=cluster.client)

    with pytest.raises(TypeError, match="await") as caught:
        handle.get(timeout=60)

    assert handle.status == "FAILURE"
    assert handle.id in str(caught.value)  # the error names the run
    assert "dict" in str(caught.value)  # and what was awaited
    [step] = handle.history
    assert (step.seq, step.name, step.args, step.state, step.result) == (
        1,
        RECORD,
        [0],
        "DELIVERED",
        wfapp.step_value(0),
    )
    assert_side_effects(cluster, handle.id, [0], exactly={0: 1})


@pytest.mark.parametrize("cluster", THREADS, indirect=True)
def test_failing_activity_fails_the_run_with_its_own_exception(cluster: Cluster) -> None:
    cluster.worker()
    handle = wfapp.declined_checkout.apply_async(("o-2",), app=cluster.client)

    with pytest.raises(wfapp.PaymentDeclinedError, match="card declined for o-2"):
        handle.get(timeout=60)

    assert handle.status == "FAILURE"
    first, second = handle.history
    assert (first.name, first.state, first.result) == (RECORD, "DELIVERED", wfapp.step_value(0))
    assert (second.name, second.args, second.state) == (wfapp.decline.name, ["o-2"], "DELIVERED")
    assert second.error is not None and second.error["type"] == "PaymentDeclinedError"
