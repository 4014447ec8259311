"""Steps whose worker process died, under every acknowledgement setting Celery users run,
and poison steps that kill whatever process runs them.

* A lost step is sent again once and the run moves on, whatever ``task_acks_late``,
  ``task_reject_on_worker_lost`` and ``worker_prefetch_multiplier`` say. (With both
  acks-late settings on, Celery requeues the message of a dead child and reports
  nothing else; the worker that lost it takes it back.)
* A step that kills its process every time is sent again with backoff, a bounded number
  of times; then its await raises :class:`~celery_durable.StepLostError`, which the
  workflow may catch, or which fails the run with its history kept, ready to retry.
"""

from __future__ import annotations

import time

import pytest

from celery_durable import StepLostError, WorkflowHandle

from . import wfapp
from .checks import (
    assert_delivered_once,
    assert_side_effects,
    once_except,
    sequential_result,
    sequential_steps,
)
from .cluster import ALL, PREFORK, Cluster
from .worker_process import WorkerProcess

pytestmark = pytest.mark.integration

#: (acks_late, reject_on_worker_lost, prefetch multiplier) as Celery users set them.
ACKS = {
    "acks-early": {"DURABLE_IT_PREFETCH": "4"},
    "acks-late": {"DURABLE_IT_ACKS_LATE": "1", "DURABLE_IT_PREFETCH": "4"},
    "acks-late-reject-prefetch-1": {
        "DURABLE_IT_ACKS_LATE": "1",
        "DURABLE_IT_REJECT_ON_WORKER_LOST": "1",
        "DURABLE_IT_PREFETCH": "1",
    },
    "acks-late-reject-prefetch-4": {
        "DURABLE_IT_ACKS_LATE": "1",
        "DURABLE_IT_REJECT_ON_WORKER_LOST": "1",
        "DURABLE_IT_PREFETCH": "4",
    },
}


def lose_the_worker_running(cluster: Cluster, worker: WorkerProcess, pid: int) -> None:
    """Kill the process running a step: the prefork child (the worker replaces it), or
    the whole thread-pool worker, which a supervisor then starts again."""
    if cluster.setup.pool == "prefork":
        assert pid in worker.child_pids()
        cluster.kill_pid(pid)
    else:
        cluster.kill(worker)
        worker.restart()


@pytest.mark.parametrize("acks", list(ACKS))
@pytest.mark.parametrize("cluster", ALL, indirect=True)
def test_a_step_lost_with_its_process_runs_once_more_under_every_ack_setting(
    cluster: Cluster, acks: str
) -> None:
    worker = cluster.worker(env=ACKS[acks])
    handle = wfapp.sequential.apply_async((8,), {"hold": [3]}, app=cluster.client)
    pid = cluster.wait_for_pause(handle.id, "record-3")

    lost_at = time.monotonic()
    lose_the_worker_running(cluster, worker, pid)

    assert handle.get(timeout=120) == sequential_result(8)
    print(
        f"\n{cluster.setup.id} {acks}: finished {time.monotonic() - lost_at:.1f} s after the loss"
    )
    assert_delivered_once(cluster, handle.id, sequential_steps(8))
    assert_side_effects(cluster, handle.id, range(8), exactly=once_except(8, twice=[3]))
    [lost] = [r for r in cluster.store.history(handle.id) if r.seq == 4]
    assert lost.losses == 1


def run_through_crashes(
    cluster: Cluster, worker: WorkerProcess, handle: WorkflowHandle[str]
) -> None:
    """Wait for the run to end, starting the worker again whenever a poison step took
    it down (a thread-pool worker dies with the step; a prefork child is replaced)."""
    deadline = time.monotonic() + 120
    while not handle.ready() and handle.status != "STUCK":
        assert time.monotonic() < deadline, f"run {handle.id} did not end"
        if not worker.running:
            cluster.kills += 1
            worker.restart()
        time.sleep(0.1)


@pytest.mark.parametrize("acks", ["acks-early", "acks-late-reject-prefetch-1"])
@pytest.mark.parametrize("cluster", ALL, indirect=True)
def test_a_poison_step_is_sent_again_a_bounded_number_of_times_then_raises(
    cluster: Cluster, acks: str
) -> None:
    (cluster.dir / wfapp.POISON_FILE).touch()
    worker = cluster.worker(env=ACKS[acks])
    handle = wfapp.poisoned.apply_async((True,), app=cluster.client)

    run_through_crashes(cluster, worker, handle)

    result = handle.get(timeout=1)
    assert result.startswith("caught: step 2 (")
    assert "lost with its worker 4 times (4 attempts)" in result
    # The default of three re-sends: four executions of the poison step, each of which
    # killed the process running it, and no more.
    cluster.kills = 4
    assert_side_effects(cluster, handle.id, [0, 1, 2], exactly={0: 1, 1: 4, 2: 1})


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_an_uncaught_poison_step_fails_the_run_which_retry_finishes(cluster: Cluster) -> None:
    poison = cluster.dir / wfapp.POISON_FILE
    poison.touch()
    cluster.worker()
    handle = wfapp.poisoned.apply_async((False,), app=cluster.client)

    with pytest.raises(StepLostError, match="lost with its worker 4 times"):
        handle.get(timeout=120)
    assert handle.status == "FAILURE"
    assert [r.state for r in cluster.store.history(handle.id)] == ["DELIVERED", "DELIVERED"]

    poison.unlink()  # the task is fixed and deployed
    handle.retry()

    assert handle.get(timeout=60) == "no crash"
    cluster.kills = 4  # the poison step's four executions killed their processes
    assert_side_effects(cluster, handle.id, [0, 1, 2], exactly={0: 1, 1: 5, 2: 1})
