"""Every change of a run's state is conditional on the state it was decided from, and a
turn's fence never repeats: races at a run's end on PostgreSQL, and stale drivers from
before a continue-as-new, a retry or a resume."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import test_store
from dbclock import DbClock as Clock
from test_store import JSON, T0, commit, new_steps, ok, start

from celery_durable.errors import DurableError
from celery_durable.store import (
    DONE,
    FAILURE,
    PENDING,
    RUNNING,
    STUCK,
    SUCCESS,
    TERMINATED,
    NewRun,
    NewStep,
    Store,
    TurnWrite,
)

# The fixtures of the store tests: a store on SQLite and on PostgreSQL, and its clock.
clock, url, open_store, store = (
    test_store.clock,
    test_store.url,
    test_store.open_store,
    test_store.store,
)

#: Races per test: enough for both orders to happen many times over.
RACES = 50
CHILD = "child"
STOPPED = {"type": "WorkflowTerminatedError", "message": "terminated"}


@pytest.fixture
def pg_stores(postgres_url: str) -> Iterator[tuple[Store, Store]]:
    """Two stores on one PostgreSQL database, as two processes would have."""
    stores = (Store(postgres_url), Store(postgres_url))
    yield stores
    for each in stores:
        each.dispose()


def race(*actions: Callable[[], Any]) -> list[Any]:
    """Run the actions at once, one thread each; returns what each returned or raised."""
    barrier = threading.Barrier(len(actions))
    results: list[Any] = [None] * len(actions)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = actions[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(actions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def parent_with_running_child(store: Store, parent: str) -> str:
    """A parent waiting on child step 1, and its child run at turn 1, RUNNING."""
    child = f"{parent}/1"
    assert store.create_run(NewRun(parent, "shop.order", JSON, b"[[], {}]"))
    step = NewStep(1, CHILD, "shop.child", JSON, b"[[], {}]", "dispatch-1")
    run = NewRun(child, "shop.child", JSON, b"[[], {}]", parent_id=parent, parent_seq=1)
    write = TurnWrite(turn=0, at=T0, new_steps=[step], children=[run])
    assert store.commit_turn(parent, write) is not None
    assert store.commit_turn(child, TurnWrite(turn=0, at=T0)) is not None
    return child


def finish(store: Store, run_id: str, turn: int = 1) -> bool:
    write = TurnWrite(turn=turn, at=T0, status=SUCCESS, result=ok("42"))
    return store.commit_turn(run_id, write) is not None


def assert_stays_finished(store: Store, run_id: str) -> None:
    """Nothing moves a finished run: not a termination, a cancel, a turn or a resume."""
    before = store.require_run(run_id)
    with pytest.raises(DurableError, match="already finished"):
        store.terminate(run_id, STOPPED)
    with pytest.raises(DurableError, match="already finished"):
        store.request_cancel(run_id)
    assert not finish(store, run_id, before.turn)
    if before.status != FAILURE:
        with pytest.raises(DurableError, match="only STUCK or FAILURE"):
            store.resume(run_id)
    after = store.require_run(run_id)
    assert (after.status, after.result, after.error) == (before.status, before.result, before.error)


def test_terminate_at_finish_leaves_one_end_seen_alike_by_run_and_parent(
    pg_stores: tuple[Store, Store], clock: Clock
) -> None:
    first, second = pg_stores
    ends: Counter[str] = Counter()
    for i in range(RACES):
        parent = f"p-{i}"
        child = parent_with_running_child(first, parent)
        finished, terminated = race(
            lambda c=child: finish(first, c), lambda c=child: second.terminate(c, STOPPED)
        )
        run = first.require_run(child)
        (step,) = first.history(parent)
        ends[run.status] += 1
        if run.status == SUCCESS:
            assert finished is True and isinstance(terminated, DurableError)
            assert (run.result, run.error) == (b"42", None)
            assert (step.state, step.outcome, step.result) == (DONE, "ok", b"42")
        else:
            assert run.status == TERMINATED and finished is False
            assert run.result is None  # never both a result and TERMINATED
            assert (step.state, step.outcome) == (DONE, "error")
        assert_stays_finished(first, child)
    assert sum(ends.values()) == RACES


def test_cancel_at_finish_never_changes_a_finished_run(
    pg_stores: tuple[Store, Store], clock: Clock
) -> None:
    first, second = pg_stores
    for i in range(RACES):
        child = parent_with_running_child(first, f"c-{i}")
        finished, cancelled = race(
            lambda c=child: finish(first, c), lambda c=child: second.request_cancel(c)
        )
        assert finished is True  # a cancel request never stops a turn from landing
        assert cancelled is None or isinstance(cancelled, (DurableError, tuple))
        run = first.require_run(child)
        assert (run.status, run.result, run.error) == (SUCCESS, b"42", None)
        assert_stays_finished(first, child)


def test_resume_racing_terminate_never_revives_a_terminated_run(
    pg_stores: tuple[Store, Store], clock: Clock
) -> None:
    first, second = pg_stores
    for i in range(RACES):
        run_id = f"s-{i}"
        start(first, "charge", run_id=run_id)
        assert first.park(run_id, 1, STUCK, {"type": "NonDeterminismError"})
        resumed, terminated = race(
            lambda r=run_id: first.resume(r), lambda r=run_id: second.terminate(r, STOPPED)
        )
        assert not isinstance(terminated, Exception), terminated  # STUCK or RUNNING: ends
        assert resumed == STUCK or isinstance(resumed, DurableError)
        run = first.require_run(run_id)
        assert (run.status, run.error) == (TERMINATED, STOPPED)
        assert_stays_finished(first, run_id)


def test_two_racing_retries_rewind_a_failed_run_once(
    pg_stores: tuple[Store, Store], clock: Clock
) -> None:
    first, second = pg_stores
    for i in range(RACES):
        run_id = f"f-{i}"
        start(first, "charge", run_id=run_id)
        first.record_outcome(run_id, 1, error={"type": "KeyError", "message": "k"})
        assert commit(first, run_id, 1, [1], [], T0, FAILURE, error={"type": "KeyError"})
        results = race(lambda r=run_id: first.resume(r), lambda r=run_id: second.resume(r))
        assert sorted(map(str, results)).count(FAILURE) == 1, results
        run = first.require_run(run_id)
        assert (run.status, run.turn, run.attempt) == (RUNNING, 1, 2)


# -- a stale driver of an earlier incarnation cannot commit ---------------------------------


def stale(store: Store, run_id: str, turn: int, incarnation: int) -> bool:
    """Commit a turn as a driver that read the run at ``(incarnation, turn)`` would."""
    write = TurnWrite(
        turn=turn, incarnation=incarnation, at=T0, new_steps=new_steps("stale", first=50)
    )
    return store.commit_turn(run_id, write) is not None


def test_a_driver_from_before_a_continue_as_new_cannot_commit(store: Store) -> None:
    start(store, "charge")
    store.record_outcome("run-1", 1, result=ok())
    restart = TurnWrite(turn=1, at=T0, delivered=[1], restart=(JSON, b'[["o-2"], {}]'))
    assert store.commit_turn("run-1", restart) is not None
    run = store.require_run("run-1")
    assert (run.status, run.turn, run.incarnation) == (PENDING, 0, 1)
    # A driver that read turn 0 of the first incarnation, stalled, then commits.
    assert not stale(store, "run-1", 0, 0)
    assert not store.park("run-1", 0, STUCK, {"type": "NonDeterminismError"}, 0)
    assert store.history("run-1") == []
    assert stale(store, "run-1", 0, 1)  # the new incarnation's driver commits


def test_a_driver_from_before_a_retry_cannot_commit(store: Store) -> None:
    start(store, "charge")
    store.record_outcome("run-1", 1, error={"type": "KeyError", "message": "k"})
    assert commit(store, "run-1", 1, [1], [], T0, FAILURE, error={"type": "KeyError"})
    assert store.resume("run-1") == FAILURE
    run = store.require_run("run-1")
    # Back at turn 1, where a driver that lost the race to the failing turn also was.
    assert (run.status, run.turn, run.incarnation) == (RUNNING, 1, 1)
    assert not stale(store, "run-1", 1, 0)
    assert not store.park("run-1", 1, STUCK, {"type": "NonDeterminismError"}, 0)
    assert [h.name for h in store.history("run-1")] == ["charge"]
    assert stale(store, "run-1", 1, 1)


def test_a_driver_from_before_a_resume_cannot_commit(store: Store) -> None:
    start(store, "charge")
    assert store.park("run-1", 1, STUCK, {"type": "NonDeterminismError"})
    assert store.resume("run-1") == STUCK
    run = store.require_run("run-1")
    assert (run.status, run.turn, run.incarnation) == (RUNNING, 1, 1)
    assert not stale(store, "run-1", 1, 0)
    assert stale(store, "run-1", 1, 1)
    assert store.require_run("run-1").turn == 2


def test_resume_refuses_what_is_not_stuck_or_failed(store: Store) -> None:
    start(store, "charge")
    with pytest.raises(DurableError, match="is RUNNING; only STUCK or FAILURE"):
        store.resume("run-1")
    assert store.require_run("run-1").incarnation == 0
