"""What the messages of a run look like to Celery tools such as Flower.

Every step message and every wake names its run as its Celery ``root_id`` and
``parent_id``, however it was sent (a driver turn, an outcome's wake, a re-send, a
retry), and a wake's arguments read ``run=<run id>``.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, shared_task, signals
from celery.worker import WorkController

from celery_durable import _config, durable_workflow
from celery_durable.store import Dispatch
from celery_durable.worker import publish_step, publish_wake, resend, step_headers

TIMEOUT = 30
#: Where the tests that only look at messages send them: no worker consumes it.
NOWHERE = {"queue": f"durable-tests-nobody-{uuid.uuid4().hex[:8]}"}


class Sent:
    """The headers and properties of every task message published while it is open."""

    def __init__(self) -> None:
        self.messages: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self._lock = threading.Lock()

    def __call__(self, headers: Any = None, properties: Any = None, **_: Any) -> None:
        with self._lock:
            self.messages.append((dict(headers or {}), dict(properties or {})))

    def of(self, run_id: str) -> list[dict[str, Any]]:
        """Headers of the messages of ``run_id``: its wakes and its step messages."""
        with self._lock:
            return [
                h
                for h, _ in self.messages
                if h.get("durable_run") == run_id or h.get("argsrepr") == f"run={run_id}"
            ]


@pytest.fixture
def sent() -> Iterator[Sent]:
    recorder = Sent()
    signals.before_task_publish.connect(recorder, weak=False)
    try:
        yield recorder
    finally:
        signals.before_task_publish.disconnect(recorder)


@shared_task
def double(x: int) -> int:
    return 2 * x


@durable_workflow(name="tests.messages.twice")
async def twice(x: int) -> int:
    return await double.s(await double.s(x))


def test_every_message_of_a_run_has_the_run_as_root_and_parent(
    app: Celery, worker: WorkController, sent: Sent
) -> None:
    handle = twice.apply_async((3,), workflow_id=f"msg-{uuid.uuid4().hex[:8]}")
    assert handle.get(timeout=TIMEOUT) == 12
    messages = sent.of(handle.id)
    wakes = [h for h in messages if h.get("durable_wake")]
    steps = [h for h in messages if h.get("durable_run")]
    assert len(steps) == 2 and wakes  # the start's wake, and one per outcome
    for headers in messages:
        assert (headers["root_id"], headers["parent_id"]) == (handle.id, handle.id)
    for headers in wakes:
        assert headers["argsrepr"] == f"run={handle.id}"
        assert headers["task"] == "tests.messages.twice"
    for headers in steps:
        assert headers["task"] == double.name
        assert headers["argsrepr"] in ("(3,)", "(6,)")  # a step shows its own arguments


def test_resent_and_directly_published_messages_name_their_run(app: Celery, sent: Sent) -> None:
    codec = _config.settings_for(app).codec
    content_type, payload = codec.dumps([[5], {}, NOWHERE], "a test step")
    run_id = f"resent-{uuid.uuid4().hex[:8]}"
    dispatch = Dispatch(run_id, 1, double.name, "d-1", content_type, payload, "wf.x", NOWHERE)
    assert resend(app, [dispatch], copies=True) == 1
    publish_wake(app, "wf.x", run_id, NOWHERE)
    (step, wake) = sent.of(run_id)
    assert step["durable_dispatch"] == "d-1" and step["id"] != "d-1"  # a copy's own id
    for headers in (step, wake):
        assert (headers["root_id"], headers["parent_id"]) == (run_id, run_id)
    assert wake["argsrepr"] == f"run={run_id}"


def test_a_step_inherits_its_runs_priority_when_celery_is_told_to(
    app: Celery, sent: Sent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(app.conf, "task_inherit_parent_priority", True)
    headers = step_headers("prio-1", 1, "wf.x", {"priority": 7, **NOWHERE})
    publish_step(app, double.name, [1], {}, NOWHERE, "p-1", headers)
    publish_step(app, double.name, [1], {}, {"priority": 2, **NOWHERE}, "p-2", headers)
    monkeypatch.setitem(app.conf, "task_inherit_parent_priority", False)
    publish_step(app, double.name, [1], {}, NOWHERE, "p-3", headers)
    priorities = {
        h["id"]: p.get("priority") for h, p in sent.messages if h.get("durable_run") == "prio-1"
    }
    assert priorities["p-1"] == 7
    assert priorities["p-2"] == 2  # the step's own option wins
    assert priorities["p-3"] in (None, 0)


def test_a_wake_shows_the_run_and_nothing_else_as_its_arguments(app: Celery, sent: Sent) -> None:
    publish_wake(app, "wf.y", "order-o-1/3", NOWHERE)
    (wake,) = sent.of("order-o-1/3")
    assert wake["argsrepr"] == "run=order-o-1/3"
    assert wake["kwargsrepr"] == "{}"
    assert wake["root_id"] == wake["parent_id"] == "order-o-1/3"
