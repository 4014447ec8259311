"""SIGKILL right after a parent's cancelling or terminating commit, before anything that
follows it in memory: its children (and theirs) must still end, each side effect once.

The family is ``wfapp.family(2)``: a root, two children, four grandchildren, each having
run ``record(0)`` and waiting for a signal; a cancelled member compensates with
``record(1)``. The parent's commit itself must carry its children's cancellation or
termination: after the kill nothing in any process remembers it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from sqlalchemy import select

from celery_durable.errors import WorkflowCancelledError, WorkflowTerminatedError
from celery_durable.store import CANCELLED, DELIVERED, SCHEDULED, STEP_CANCELLED, TERMINATED
from celery_durable.store._schema import workers as workers_table

from . import wfapp
from .checks import assert_side_effects
from .cluster import PREFORK, Cluster
from .worker_process import REPO_ROOT

pytestmark = pytest.mark.integration

#: Runs of ``wfapp.family(2)``: 1 + 2 + 4.
FAMILY = 7


def family_of(cluster: Cluster, root: str) -> list[str]:
    """The ids of the root and every descendant, parents before children."""
    return sorted(
        (r.id for r in cluster.store.list_runs(limit=1000) if r.id.startswith(root)),
        key=lambda run_id: (run_id.count("/"), run_id),
    )


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen in {timeout} s")
        time.sleep(0.05)


def waiting_for_go(cluster: Cluster, run_id: str) -> bool:
    """The member ran ``record(0)`` and waits for its signal."""
    states = {(s.kind, s.state) for s in cluster.store.history(run_id)}
    return ("activity", DELIVERED) in states and ("signal", SCHEDULED) in states


def assert_nothing_open(cluster: Cluster, members: list[str], status: str) -> None:
    """Every member ended ``status`` and none has a step anybody would still run."""
    for run_id in members:
        assert cluster.store.require_run(run_id).status == status, run_id
        open_steps = [
            (s.seq, s.kind, s.state)
            for s in cluster.store.history(run_id)
            if s.state not in (DELIVERED, STEP_CANCELLED)
        ]
        assert not open_steps, f"{run_id} has open steps {open_steps}"
    others = [(r.id, r.status) for r in cluster.store.list_runs(limit=1000) if r.status != status]
    assert not others, f"runs that did not end {status}: {others}"


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_children_are_cancelled_though_the_worker_died_right_after_the_parents_commit(
    cluster: Cluster,
) -> None:
    worker = cluster.worker()
    root = wfapp.family.apply_async((2,), app=cluster.client)
    wait_for(lambda: len(family_of(cluster, root.id)) == FAMILY, "the family's start")
    members = family_of(cluster, root.id)
    wait_for(lambda: all(waiting_for_go(cluster, m) for m in members), "every member to wait")
    children = [m for m in members if m.count("/") == 1]
    cluster.pause_after_cancelling(root.id)

    root.cancel()
    cluster.wait_for_pause(root.id, "after-cancel")
    # The root's cancelling turn committed and its driver published nothing after it: its
    # children were asked to cancel by that commit itself, and no turn of theirs ran yet.
    for child in children:
        run = cluster.store.require_run(child)
        assert (run.status, run.cancel_requested, run.cancel_turn) == ("RUNNING", True, None)
    cluster.kill(worker)
    worker.restart()

    with pytest.raises(WorkflowCancelledError, match=root.id):
        root.get(timeout=120)
    for member in members:
        with pytest.raises(WorkflowCancelledError, match=member):
            cluster.handle(member).get(timeout=120)
    assert_nothing_open(cluster, members, CANCELLED)
    # Nothing was running at the kill: each member charged once and compensated once.
    for member in members:
        assert_side_effects(cluster, member, [0, 1], exactly={0: 1, 1: 1})


def start_terminator(cluster: Cluster, run_id: str, reason: str) -> subprocess.Popen[bytes]:
    """``integration_tests.terminator`` in a process of its own (see its docstring)."""
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(REPO_ROOT)}
    with (cluster.log_dir / "terminator.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "integration_tests.terminator", run_id, reason],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def sweeps_after(cluster: Cluster, since: float) -> bool:
    """A worker's sweeper has run more than three stall periods after ``since``, long
    enough to have re-sent or woken anything it would."""
    horizon = since + 3 * cluster.client.conf.durable_stall_timeout
    with cluster.store.engine.connect() as conn:
        seen = conn.execute(select(workers_table.c.last_seen)).scalars().all()
    return any(t > horizon for t in seen)


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_descendants_are_terminated_in_the_commit_though_client_and_worker_die_after_it(
    cluster: Cluster,
) -> None:
    worker = cluster.worker()
    # The first grandchild blocks inside its record(0): a step running at the kill.
    root = wfapp.family.apply_async((2,), {"hold": True}, app=cluster.client)
    wait_for(lambda: len(family_of(cluster, root.id)) == FAMILY, "the family's start")
    members = family_of(cluster, root.id)
    held = f"{root.id}/3/3"
    assert held in members
    cluster.wait_for_pause(held, "record-0")
    others = [m for m in members if m != held]
    wait_for(lambda: all(waiting_for_go(cluster, m) for m in others), "every member to wait")

    client = start_terminator(cluster, root.id, "abandoned")
    try:
        cluster.wait_for_pause(root.id, "after-terminate")
        # Committed, and nothing after the commit happened in the client.
        for member in members:
            assert cluster.store.require_run(member).status == TERMINATED, member
    finally:
        client.send_signal(signal.SIGKILL)
        client.wait(timeout=30)
    cluster.kill(worker)
    restarted = time.time()
    worker.restart()
    wait_for(lambda: sweeps_after(cluster, restarted), "three stall periods of sweeping")

    with pytest.raises(WorkflowTerminatedError, match="abandoned"):
        root.get(timeout=10)
    with pytest.raises(WorkflowTerminatedError, match=f"with workflow .*{root.id}"):
        cluster.handle(held).get(timeout=10)
    assert_nothing_open(cluster, members, TERMINATED)
    # The held step ran once, when it was killed; its claim was not released to run it
    # again, nor did any other step run, nor any code after the termination.
    for member in members:
        assert_side_effects(cluster, member, [0], exactly={0: 1})
