"""Canvas made durable gives what Celery gives: each shape run both ways, side by side.

Celery's side runs on the same embedded worker with an in-memory result backend (real
Celery code: chords through the backend's counter, chains through message fields). The
durable side replays every turn from history (``durable_cache_size = 0``), so each shape
is also checked to walk to the same steps on every replay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from celery import Celery, chain, chord, group, shared_task
from celery.canvas import Signature
from celery.exceptions import ChordError
from celery.worker import WorkController
from recorder import see as _see
from recorder import seen
from recorder import wait_seen as _wait_seen

from celery_durable import WorkflowHandle, durable_workflow
from celery_durable.canvas import durable

# -- tasks --------------------------------------------------------------------------------


@shared_task
def add(x: int, y: int = 0) -> int:
    return x + y


@shared_task
def tsum(values: list[int]) -> int:
    return sum(values)


@shared_task
def echo(*args: Any, **kwargs: Any) -> list[Any]:
    return [list(args), kwargs]


@shared_task
def fail(*args: Any) -> None:
    raise ValueError(f"failed with {list(args)}")


@shared_task
def errback(request: Any, exc: BaseException, traceback: Any, tag: str = "") -> None:
    """A new-style errback: called in-process with the failed request."""
    _see(tag, "errback", request.task, type(exc).__name__)


@shared_task
def old_errback(task_id: str, tag: str = "") -> None:
    """An old-style errback: sent as a task with the failed task's id."""
    _see(tag, "old_errback")


@shared_task
def callback(value: Any, tag: str = "") -> None:
    _see(tag, "callback", value)


# -- the shapes ---------------------------------------------------------------------------

SHAPES: dict[str, Callable[[], Signature]] = {
    "task": lambda: add.s(1, 2),
    "immutable task": lambda: add.si(1, 2),
    "group": lambda: group(add.s(1, 2), add.s(3, 4)),
    "group from a generator": lambda: group(add.s(i, i) for i in range(4)),
    "group of one": lambda: group(add.s(1, 1)),
    "empty group": lambda: group([]),
    "nested groups are flattened": lambda: group(add.s(1, 1), group(add.s(2, 2), add.s(3, 3))),
    "group of one chain ending in a group": lambda: group(
        chain(add.s(1, 1), group(add.s(1), add.s(2)))
    ),
    "group with a chain ending in a group": lambda: group(
        chain(add.s(1, 1), group(add.s(1), add.s(2))), add.s(5, 5)
    ),
    "chain passes results on": lambda: chain(add.s(1, 2), add.s(10), add.s(100)),
    "chain with si and kwargs": lambda: chain(add.s(1, 2), add.si(100, 1), echo.s(7, k=1)),
    "chain with the | operator": lambda: add.s(1, 1) | add.s(2) | echo.s(),
    "chain in a chain": lambda: chain(add.s(1, 1), chain(add.s(2), add.s(3)), add.s(4)),
    "group inside a chain": lambda: chain(add.s(1, 2), group(add.s(1), echo.s(2)), echo.s()),
    "chain ending in a group": lambda: chain(add.s(1, 2), group(add.s(1), add.s(2))),
    "chain with a group of one": lambda: chain(add.s(1, 2), group(add.s(1)), add.s(5)),
    "chain with an empty group": lambda: chain(add.s(1, 1), group([]), add.s(3)),
    "chain of two groups": lambda: chain(
        group(add.s(1, 1), add.s(2, 2)), group(echo.s(1), echo.s(2))
    ),
    "chord": lambda: chord([add.s(i, i) for i in range(5)], tsum.s()),
    "chord with a chain body": lambda: chord([add.s(i, i) for i in range(3)], tsum.s() | add.s(1)),
    "chord with a group body": lambda: chord(
        [add.s(1, 1), add.s(2, 2)], group(echo.s(1), echo.s())
    ),
    "chord with an empty header": lambda: chord([], echo.s()),
    "chord with an immutable body": lambda: chord([add.s(1, 1)], echo.si("done")),
    "chord in a chord header": lambda: chord(
        [chord([add.s(i, 1) for i in range(3)], tsum.s()), add.s(5, 5)], tsum.s()
    ),
    "chain of chords": lambda: chain(
        add.s(0, 1), *[chord([add.s(i) for i in range(3)], tsum.s()) for _ in range(3)]
    ),
    "nested chord in a chain in a group": lambda: group(
        chain(add.s(1, 1), chord([add.s(i) for i in range(3)], tsum.s())), add.s(0, 0)
    ),
    "group | task becomes a chord": lambda: group(add.s(1, 1), add.s(2, 2)) | tsum.s(),
    "three-level nested chord": lambda: chord(
        [
            chord([chord([add.s(i, j) for i in range(2)], tsum.s()) for j in range(2)], tsum.s())
            for _ in range(2)
        ],
        tsum.s(),
    ),
    "starmap": lambda: add.starmap([(1, 2), (3, 4)]),
    "map": lambda: echo.map([1, 2]),
    "chunks": lambda: add.chunks([(i, i) for i in range(7)], 3),
}

