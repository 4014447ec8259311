"""One clock and one identity: workers whose clocks disagree, and workers that share a
node name, run every step once and fire no timer early.

Both run on PostgreSQL, whose clock is the one the store reads: an SQLite store is one
file on one host, read through that host's kernel clock, which the skew shim of one
process would fake. Assertions are exact side-effect counts and comparisons of times
the database recorded, never how long something took.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

import pytest
from sqlalchemy import select

from celery_durable.store._schema import workers as workers_table

from . import primitives_app as pa
from . import wfapp
from .checks import assert_side_effects, once_except
from .clockshift import skewed_env
from .cluster import Cluster
from .wfapp import EFFECTS_FILE, step_value

pytestmark = pytest.mark.integration

REDIS_POSTGRES = "redis-postgres-threads"


def executions(cluster: Cluster) -> dict[tuple[str, int], list[int]]:
    """The pid of every execution of each ``(run_id, index)`` activity, in order."""
    runs: dict[tuple[str, int], list[int]] = defaultdict(list)
    path = cluster.dir / EFFECTS_FILE
    for line in path.read_text().splitlines() if path.exists() else []:
        run_id, index, pid, _at = line.split("\t")
        runs[(run_id, int(index))].append(int(pid))
    return runs


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout} s")
        time.sleep(0.05)


@pytest.mark.parametrize("cluster", [REDIS_POSTGRES], indirect=True)
def test_a_worker_a_minute_behind_runs_no_step_twice_and_fires_no_timer_early(
    cluster: Cluster,
) -> None:
    # A short worker timeout: with each host's own clock, every claim of the worker a
    # minute behind looks 60 s old to the other one, expired after 10 s.
    timeout = {"DURABLE_IT_WORKER_TIMEOUT": "10"}
    include = [pa.__name__]
    right = cluster.worker("right", env=timeout, include=include)
    behind = cluster.worker("behind", env={**timeout, **skewed_env(-60)}, include=include)
    # A sweeper takes expired-looking claims only once it has reached the store for a
    # whole worker timeout; the runs start after that, so that it would.
    time.sleep(11)

    slow = [wfapp.slow_steps.apply_async((6, 0.5), app=cluster.client) for _ in range(8)]
    naps = [pa.nap.apply_async((3.0,), app=cluster.client) for _ in range(4)]

    for handle in slow:
        assert handle.get(timeout=120) == sum(step_value(i) for i in range(6))
    slept = [handle.get(timeout=120) for handle in naps]

    # Both workers ran steps, and none ran twice (nobody was killed).
    assert {pid for pids in executions(cluster).values() for pid in pids} == {
        right.pid,
        behind.pid,
    }
    for handle in slow:
        assert_side_effects(cluster, handle.id, range(6), exactly=once_except(6))
    for handle, result in zip(naps, slept, strict=True):
        assert_side_effects(cluster, handle.id, [0, 1], exactly=once_except(2))
        # The workflow's clock never shows a time before the sleep's deadline...
        assert result["after"] >= result["before"] + 3.0 - 1e-3
        # ...and by the database's clock the timer went off no sooner than 3 s after the
        # outcome that started the sleep was recorded.
        first, timer, _second = cluster.store.history(handle.id)
        assert timer.kind == "timer" and timer.completed_at is not None
        assert first.completed_at is not None and timer.due_at is not None
        assert timer.due_at - timer.dispatched_at == pytest.approx(3.0)
        assert timer.dispatched_at >= first.completed_at
        assert timer.completed_at >= timer.due_at


@pytest.mark.parametrize("cluster", [REDIS_POSTGRES], indirect=True)
def test_twin_workers_of_one_node_name_never_release_each_others_steps(
    cluster: Cluster,
) -> None:
    # Two replicas started with one -n (Celery only warns), then one crashes and its
    # supervisor restarts it under that name.
    node = f"twin-{cluster.queue}@localhost"
    first = cluster.worker("twin-a", nodename=node)
    twin = cluster.worker("twin-b", nodename=node)
    handles = [wfapp.slow_steps.apply_async((4, 1.0), app=cluster.client) for _ in range(6)]

    def both_running() -> bool:
        pids = {p for pids in executions(cluster).values() for p in pids}
        return {first.pid, twin.pid} <= pids

    wait_for(both_running, "steps running on both twins")
    killed = first.pid
    cluster.kill(first)
    first.restart()

    # Sooner than durable_worker_timeout (120 s): the restarted worker saw that its
    # predecessor's process is gone and released its claims at once.
    for handle in handles:
        assert handle.get(timeout=90) == sum(step_value(i) for i in range(4))

    runs = executions(cluster)
    assert len(runs) == 6 * 4
    for (run_id, index), pids in runs.items():
        # Only a step the killed process held may run again, once; the twin's never.
        assert len(pids) == 1 or (len(pids) == 2 and pids[0] == killed), (
            f"step {index} of run {run_id} ran in processes {pids} (killed: {killed}, "
            f"twin: {twin.pid})"
        )
    assert twin.pid in {pids[0] for pids in runs.values()}
    with cluster.store.engine.connect() as conn:
        rows = conn.execute(
            select(workers_table.c.pid, workers_table.c.stopped_at).where(
                workers_table.c.hostname == node
            )
        ).all()
    stopped = {pid: stopped_at is not None for pid, stopped_at in rows}
    assert stopped == {killed: True, twin.pid: False, first.pid: False}
