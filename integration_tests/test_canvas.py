"""Celery canvases made durable, on real prefork workers on Redis and on RabbitMQ.

Each shape runs with ``durable(canvas)``: its result must be the one Celery gives (checked
against plain Celery with a Redis result backend on the same worker, and against the
value computed by hand), and every task must run exactly once. Then the shapes from
Celery's chord issues run again with the worker SIGKILLed at the worst moments (while
header tasks run, while a body runs, between committing a body and publishing it): the
result stays the same, and no body or callback is lost or run more than once per kill
that hit it while it ran.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from celery_durable.canvas import durable

from . import canvas_tasks as ct
from .checks import assert_side_effects
from .cluster import PREFORK, Cluster
from .services import REDIS_URL
from .worker_process import REPO_ROOT, WorkerProcess

pytestmark = pytest.mark.integration

#: Plain Celery's result backend for the comparison (a Redis database of its own).
RESULT_URL = os.environ.get("DURABLE_IT_RESULT_URL", REDIS_URL.rsplit("/", 1)[0] + "/12")


class CanvasWorker(WorkerProcess):
    """A worker of the test app that also imports the canvas tasks (and, for the
    comparison with plain Celery, has a result backend)."""

    result_backend: str | None = None

    def command(self) -> list[str]:
        command = super().command()
        at = command.index("worker")
        if self.result_backend:
            command[at:at] = ["--result-backend", self.result_backend]  # a global option
        return [*command, "--include", ct.__name__]


def canvas_worker(
    cluster: Cluster, name: str = "w1", concurrency: int = 3, result_backend: str | None = None
) -> CanvasWorker:
    """Like ``cluster.worker()``, with the canvas tasks."""
    worker = CanvasWorker(
        f"{name}-{cluster.queue}@localhost",
        cluster.env,
        cluster.log_dir,
        pool=cluster.setup.pool,
        concurrency=concurrency,
        queues=[cluster.queue],
    )
    worker.result_backend = result_backend
    cluster.workers.append(worker)
    worker.start()
    return worker


def start(cluster: Cluster, shape: ct.Shape, workflow_id: str) -> str:
    handle = durable(shape.signature).apply_async(workflow_id=workflow_id, app=cluster.client)
    return handle.id


def celery_results(cluster: Cluster) -> dict[str, object]:
    """Plain Celery's result for every basic shape, on the cluster's workers.

    Run in a process of its own: a Redis result backend's connections outlive the app
    that opened them, which this process would report as unclosed sockets.
    """
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", ct.__name__, RESULT_URL],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    results: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return results


def every_task_once(cluster: Cluster, run_id: str, shape: ct.Shape) -> None:
    assert cluster.kills == 0
    assert_side_effects(cluster, run_id, shape.indexes, exactly={i: 1 for i in shape.indexes})


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_every_shape_gives_celerys_result_and_runs_each_task_once(cluster: Cluster) -> None:
    on_redis = cluster.setup.broker == "redis"
    canvas_worker(cluster, result_backend=RESULT_URL if on_redis else None)
    shapes = {name: make() for name, make in ct.basic_shapes().items()}
    runs = {
        name: start(cluster, shape, f"shape-{n}") for n, (name, shape) in enumerate(shapes.items())
    }
    for name, shape in shapes.items():
        assert cluster.handle(runs[name]).get(timeout=120) == shape.expected, name
        every_task_once(cluster, runs[name], shape)
    # Each run is one workflow run holding every task of its canvas as a step.
    history = cluster.handle(runs["chain of 10 chords"]).history
    assert len(history) == len(shapes["chain of 10 chords"].indexes)
    assert {step.state for step in history} == {"DELIVERED"}
    if on_redis:  # the values above are Celery's own
        assert celery_results(cluster) == {name: s.expected for name, s in shapes.items()}


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_chord_of_1000_survives_a_kill_while_its_header_runs(cluster: Cluster) -> None:
    held = {100, 500, 900}  # one per worker slot: the kill finds every slot mid-task
    worker = canvas_worker(cluster, concurrency=len(held))
    shape = ct.chord_of(1000, hold=held)
    run_id = start(cluster, shape, "chord-1000")
    for i in held:
        cluster.wait_for_pause(run_id, f"canvas-{i}")

    cluster.kill(worker)
    worker.restart()

    assert cluster.handle(run_id).get(timeout=120) == shape.expected
    # Only the held tasks were between their side effect and their recorded outcome;
    # the body ran once, after the whole header was recorded.
    exactly = {i: 2 if i in held else 1 for i in shape.indexes}
    assert_side_effects(cluster, run_id, shape.indexes, exactly=exactly)


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_chain_of_10_chords_survives_a_kill_while_a_body_runs(cluster: Cluster) -> None:
    worker = canvas_worker(cluster)
    shape = ct.chain_of_chords(10, 10, hold_body=4)
    body = ct.body_index_of_chord(4, 10)
    run_id = start(cluster, shape, "chain-of-chords")
    cluster.wait_for_pause(run_id, f"canvas-{body}")

    cluster.kill(worker)
    worker.restart()

    assert cluster.handle(run_id).get(timeout=120) == shape.expected
    exactly = {i: 2 if i == body else 1 for i in shape.indexes}
    assert_side_effects(cluster, run_id, shape.indexes, exactly=exactly)


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_nested_chord_survives_the_kill_of_the_child_running_its_body(cluster: Cluster) -> None:
    worker = canvas_worker(cluster)
    shape = ct.nested_chord_in_chain_in_group(3, 4, hold_body=1, link_body=2)
    body = 1 * 6 + 5  # branch 1: first, 4 header tasks, then its body
    run_id = start(cluster, shape, "nested")
    pid = cluster.wait_for_pause(run_id, f"canvas-{body}")
    assert pid in worker.child_pids()

    cluster.kill_pid(pid)

    assert cluster.handle(run_id).get(timeout=120) == shape.expected
    # The link callback of branch 2's body ran once, as a step of the run.
    exactly = {i: 2 if i == body else 1 for i in shape.indexes}
    assert_side_effects(cluster, run_id, shape.indexes, exactly=exactly)


@pytest.mark.parametrize("cluster", PREFORK, indirect=True)
def test_chord_body_committed_but_not_sent_when_the_worker_dies_still_runs_once(
    cluster: Cluster,
) -> None:
    # celery#2911: a worker dying at the moment a chord's body is due used to lose it.
    shape = ct.chord_of(20)
    cluster.pause_publish_at(21)  # the body: the step after the 20 header tasks
    worker = canvas_worker(cluster)
    run_id = start(cluster, shape, "chord-body-unsent")
    cluster.wait_for_pause(run_id, "publish")
    assert [s.name for s in cluster.handle(run_id).history][-1] == ct.combine.name

    cluster.kill(worker)
    worker.restart()

    assert cluster.handle(run_id).get(timeout=120) == shape.expected
    assert_side_effects(cluster, run_id, shape.indexes, exactly={i: 1 for i in shape.indexes})
