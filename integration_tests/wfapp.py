"""The Celery app the integration tests run in real ``celery worker`` processes.

Configured from environment variables (set by the tests' worker fixture):

| variable | meaning |
|---|---|
| ``DURABLE_IT_BROKER`` | broker URL |
| ``DURABLE_IT_STORE`` | ``durable_database_url`` |
| ``DURABLE_IT_QUEUE`` | the queue every message of the test goes to |
| ``DURABLE_IT_DIR`` | directory of the side-effect log and the pause/marker files |
| ``DURABLE_IT_ACKS_LATE`` | ``1``: ``task_acks_late`` |
| ``DURABLE_IT_REJECT_ON_WORKER_LOST`` | ``1``: ``task_reject_on_worker_lost`` |
| ``DURABLE_IT_PREFETCH`` | ``worker_prefetch_multiplier`` (default 4, Celery's) |
| ``DURABLE_IT_WORKER_TIMEOUT`` | ``durable_worker_timeout`` (default 120 s) |
| ``DURABLE_IT_REDELIVERY_BACKOFF`` | ``durable_redelivery_backoff`` (default 0.2 s) |

Durability tests need two things from the code that runs in the worker:

* **Side effects they can count.** Every execution of :func:`record` appends one line to
  ``effects.log`` (opened ``O_APPEND``, so concurrent writers never interleave a line).
* **Places where a worker can be killed at a known moment.** :func:`pause_once` blocks the
  first time a named point of a run is reached, after leaving a marker file the test waits
  for; once the test has killed that process, a replay or re-run passes straight through.
  Activities pause with ``hold=True``, workflow code between two awaits with
  ``pause_at=...``, a driver between its commit and its publish when the file
  ``pause-publish`` names a step number (see :func:`_pausing_publish_step`), and a
  driver right after a commit that cancelled child steps, before anything that follows
  it in memory, when the file ``pause-after-cancel`` names the run (see
  :func:`_pausing_publish`).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from celery import Celery, shared_task

import celery_durable.driver._driver as _driver
import celery_durable.worker._republish as _republish
from celery_durable import StepLostError, durable_workflow, workflow

#: How long a pause lasts at most, so that a test whose kill went wrong ends anyway.
PAUSE_LIMIT = 150.0

EFFECTS_FILE = "effects.log"
POISON_FILE = "poison"
PAUSE_PUBLISH_FILE = "pause-publish"
PAUSE_AFTER_CANCEL_FILE = "pause-after-cancel"


def configure(app: Celery, env: Mapping[str, str]) -> Celery:
    """Point ``app`` at the broker, store and queue named in ``env``."""
    queue = env.get("DURABLE_IT_QUEUE", "celery")
    app.conf.update(
        broker_url=env.get("DURABLE_IT_BROKER", "memory://"),
        durable_database_url=env.get("DURABLE_IT_STORE"),
        task_default_queue=queue,
        # Small enough that recovery happens within seconds. The worker timeout stays
        # long: a restarted worker (same node name) retires its killed predecessor at
        # once, and a live worker must never be mistaken for a dead one, or a step would
        # run twice without any kill and the exact side-effect counts would not hold.
        durable_sweep_interval=0.5,
        durable_stall_timeout=2.0,
        durable_worker_timeout=float(env.get("DURABLE_IT_WORKER_TIMEOUT", 120.0)),
        durable_redelivery_backoff=float(env.get("DURABLE_IT_REDELIVERY_BACKOFF", 0.2)),
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=True,
        worker_redirect_stdouts=False,
        task_acks_late=env.get("DURABLE_IT_ACKS_LATE") == "1",
        task_reject_on_worker_lost=env.get("DURABLE_IT_REJECT_ON_WORKER_LOST") == "1",
        worker_prefetch_multiplier=int(env.get("DURABLE_IT_PREFETCH", 4)),
        worker_enable_remote_control=False,
    )
    return app


#: The workers' app. In the pytest process (which imports this module for the workflow
#: and task objects) it is not made the current app, so unit tests never see it.
app = configure(Celery("wfapp", set_as_current="DURABLE_IT_DIR" in os.environ), os.environ)


def _dir() -> Path:
    return Path(os.environ["DURABLE_IT_DIR"])


def marker_path(directory: Path, run_id: str, point: str) -> Path:
    """The file :func:`pause_once` leaves when ``point`` of ``run_id`` is first reached."""
    # A child run's id is "<parent id>/<step>": keep the slash out of the file name.
    return directory / f"paused-{run_id.replace('/', '_')}-{point}"


def pause_once(run_id: str, point: str) -> None:
    """Block the first time ``point`` of ``run_id`` is reached, until killed.

    The marker holds the pid of the blocked process, so a test can kill just that one.
    Reaching the point again (a replay, a re-run after the kill) passes once that process
    is dead; while it lives, a concurrent duplicate (a driver turn the sweeper started
    for the same run) waits too, so the kill finds the run exactly where it paused.
    """
    marker = marker_path(_dir(), run_id, point)
    deadline = time.monotonic() + PAUSE_LIMIT
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        while time.monotonic() < deadline and _paused_process_alive(marker):
            time.sleep(0.05)
        return
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    while time.monotonic() < deadline:
        time.sleep(0.05)


def _paused_process_alive(marker: Path) -> bool:
    pid = marker.read_text()
    if not pid:
        return True  # just created; the pid is being written
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"  # a zombie is dead too


def _append_effect(line: str) -> None:
    # Each line ends with the wall-clock time of the execution, so that a test can tell
    # which fault came between two executions of one step.
    line = f"{line.rstrip(chr(10))}\t{time.time():.6f}\n"
    fd = os.open(_dir() / EFFECTS_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


# -- activities ---------------------------------------------------------------------------


class PaymentDeclinedError(Exception):
    """Raised by :func:`decline`: an activity failure whose type must reach the caller."""


def step_value(i: int) -> int:
    """What ``record(i)`` returns (with no carry)."""
    return 3 * i + 1


@shared_task(bind=True)
def record(self: Any, i: int, carry: int = 0, hold: bool = False) -> int:
    """Log one side effect for step ``i`` of the current run and return ``carry + 3i + 1``."""
    run_id = self.request.get("durable_run") or "no-run"
    _append_effect(f"{run_id}\t{i}\t{os.getpid()}\n")
    if hold:
        pause_once(run_id, f"record-{i}")
    return carry + step_value(i)


@shared_task(bind=True)
def slow_record(self: Any, i: int, seconds: float) -> int:
    """Log one side effect for step ``i``, then take ``seconds`` (a long step)."""
    run_id = self.request.get("durable_run") or "no-run"
    _append_effect(f"{run_id}\t{i}\t{os.getpid()}\n")
    time.sleep(seconds)
    return step_value(i)


@shared_task(bind=True)
def crash(self: Any, i: int) -> int:
    """Log one side effect for step ``i``, then kill the process running it (a poison
    step: a segfault, ``os._exit``, the OOM killer) while the file ``poison`` exists."""
    run_id = self.request.get("durable_run") or "no-run"
    _append_effect(f"{run_id}\t{i}\t{os.getpid()}\n")
    if (_dir() / POISON_FILE).exists():
        os._exit(137)
    return step_value(i)


@shared_task
def decline(order_id: str) -> None:
    """Always fails with :class:`PaymentDeclinedError`."""
    raise PaymentDeclinedError(f"card declined for {order_id}")


# -- workflows ----------------------------------------------------------------------------


@durable_workflow
async def sequential(n: int, hold: list[int] | None = None, pause_at: int = -1) -> int:
    """``n`` activities one after another, each adding to the previous result.

    ``hold``: indexes whose activity blocks (once). ``pause_at``: the workflow code
    blocks (once) right after the result of that index arrived, mid-turn.
    """
    held = set(hold or ())
    total = 0
    for i in range(n):
        total = await record.s(i, total, hold=(i in held))
        if i == pause_at:
            pause_once(workflow.info().workflow_id, f"turn-after-{i}")
    return total


@durable_workflow
async def fan_out(
    n: int,
    hold: list[int] | None = None,
    pause_after_gather: bool = False,
    activity_queue: str | None = None,
) -> int:
    """``n`` activities at once (``asyncio.gather``), then one more with their sum.

    ``hold``: indexes whose activity blocks (once); ``n`` is the final one.
    ``pause_after_gather``: the workflow code blocks (once) between the gather and the
    final await, mid-turn. ``activity_queue``: route the activities there instead of the
    default queue.
    """
    held = set(hold or ())
    options: dict[str, Any] = {"queue": activity_queue} if activity_queue else {}
    values = await asyncio.gather(*(record.s(i, hold=(i in held)).set(**options) for i in range(n)))
    if pause_after_gather:
        pause_once(workflow.info().workflow_id, "turn-after-gather")
    return await record.s(n, sum(values), hold=(n in held)).set(**options)


@durable_workflow
async def slow_steps(n: int, seconds: float) -> int:
    """``n`` activities one after another, each taking ``seconds``."""
    total = 0
    for i in range(n):
        total += await slow_record.s(i, seconds)
    return total


@durable_workflow
async def slow_fan_out(n: int, seconds: float) -> int:
    """``n`` activities at once, each taking ``seconds``; returns the sum of their values."""
    values = await asyncio.gather(*(slow_record.s(i, seconds) for i in range(n)))
    return sum(values)


@durable_workflow
async def poisoned(catch: bool) -> str:
    """One good step, then a step that kills its process (see :func:`crash`), then one
    more. ``catch``: handle the :class:`StepLostError` and carry on."""
    await record.s(0)
    try:
        await crash.s(1)
    except StepLostError as exc:
        if not catch:
            raise
        await record.s(2)
        return f"caught: {exc}"
    await record.s(2)
    return "no crash"


@durable_workflow
async def awaits_plain_object(order_id: str) -> None:
    """Awaits a real step, then something that is not a signature (a plain dict)."""
    await record.s(0)
    not_a_signature: Any = {"task": "record", "args": [1]}
    await not_a_signature


@durable_workflow
async def declined_checkout(order_id: str) -> str:
    """One good step, then an activity that raises."""
    await record.s(0)
    await decline.s(order_id)
    return "unreachable"


@durable_workflow
async def family(depth: int, width: int = 2, hold: bool = False) -> str:
    """``record(0)``, then wait for signal ``go`` alongside ``width`` child runs of
    ``family(depth - 1)`` (none at depth 0); when cancelled, ``record(1)`` (its
    compensation) and end cancelled. ``hold``: the first leaf below (this run itself at
    depth 0) blocks in its ``record(0)``, once.
    """
    await record.s(0, hold=hold and depth == 0)
    children = [family.s(depth - 1, width, hold and i == 0) for i in range(width)] if depth else []
    try:
        await asyncio.gather(workflow.wait_for_signal("go"), *children)
    except asyncio.CancelledError:
        await record.s(1)
        raise
    return "not cancelled"


# -- pausing a driver between its commit and its publish ----------------------------------

_publish_step = getattr(_driver, "publish_step", None)


def _pausing_publish_step(app: Celery, name: str, args: Any, *rest: Any, **kw: Any) -> None:
    """``publish_step``, pausing (once per run) before publishing the step whose number
    is in the file ``pause-publish``: the driver's turn has committed, and the messages of
    that step and every later one are not sent. The sweeper's re-sends pass here too and
    wait while the paused driver lives, so no message of those steps leaves before the
    test's kill."""
    flag = _dir() / PAUSE_PUBLISH_FILE
    if flag.exists():
        headers: dict[str, Any] = kw["headers"] if "headers" in kw else rest[3]
        if str(headers.get("durable_seq")) == flag.read_text().strip():
            pause_once(str(headers["durable_run"]), "publish")
    assert _publish_step is not None
    _publish_step(app, name, args, *rest, **kw)