FAILING: dict[str, Callable[[], Signature]] = {
    "failing task": lambda: fail.s(1),
    "group with a failing member": lambda: group(add.s(1, 1), fail.s(2), add.s(3)),
    "chain failing in the middle": lambda: chain(add.s(1, 1), fail.s(), add.s(3)),
    "chord with a failing header task": lambda: chord([add.s(1, 1), fail.s(2)], tsum.s()),
    "chord with a failing body": lambda: chord([add.s(1, 1)], fail.s()),
    "chain of a failing group and a task": lambda: chain(group(add.s(1, 1), fail.s()), tsum.s()),
}


@durable_workflow
async def await_shape(name: str) -> Any:
    """Builds the shape inside the workflow and awaits it."""
    return await {**SHAPES, **FAILING}[name]()  # type: ignore[misc]


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def app(app: Celery) -> Celery:
    """The suite's durable app, replaying every turn from history, with an in-memory
    result backend for Celery's side (the durable side never reads it). One app serves
    both: Celery's worker optimizations allow one app per process."""
    app.conf.durable_cache_size = 0
    app.conf.result_backend = "cache+memory://"
    return app


def celery_result(make: Callable[[], Signature]) -> Any:
    """What plain Celery gives for the shape: its result, or the exception ``get`` raises."""
    try:
        result = make().apply_async()
        # The embedded worker marks this process as a worker; the test thread is not a task.
        return result.get(timeout=30, disable_sync_subtasks=False)
    except Exception as exc:
        return exc


def durable_result(handle: WorkflowHandle[Any]) -> Any:
    try:
        return handle.get(timeout=30)
    except Exception as exc:
        return exc


def same_outcome(durable_value: Any, celery_value: Any) -> None:
    if isinstance(celery_value, BaseException):
        assert type(durable_value) is type(celery_value), durable_value
        if not isinstance(celery_value, ChordError):  # the message names a task id
            assert str(durable_value) == str(celery_value)
    else:
        assert durable_value == celery_value


# -- results equal Celery's ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(SHAPES))
def test_awaited_canvas_gives_what_celery_gives(
    name: str, app: Celery, worker: WorkController
) -> None:
    expected = celery_result(SHAPES[name])
    assert not isinstance(expected, BaseException), expected
    handle = await_shape.apply_async((name,), workflow_id=f"await-{name}")
    assert durable_result(handle) == expected


@pytest.mark.parametrize("name", list(SHAPES))
def test_durable_canvas_gives_what_celery_gives(
    name: str, app: Celery, worker: WorkController
) -> None:
    expected = celery_result(SHAPES[name])
    handle = durable(SHAPES[name]()).apply_async(workflow_id=f"durable-{name}")
    assert durable_result(handle) == expected


@pytest.mark.parametrize("name", list(FAILING))
def test_failures_raise_what_celery_raises(name: str, app: Celery, worker: WorkController) -> None:
    expected = celery_result(FAILING[name])
    assert isinstance(expected, Exception)
    same_outcome(durable_result(durable(FAILING[name]()).apply_async()), expected)
    same_outcome(durable_result(await_shape.delay(name)), expected)


def test_chord_error_names_the_failed_dependency_and_chains_its_error(
    app: Celery, worker: WorkController
) -> None:
    handle = durable(chord([add.s(1, 1), fail.s(2)], tsum.s())).apply_async()
    with pytest.raises(ChordError, match=r"Dependency .*fail\[1\] raised ValueError"):
        handle.get(timeout=30)
    assert "ValueError: failed with [2]" in (handle.traceback or "")
    # The body never ran: the run has the two header steps only.
    assert [step.name for step in handle.history] == [add.name, fail.name]


def test_partial_arguments_and_options_reach_the_first_tasks(
    app: Celery, worker: WorkController
) -> None:
    def make() -> Signature:
        return chain(group(echo.s(1), echo.s(2)), echo.s())

    expected = make().apply_async((0,), {"k": "v"}).get(timeout=30, disable_sync_subtasks=False)
    handle = durable(make()).apply_async((0,), {"k": "v"}, queue=app.conf.task_default_queue)
    assert handle.get(timeout=30) == expected
    assert expected == [[[[[0, 1], {"k": "v"}], [[0, 2], {"k": "v"}]]], {}]


