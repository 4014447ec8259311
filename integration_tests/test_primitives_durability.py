"""Every workflow primitive survives SIGKILL of the whole worker, on real prefork workers.

Durable timers, local steps, signals, cancellation, child workflows, retries with
durable backoff, continue-as-new, and a run parked STUCK by a bad deploy that resumes on
its own once the fixed code starts. The tests split between the two prefork setups
(Redis with SQLite, RabbitMQ with PostgreSQL). Each kill lands at a point the test waits
for, and the assertions are exact side-effect counts and histories, never timings.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
import redis
from sqlalchemy import update

from celery_durable.errors import (
    DurableError,
    NonDeterminismError,
    SignalError,
    WorkflowCancelledError,
)
from celery_durable.store import DELIVERED, SCHEDULED, StepRecord
from celery_durable.store._schema import signals as signals_table
from celery_durable.store._schema import steps as steps_table

from . import primitives_app as pa
from .checks import RECORD, assert_side_effects, once_except, sequential_result
from .cluster import Cluster
from .wfapp import step_value
from .worker_process import WorkerProcess

pytestmark = pytest.mark.integration

REDIS_SQLITE = "redis-sqlite-prefork"
RABBITMQ_POSTGRES = "rabbitmq-postgres-prefork"


class PrimitivesWorker(WorkerProcess):
    """A worker of the test app that also imports :mod:`primitives_app`."""

    def command(self) -> list[str]:
        return [*super().command(), "--include", pa.__name__]


def start_worker(cluster: Cluster, variant: str = "v1") -> PrimitivesWorker:
    """Like ``cluster.worker()``, with the primitives' workflows, running ``variant``."""
    worker = PrimitivesWorker(
        f"w1-{cluster.queue}@localhost",
        {**cluster.env, "DURABLE_IT_VARIANT": variant},
        cluster.log_dir,
        pool=cluster.setup.pool,
        concurrency=3,
        queues=[cluster.queue],
    )
    cluster.workers.append(worker)
    worker.start()
    return worker


def wait_for_history(
    cluster: Cluster,
    run_id: str,
    reached: Callable[[list[StepRecord]], bool],
    what: str,
    timeout: float = 60.0,
) -> list[StepRecord]:
    """Poll the run's history until ``reached`` says yes; returns that history."""
    deadline = time.monotonic() + timeout
    while True:
        records = cluster.store.history(run_id)
        if reached(records):
            return records
        if time.monotonic() > deadline:
            seen = [(r.seq, r.kind, r.name, r.state) for r in records]
            raise TimeoutError(f"run {run_id}: {what} did not happen in {timeout} s: {seen}")
        time.sleep(0.05)


def waiting(kind: str, count: int = 1) -> Callable[[list[StepRecord]], bool]:
    """True once the run has ``count`` steps of ``kind`` and the last one still waits."""

    def reached(records: list[StepRecord]) -> bool:
        of_kind = [r for r in records if r.kind == kind]
        return len(of_kind) >= count and of_kind[count - 1].state == SCHEDULED

    return reached


def kinds(cluster: Cluster, run_id: str) -> list[tuple[str, str]]:
    """``(kind, state)`` of every step of the run, in order."""
    return [(r.kind, r.state) for r in cluster.store.history(run_id)]


#: The history of ``primitives_app.nap``: an activity, the timer, an activity.
SLEPT = [("activity", DELIVERED), ("timer", DELIVERED), ("activity", DELIVERED)]


def wait_past(deadline: float) -> None:
    """Sleep until the wall clock is past ``deadline`` (UNIX seconds)."""
    while time.time() <= deadline:
        time.sleep(0.05)


# -- durable timers -----------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [RABBITMQ_POSTGRES], indirect=True)
def test_a_sleep_whose_deadline_passes_while_no_worker_lives_wakes_after_restart(
    cluster: Cluster,
) -> None:
    worker = start_worker(cluster)
    handle = pa.nap.apply_async((2.0,), app=cluster.client)
    records = wait_for_history(cluster, handle.id, waiting("timer"), "the sleep")
    [timer] = [r for r in records if r.kind == "timer"]

    cluster.kill(worker)
    wait_past(timer.due_at)  # the timer is due while no worker is alive
    assert kinds(cluster, handle.id)[1] == ("timer", SCHEDULED)
    worker.restart()

    slept = handle.get(timeout=60)
    # The workflow never wakes before its deadline, whatever the kill did.
    assert slept["after"] >= slept["before"] + 2.0 - 1e-6
    assert kinds(cluster, handle.id) == SLEPT
    assert_side_effects(cluster, handle.id, [0, 1], exactly={0: 1, 1: 1})


