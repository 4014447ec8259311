"""Runs started by processes that know a workflow only by its task name.

A client with neither the workflow module nor celery_durable imported sends the driver
task with ``app.send_task``, and a real ``celery beat`` process schedules it; real
``celery worker`` processes on Redis start each run from its message (the task id is the
workflow id) and complete it, every step exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from celery_durable import WorkflowArgumentsError, WorkflowHandle

from . import beat_app, wfapp
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
from .cluster import Cluster
from .worker_process import REPO_ROOT, WorkerProcess

pytestmark = pytest.mark.integration

TIMEOUT = 90.0


def _env(cluster: Cluster) -> dict[str, str]:
    env = {**os.environ, **cluster.env, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    return env


def _wait_until(predicate: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout} s")
        time.sleep(0.05)


def _started_run(cluster: Cluster, run_id: str) -> WorkflowHandle[Any]:
    """The run a message sent by name made, once a worker has taken the message."""
    _wait_until(
        lambda: cluster.store.get_run(run_id) is not None,
        f"no worker created the run {run_id} from its start message",
    )
    return cluster.handle(run_id)


def _log_count(worker: WorkerProcess, needle: str) -> int:
    return sum(log.read_text(errors="replace").count(needle) for log in worker.logs)


def _send_by_name(cluster: Cluster, sends: list[dict[str, Any]]) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "integration_tests.name_client", json.dumps(sends)],
        cwd=REPO_ROOT,
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, f"the client failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.split() == [s["task_id"] for s in sends]


@pytest.mark.parametrize("cluster", ["redis-sqlite-prefork"], indirect=True)
def test_a_client_without_the_workflow_code_starts_runs_by_name(cluster: Cluster) -> None:
    worker = cluster.worker()
    by_args, by_kwargs, bad = (f"{kind}-{uuid.uuid4().hex[:8]}" for kind in "akb")
    sequential, fan_out = wfapp.sequential.name, wfapp.fan_out.name
    _send_by_name(
        cluster,
        [
            {"name": sequential, "args": [4], "task_id": by_args},
            # The same message again, as a broker redelivers one a dead worker held.
            {"name": sequential, "args": [4], "task_id": by_args},
            {"name": fan_out, "kwargs": {"n": 3}, "task_id": by_kwargs},
            {"name": sequential, "args": [4], "kwargs": {"holds": [1]}, "task_id": bad},
        ],
    )

    assert _started_run(cluster, by_args).get(timeout=TIMEOUT) == sequential_result(4)
    assert _started_run(cluster, by_kwargs).get(timeout=TIMEOUT) == fan_out_result(3)
    # Both copies of the first start ran (Celery logs each task id that succeeded).
    copies = f"{sequential}[{by_args}] succeeded"
    _wait_until(lambda: _log_count(worker, copies) >= 2, "the second copy of the start did not run")
    assert _log_count(worker, copies) == 2

    records = assert_delivered_once(cluster, by_args, sequential_steps(4))
    assert_sequential_turns(cluster, records, by_args)
    assert_side_effects(cluster, by_args, range(4), exactly=once_except(4))
    records = assert_delivered_once(cluster, by_kwargs, fan_out_steps(3))
    assert_fan_out_turns(cluster, records, by_kwargs)
    assert_side_effects(cluster, by_kwargs, range(4), exactly=once_except(4))
    runs = cluster.store.list_runs(limit=100)
    assert sorted(r.id for r in runs) == sorted([by_args, by_kwargs, bad])

    # Arguments that do not fit: the run exists and failed, saying what to pass.
    failed = _started_run(cluster, bad)
    with pytest.raises(WorkflowArgumentsError, match="unexpected keyword argument 'holds'"):
        failed.get(timeout=TIMEOUT)
    assert failed.status == "FAILURE" and failed.history == []
    shown = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "integration_tests.wfapp", "durable", "show", bad],
        cwd=REPO_ROOT,
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert "status:   FAILURE" in shown.stdout
    assert 'kwargs={"holds": [1]}' in shown.stdout
    assert "WorkflowArgumentsError" in shown.stdout
    assert "sequential(n, hold=None, pause_at=-1)" in shown.stdout
    assert_side_effects(cluster, bad, [])


@pytest.mark.parametrize("cluster", ["redis-postgres-threads"], indirect=True)
def test_celery_beat_without_the_workflow_code_starts_one_run_per_tick(
    cluster: Cluster, tmp_path: Path
) -> None:
    assert wfapp.sequential.name == beat_app.WORKFLOW
    cluster.worker()
    log = cluster.log_dir / "beat.log"
    command = [sys.executable, "-m", "celery", "-A", "integration_tests.beat_app", "beat"]
    command += ["--schedule", str(tmp_path / "beat-schedule"), "--loglevel", "DEBUG"]
    sent = re.compile(rf"{re.escape(beat_app.WORKFLOW)} sent\. id->(\S+)")
    with log.open("wb") as out:
        beat = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=_env(cluster),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_until(
            lambda: len(sent.findall(log.read_text(errors="replace"))) >= 3,
            f"beat did not send three ticks (see {log})",
        )
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(beat.pid, signal.SIGKILL)
        beat.wait(timeout=30)

    text = log.read_text(errors="replace")
    assert f"{beat_app.CODE_LINE}False" in text  # beat sent by name only
    ticks = sent.findall(text)
    assert len(set(ticks)) == len(ticks) >= 3
    for run_id in ticks:
        handle = _started_run(cluster, run_id)
        assert handle.get(timeout=TIMEOUT) == sequential_result(2)
        assert cluster.store.require_run(run_id).workflow == wfapp.sequential.name
        assert_delivered_once(cluster, run_id, sequential_steps(2))
        assert_side_effects(cluster, run_id, range(2), exactly=once_except(2))

    # Every run is a tick's. Beat logs a tick's id after sending it, so the SIGKILL may
    # have left one tick sent but not logged: it may have made one run more, no other.
    began = text.count(f"Sending due task {beat_app.ENTRY} ({beat_app.WORKFLOW})")
    runs = {r.id for r in cluster.store.list_runs(workflow=wfapp.sequential.name, limit=100)}
    assert set(ticks) <= runs
    assert len(runs) <= began <= len(ticks) + 1
    for run_id in runs - set(ticks):
        assert cluster.handle(run_id).get(timeout=TIMEOUT) == sequential_result(2)
        assert_side_effects(cluster, run_id, range(2), exactly=once_except(2))