# -- errbacks and callbacks ---------------------------------------------------------------


def test_a_chain_errback_is_called_for_the_task_that_failed(
    app: Celery, worker: WorkController
) -> None:
    def make(tag: str) -> Signature:
        return chain(add.s(1, 1), fail.s(), add.s(3)).on_error(errback.s(tag=tag))

    celery_result(lambda: make("chain-celery"))
    with pytest.raises(ValueError):
        durable(make("chain-durable")).apply_async().get(timeout=30)
    assert _wait_seen("chain-durable", 1) == _wait_seen("chain-celery", 1)
    assert seen["chain-durable"] == [("errback", fail.name, "ValueError")]


def test_a_group_raises_its_first_failure_in_order(app: Celery, worker: WorkController) -> None:
    # Celery raises whichever failure its join sees first (in order for join(), as they
    # complete for a backend's native join); a replayed run must not depend on timing.
    handle = durable(group(add.s(1, 1), fail.s(2), fail.s(3))).apply_async()
    with pytest.raises(ValueError, match=r"failed with \[2\]"):
        handle.get(timeout=30)
    assert [step.state for step in handle.history] == ["DELIVERED"] * 3


@pytest.mark.filterwarnings("ignore::celery.exceptions.CPendingDeprecationWarning")
def test_a_failed_chord_calls_its_body_errbacks_once_like_celery(
    app: Celery, worker: WorkController
) -> None:
    def make(tag: str) -> Signature:
        header = [add.s(1, 1), fail.s(2).on_error(errback.s(tag=tag))]
        sig = chord(header, tsum.s())
        sig.link_error(errback.s(tag=tag))  # chord.link_error links the body
        sig.link_error(old_errback.s(tag=tag))
        return sig

    celery_result(lambda: make("chord-celery"))
    handle = durable(make("chord-durable")).apply_async()
    with pytest.raises(ChordError):
        handle.get(timeout=30)
    expected = [
        ("errback", fail.name, "ValueError"),  # the failed header task's own errback
        ("errback", tsum.name, "ChordError"),  # the body's, with the chord's error
        ("old_errback",),
    ]
    assert _wait_seen("chord-durable", 3) == _wait_seen("chord-celery", 3) == sorted(expected)
    # The body's errbacks were one durable step of the run, after the header.
    names = [step.name for step in handle.history]
    assert names == [add.name, fail.name, "celery_durable.canvas.chord_errbacks"]


# -- durable() from outside ---------------------------------------------------------------


def test_durable_start_is_idempotent_by_workflow_id(app: Celery, worker: WorkController) -> None:
    sig = chord([add.s(i, i) for i in range(10)], tsum.s())
    first = durable(sig).apply_async(workflow_id="chord-once")
    again = durable(sig).apply_async(workflow_id="chord-once")
    assert first == again
    assert first.get(timeout=30) == again.get(timeout=30) == 90
    assert first.workflow == "celery_durable.canvas"
    history = first.history
    assert [s.name for s in history] == [add.name] * 10 + [tsum.name]
    assert history[-1].args == [[2 * i for i in range(10)]]
    assert durable(sig).delay().get(timeout=30) == 90  # without an id: a new run


def test_task_id_is_taken_as_the_workflow_id(app: Celery, worker: WorkController) -> None:
    handle = durable(add.s(2, 3)).apply_async(task_id="given-id")
    assert handle.id == "given-id"
    assert WorkflowHandle("given-id", app=app).get(timeout=30) == 5


def test_dict_form_canvas_runs_like_the_signature(app: Celery, worker: WorkController) -> None:
    sig = chain(add.s(1, 1), group(add.s(1), add.s(2)), tsum.s())
    as_dict = dict(sig)  # what a message or a JSON column would hold
    assert durable(as_dict).apply_async().get(timeout=30) == 7


@durable_workflow
async def doubled(x: int) -> int:
    """A workflow used inside a canvas."""
    return await add.s(x, x)  # type: ignore[no-any-return,misc]


def test_a_workflow_in_a_canvas_runs_as_a_child_run(app: Celery, worker: WorkController) -> None:
    handle = durable(chain(add.s(1, 2), doubled.s(), add.s(1))).apply_async()
    assert handle.get(timeout=30) == 7
    steps = [(step.kind, step.name) for step in handle.history]
    assert steps == [("activity", add.name), ("child", doubled.name), ("activity", add.name)]


def test_durable_refuses_what_is_not_a_canvas(app: Celery) -> None:
    with pytest.raises(TypeError, match="takes a Celery signature or canvas"):
        durable(42)  # type: ignore[arg-type]