def _held_by_workers(cluster: Cluster) -> int:
    """Messages of this test's queue that Redis holds for a worker (delivered, not acked):
    where an ETA or countdown message would sit until its time comes."""
    client = redis.Redis.from_url(cluster.broker.url)
    try:
        held = 0
        for _tag, entry in client.hscan_iter("unacked"):
            _message, _exchange, routing_key = json.loads(entry)
            held += routing_key == cluster.queue
        return held
    finally:
        client.close()


def _drop_held_by_workers(cluster: Cluster) -> None:
    client = redis.Redis.from_url(cluster.broker.url)
    try:
        for tag, entry in client.hscan_iter("unacked"):
            if json.loads(entry)[2] == cluster.queue:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
    finally:
        client.close()


@pytest.mark.parametrize("cluster", [REDIS_SQLITE], indirect=True)
def test_a_two_day_sleep_is_rows_in_sql_not_a_broker_message(cluster: Cluster) -> None:
    """While the run sleeps, Redis holds no message of it at all (an ETA message would
    stay in the queue or in ``unacked`` for the two days). After a kill and a purge of
    everything Redis had, the timer still fires, from SQL: its deadline is moved to now
    in the store to stand for the two days passing."""
    worker = start_worker(cluster)
    handle = pa.nap.apply_async((2 * 86400.0,), app=cluster.client)
    records = wait_for_history(cluster, handle.id, waiting("timer"), "the sleep")
    [timer] = [r for r in records if r.kind == "timer"]
    assert (timer.due_at or 0.0) > time.time() + 86400

    deadline = time.monotonic() + 30
    while cluster.broker.queue_length(cluster.queue) or _held_by_workers(cluster):
        assert time.monotonic() < deadline, "a message of the sleeping run stays in Redis"
        time.sleep(0.1)

    cluster.kill(worker)
    cluster.broker.purge(cluster.queue)
    _drop_held_by_workers(cluster)
    with cluster.store.engine.begin() as conn:
        conn.execute(
            update(steps_table)
            .where(steps_table.c.run_id == handle.id, steps_table.c.seq == timer.seq)
            .values(due_at=time.time())
        )
    worker.restart()

    handle.get(timeout=60)
    assert kinds(cluster, handle.id) == SLEPT
    assert_side_effects(cluster, handle.id, [0, 1], exactly={0: 1, 1: 1})


@pytest.mark.parametrize("cluster", [REDIS_SQLITE], indirect=True)
def test_retries_wait_on_durable_backoff_across_a_kill(cluster: Cluster) -> None:
    worker = start_worker(cluster)
    # Fails twice: attempt, 1 s backoff, attempt, 2 s backoff, attempt.
    handle = pa.retried.apply_async((2, 1.0), app=cluster.client)
    records = wait_for_history(cluster, handle.id, waiting("timer", 2), "the second backoff")
    backoff = [r for r in records if r.kind == "timer"][1]

    cluster.kill(worker)
    wait_past(backoff.due_at)  # the backoff runs out while no worker is alive
    worker.restart()

    assert handle.get(timeout=60) == 3
    history = handle.history
    assert [(s.kind, s.state) for s in history] == [
        ("activity", DELIVERED),
        ("timer", DELIVERED),
        ("activity", DELIVERED),
        ("timer", DELIVERED),
        ("activity", DELIVERED),
    ]
    assert [s.error and s.error["type"] for s in history[::2]] == ["FlakyError"] * 2 + [None]
    # No attempt was running at the kill: each of the three ran once.
    assert_side_effects(cluster, handle.id, [1, 2, 3], exactly={1: 1, 2: 1, 3: 1})