_publish = _driver.RunDriver._publish


def _pausing_publish(self: _driver.RunDriver, run: Any, plan: Any, committed: Any) -> None:
    """``RunDriver._publish``, pausing (once per run) when the committed turn cancelled
    child steps of a run named in the file ``pause-after-cancel``: the parent's decision
    is committed, and nothing that follows it in memory (child wakes, step messages,
    revokes) has happened yet."""
    flag = _dir() / PAUSE_AFTER_CANCEL_FILE
    cancelled_children = any(c.kind == "child" for c in committed.cancelled)
    if cancelled_children and flag.exists() and self.run_id in flag.read_text().split():
        pause_once(self.run_id, "after-cancel")
    _publish(self, run, plan, committed)


if "DURABLE_IT_DIR" in os.environ:  # a test's worker, not the pytest process importing this
    if not callable(_publish_step):  # pragma: no cover - guards a refactor of the driver
        raise RuntimeError(
            "celery_durable.driver no longer publishes through publish_step; update "
            "integration_tests/wfapp.py so the commit-then-publish kill test still pauses there"
        )
    _driver.publish_step = _pausing_publish_step  # type: ignore[attr-defined]
    _driver.RunDriver._publish = _pausing_publish  # type: ignore[method-assign]
    if getattr(_republish, "publish_step", None) is _publish_step:
        _republish.publish_step = _pausing_publish_step  # type: ignore[attr-defined]
