"""Local turns: a run's next turn driven by the process that keeps it suspended, handed
over by a datagram. What arrives on the socket is only a hint: nothing in it is trusted."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, shared_task

from celery_durable import _config, durable_workflow
from celery_durable.driver import LocalTurns, cache
from celery_durable.driver._handover import address as _address
from celery_durable.driver._handover import hand_over
from celery_durable.errors import StoreUnavailableError
from celery_durable.testing import configure_embedded
from celery_durable.worker import OutcomeHint

JSON = "application/json"


@shared_task
def local_echo(value: Any) -> Any:
    return value


@durable_workflow
async def two_steps(x: int) -> int:
    first = await local_echo.s(x)
    second = await local_echo.s(first + 1)
    return int(second)


@pytest.fixture
def idle_app(tmp_path: Any) -> Iterator[Celery]:
    """An app whose messages nobody consumes: turns run only where the test asks."""
    app = Celery("durable-local", broker="memory://", set_as_current=False)
    configure_embedded(app, f"sqlite:///{tmp_path}/local.sqlite3")
    app.conf.task_default_queue = f"durable-local-{uuid.uuid4().hex[:8]}"
    yield app
    cache.clear()
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


def finish_open_step(app: Celery, run_id: str) -> None:
    store = _config.store_for(app)
    [step] = [s for s in store.history(run_id) if s.state == "SCHEDULED"]
    [args, _kwargs, _options] = json.loads(step.input or b"[]")
    store.record_outcome(run_id, step.seq, result=(JSON, json.dumps(args[0]).encode()))


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_handed_over_run_is_driven_by_its_holder_and_junk_is_ignored(idle_app: Celery) -> None:
    local = LocalTurns()
    holder = local.holder_id(idle_app)
    assert holder is not None
    store = _config.store_for(idle_app)
    try:
        two_steps.apply_async((1,), workflow_id="local-1", app=idle_app)
        # The first turn, driven here as its holder, names this process on the run.
        local.drive_here(idle_app, two_steps.name, two_steps.fn, "local-1")
        assert store.require_run("local-1").turn == 1
        finish_open_step(idle_app, "local-1")

        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            for junk in (b"\xff\xfe\x00", b"no-newline", b"not.a.workflow\nlocal-1", b"\n"):
                sender.sendto(junk, _address(holder))
            # A real hand-over: from another process it is just this datagram.
            sender.sendto(f"{two_steps.name}\nlocal-1".encode(), _address(holder))
        wait_for(lambda: store.require_run("local-1").turn == 2)

        finish_open_step(idle_app, "local-1")
        assert local(idle_app, two_steps.name, "local-1", {}, holder)  # as a recorder here
        wait_for(lambda: store.require_run("local-1").status == "SUCCESS")
        assert store.require_run("local-1").turn == 3
    finally:
        local.drain(5.0)


def test_a_holder_that_is_gone_is_not_waited_for(idle_app: Celery) -> None:
    gone = LocalTurns()
    gone_id = gone.holder_id(idle_app)
    gone.drain(1.0)  # its socket is closed, as if its process had died
    here = LocalTurns()
    store = _config.store_for(idle_app)
    try:
        two_steps.apply_async((5,), workflow_id="local-2", app=idle_app)
        here.drive_here(idle_app, two_steps.name, two_steps.fn, "local-2")
        finish_open_step(idle_app, "local-2")
        # The hand-over fails at once; this process drives the run itself.
        assert here(idle_app, two_steps.name, "local-2", {}, gone_id)
        wait_for(lambda: store.require_run("local-2").turn == 2)
    finally:
        here.drain(5.0)


def test_a_run_of_a_queue_this_worker_does_not_consume_is_left_to_the_broker(
    idle_app: Celery,
) -> None:
    local = LocalTurns()
    try:
        assert local.holder_id(idle_app) is not None
        taken = local(idle_app, two_steps.name, "local-3", {"queue": "elsewhere"}, None)
        assert not taken
    finally:
        local.drain(1.0)


def test_a_drained_process_closes_its_socket_and_listens_anew_when_asked(idle_app: Celery) -> None:
    local = LocalTurns()
    first = local.holder_id(idle_app)
    local.drain(5.0)
    # A stopped worker no longer takes hand-overs; one started again gets a new id.
    second = local.holder_id(idle_app)
    try:
        assert first is not None and second is not None and second != first
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            with pytest.raises(OSError):
                sender.sendto(b"x\ny", _address(first))
            sender.sendto(b"x\ny", _address(second))
    finally:
        local.drain(5.0)


# -- hints: the outcome that woke the run, handed over with it ------------------------------


def record_open_step(app: Celery, run_id: str, value: Any = None) -> tuple[OutcomeHint, Any]:
    """Record the open step's outcome (its input, or ``value``) as its worker would; the
    hint its recorder hands over, and the value recorded."""
    store = _config.store_for(app)
    [step] = [s for s in store.history(run_id) if s.state == "SCHEDULED"]
    [args, _kwargs, _options] = json.loads(step.input or b"[]")
    value = args[0] if value is None else value
    result = (JSON, json.dumps(value).encode())
    recorded = store.record_outcome(run_id, step.seq, result=result)
    assert recorded.woken and recorded.events is not None
    return OutcomeHint(step.seq, step.name, recorded.events, result=result), value


def reads_of(app: Celery, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    store = _config.store_for(app)
    reads: list[str] = []
    begin = store.begin_turn

    def counted(run_id: str) -> Any:
        reads.append(run_id)
        return begin(run_id)

    monkeypatch.setattr(store, "begin_turn", counted)
    return reads


def second_input(app: Celery, run_id: str) -> Any:
    [_first, second] = _config.store_for(app).history(run_id)
    return json.loads(second.input)[0][0]


@contextlib.contextmanager
def held(app: Celery, run_id: str) -> Iterator[tuple[LocalTurns, str]]:
    """A run of ``two_steps`` whose first turn was driven (and is held) by a fresh
    :class:`LocalTurns`: that and its holder id; drained after."""
    local = LocalTurns()
    holder = local.holder_id(app)
    assert holder is not None
    try:
        two_steps.apply_async((1,), workflow_id=run_id, app=app)
        local.drive_here(app, two_steps.name, two_steps.fn, run_id)
        yield local, holder
    finally:
        local.drain(5.0)


def test_a_hinted_turn_runs_from_the_holders_last_commit_without_a_read(
    idle_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _config.store_for(idle_app)
    with held(idle_app, "hint-1") as (local, holder):
        reads = reads_of(idle_app, monkeypatch)

        hint, _ = record_open_step(idle_app, "hint-1")
        assert local(idle_app, two_steps.name, "hint-1", {}, holder, hint)
        wait_for(lambda: store.require_run("hint-1").turn == 2)
        assert reads == [] and second_input(idle_app, "hint-1") == 2
        run = store.require_run("hint-1")
        assert run.events == run.taken

        # By datagram, as from another process of this user.
        hint, _ = record_open_step(idle_app, "hint-1")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.sendto(hand_over(two_steps.name, "hint-1", hint), _address(holder))
        wait_for(lambda: store.require_run("hint-1").status == "SUCCESS")
        assert reads == [] and store.require_run("hint-1").result == b"2"


def test_a_hint_that_is_not_the_only_news_is_set_aside_for_a_read(
    idle_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _config.store_for(idle_app)
    with held(idle_app, "hint-2") as (local, holder):
        reads = reads_of(idle_app, monkeypatch)
        hint, _ = record_open_step(idle_app, "hint-2")
        # Another event (a signal nobody waits for) came before the hint's.
        store.send_signal("hint-2", "nudge", JSON, b"1")
        late = hint._replace(events=hint.events + 1)
        assert local(idle_app, two_steps.name, "hint-2", {}, holder, late)
        wait_for(lambda: store.require_run("hint-2").turn == 2)
        assert reads == ["hint-2"] and second_input(idle_app, "hint-2") == 2


@pytest.mark.skipif(os.geteuid() != 0, reason="sending as another user needs root")
def test_a_hint_from_another_user_is_not_believed(idle_app: Celery) -> None:
    store = _config.store_for(idle_app)
    with held(idle_app, "hint-3") as (_local, holder):
        hint, _ = record_open_step(idle_app, "hint-3")
        forged = hint._replace(result=(JSON, b"666"))
        child = os.fork()
        if child == 0:  # pragma: no cover - the forked child
            code = 1
            try:
                os.setuid(65534)
                with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
                    sender.sendto(hand_over(two_steps.name, "hint-3", forged), _address(holder))
                code = 0
            finally:
                os._exit(code)
        _pid, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        # Taken as a plain hand-over: the turn reads the outcome from the store.
        wait_for(lambda: store.require_run("hint-3").turn == 2)
        assert second_input(idle_app, "hint-3") == 2


def test_a_replay_that_cannot_reach_the_store_is_tried_again_not_parked(
    idle_app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    local = LocalTurns()
    store = _config.store_for(idle_app)
    try:
        two_steps.apply_async((1,), workflow_id="replay-1", app=idle_app)
        local.drive_here(idle_app, two_steps.name, two_steps.fn, "replay-1")
        cache.clear()  # the next turn replays
        finish_open_step(idle_app, "replay-1")

        def away(run_id: str) -> Any:
            raise StoreUnavailableError("the store went away")

        monkeypatch.setattr(store, "history", away)
        with pytest.raises(StoreUnavailableError):
            local.drive_here(idle_app, two_steps.name, two_steps.fn, "replay-1")
        assert store.require_run("replay-1").status == "RUNNING"

        monkeypatch.undo()
        local.drive_here(idle_app, two_steps.name, two_steps.fn, "replay-1")
        assert store.require_run("replay-1").turn == 2
    finally:
        local.drain(5.0)