# -- local steps --------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [REDIS_SQLITE], indirect=True)
def test_a_local_step_reruns_only_if_killed_before_it_was_recorded(cluster: Cluster) -> None:
    worker = start_worker(cluster)
    unrecorded = pa.local_then_use.apply_async(kwargs={"pause_inside": True}, app=cluster.client)
    recorded = pa.local_then_use.apply_async(kwargs={"pause_after": True}, app=cluster.client)
    # One kill finds the first run inside its local step (ran, result not recorded) and
    # the second in the turn after its local step's result was committed.
    cluster.wait_for_pause(unrecorded.id, "local-1")
    cluster.wait_for_pause(recorded.id, "after-local-1")
    cluster.kill(worker)
    worker.restart()

    for handle in (unrecorded, recorded):
        token = handle.get(timeout=60)
        local, use = handle.history[1:]
        assert (local.kind, local.state, local.result) == ("local", DELIVERED, token)
        assert (use.name, use.args, use.result) == (pa.note.name, [2, token], token)
    assert_side_effects(cluster, unrecorded.id, [0, 1, 2], exactly={0: 1, 1: 2, 2: 1})
    assert_side_effects(cluster, recorded.id, [0, 1, 2], exactly={0: 1, 1: 1, 2: 1})


# -- signals ------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [RABBITMQ_POSTGRES], indirect=True)
def test_signals_sent_while_the_worker_is_down_arrive_in_order_each_once(
    cluster: Cluster,
) -> None:
    worker = start_worker(cluster)
    handle = pa.collect.apply_async((3,), {"pause_after_first": True}, app=cluster.client)
    wait_for_history(cluster, handle.id, waiting("signal"), "the first signal wait")

    cluster.kill(worker)
    for payload in ("a", "b", "c"):
        handle.signal("item", payload)
    worker.restart()
    # Killed again in the turn that took the first signal, before it committed.
    cluster.wait_for_pause(handle.id, "after-signal-0")
    cluster.kill(worker)
    worker.restart()

    assert handle.get(timeout=60) == ["a", "b", "c"]
    waits = [s for s in handle.history if s.kind == "signal"]
    assert [(s.state, s.result) for s in waits] == [(DELIVERED, p) for p in "abc"]
    with cluster.store.engine.connect() as conn:
        consumed = conn.execute(
            signals_table.select().where(signals_table.c.run_id == handle.id)
        ).all()
    assert sorted(s.consumed_seq for s in consumed) == [s.seq for s in waits]
    assert_side_effects(cluster, handle.id, range(3), exactly=once_except(3))
    with pytest.raises(SignalError, match=handle.id):
        handle.signal("item", "late")


# -- cancellation -------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [REDIS_SQLITE], indirect=True)
def test_a_cancel_sent_while_the_worker_is_down_compensates_once(cluster: Cluster) -> None:
    worker = start_worker(cluster)
    handle = pa.saga.apply_async(kwargs={"hold_refund": True}, app=cluster.client)
    wait_for_history(cluster, handle.id, waiting("timer"), "the hour's sleep")

    cluster.kill(worker)
    handle.cancel()
    worker.restart()
    # Killed again while the refund (the first compensation) runs.
    cluster.wait_for_pause(handle.id, f"record-{pa.REFUND}")
    cluster.kill(worker)
    worker.restart()

    with pytest.raises(WorkflowCancelledError, match=handle.id):
        handle.get(timeout=60)
    assert handle.status == "CANCELLED"
    assert kinds(cluster, handle.id) == [
        ("activity", DELIVERED),
        ("timer", "CANCELLED"),
        ("activity", DELIVERED),
        ("activity", DELIVERED),
    ]
    assert handle.describe()["status_values"] == {"compensating": True}
    # The refund was killed while it ran, so it ran once more; everything else once.
    assert_side_effects(
        cluster,
        handle.id,
        [0, pa.REFUND, pa.RELEASE],
        exactly={0: 1, pa.REFUND: 2, pa.RELEASE: 1},
    )
    with pytest.raises(DurableError, match="already finished"):
        handle.cancel()


# -- child workflows ----------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [RABBITMQ_POSTGRES], indirect=True)
def test_a_child_workflow_survives_kills_and_runs_once(cluster: Cluster) -> None:
    worker = start_worker(cluster)
    handle = pa.parent.apply_async((5,), {"hold": 2, "pause_after_child": True}, app=cluster.client)
    [step] = wait_for_history(cluster, handle.id, waiting("child"), "the child's start")
    child_id = step.child_id
    assert child_id is not None

    cluster.wait_for_pause(child_id, "record-2")  # mid-child: its third activity runs
    cluster.kill(worker)
    worker.restart()
    cluster.wait_for_pause(handle.id, "after-child")  # the parent took the child's result
    cluster.kill(worker)
    worker.restart()

    child_result = sequential_result(5)
    assert handle.get(timeout=60) == {
        "child": child_result,
        "final": child_result + step_value(50),
    }
    first, last = handle.history
    assert (first.kind, first.child_id, first.result) == ("child", child_id, child_result)
    assert (last.name, last.args) == (RECORD, [50, child_result])
    children = [r for r in cluster.store.list_runs(limit=1000) if r.parent_id == handle.id]
    assert [(c.id, c.status) for c in children] == [(child_id, "SUCCESS")]
    assert_side_effects(cluster, child_id, range(5), exactly=once_except(5, twice=[2]))
    assert_side_effects(cluster, handle.id, [50], exactly={50: 1})


# -- continue-as-new ----------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [RABBITMQ_POSTGRES], indirect=True)
def test_continue_as_new_survives_kills_and_keeps_history_bounded(cluster: Cluster) -> None:
    worker = start_worker(cluster)
    handle = pa.countdown.apply_async((0, 8), {"hold": 3, "pause_at": 5}, app=cluster.client)
    cluster.wait_for_pause(handle.id, "record-3")  # incarnation 3's activity runs
    cluster.kill(worker)
    worker.restart()
    cluster.wait_for_pause(handle.id, "turn-after-5")  # incarnation 5, before it continues
    cluster.kill(worker)
    worker.restart()

    assert handle.get(timeout=60) == sequential_result(8)
    # Only the last incarnation's history is kept, under the same workflow id.
    [last] = handle.history
    assert (last.name, last.args, last.state) == (RECORD, [7, sequential_result(7)], DELIVERED)
    assert [r.id for r in cluster.store.list_runs(limit=1000)] == [handle.id]
    assert_side_effects(cluster, handle.id, range(8), exactly=once_except(8, twice=[3]))


# -- a bad deploy: STUCK, then fixed ------------------------------------------------------


@pytest.mark.parametrize("cluster", [REDIS_SQLITE], indirect=True)
def test_a_run_stuck_by_a_bad_deploy_resumes_when_fixed_code_starts(cluster: Cluster) -> None:
    worker = start_worker(cluster, variant="v1")
    handle = pa.deployed.apply_async(app=cluster.client)
    wait_for_history(cluster, handle.id, waiting("signal"), "the wait for 'go'")

    cluster.kill(worker)
    worker.env["DURABLE_IT_VARIANT"] = "broken"
    worker.restart()
    handle.signal("go", 10)
    with pytest.raises(NonDeterminismError, match=handle.id):
        handle.get(timeout=60)
    assert handle.status == "STUCK"

    cluster.kill(worker)
    worker.env["DURABLE_IT_VARIANT"] = "fixed"
    worker.restart()  # a starting worker retries STUCK runs by itself

    assert handle.get(timeout=60) == step_value(0) + 10 + step_value(1)
    assert [(s.kind, s.name) for s in handle.history] == [
        ("activity", RECORD),
        ("signal", "go"),
        ("activity", RECORD),
    ]
    assert handle.describe()["attempt"] == 2
    assert_side_effects(cluster, handle.id, [0, 1], exactly={0: 1, 1: 1})

    # A run started under the fixed code takes the new path, and records that it did.
    fresh = pa.deployed.apply_async(app=cluster.client)
    wait_for_history(cluster, fresh.id, waiting("signal"), "the wait for 'go'")
    fresh.signal("go", 10)
    assert fresh.get(timeout=60) == 0 + 10 + step_value(1)
    assert [s.kind for s in fresh.history] == ["patch", "activity", "signal", "activity"]
    assert_side_effects(cluster, fresh.id, [0, 1], exactly={0: 1, 1: 1})
