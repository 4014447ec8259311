"""The store on its own (no Celery), on SQLite and on PostgreSQL."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from dbclock import DbClock
from sqlalchemy import (
    Index,
    MetaData,
    Table,
    create_engine,
    event,
    insert,
    inspect,
    select,
    update,
)

from celery_durable import store as _store
from celery_durable.errors import DurableError, StoreUnavailableError, WorkflowNotFoundError
from celery_durable.runtime import ACTIVITY
from celery_durable.store import (
    CANCELLED,
    CLAIMED,
    DELIVERED,
    DONE,
    FAILURE,
    PENDING,
    RUNNING,
    SCHEDULED,
    STEP_CANCELLED,
    STUCK,
    SUCCESS,
    TERMINATED,
    LossPolicy,
    NewRun,
    NewStep,
    RunRecord,
    Store,
    TurnCommitted,
    TurnWrite,
    WorkerInfo,
    _schema,
)

JSON = "application/json"
T0 = 1_700_000_000.0


@pytest.fixture
def clock(url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[DbClock]:
    """The database's clock at T0, moved by hand (stores opened after it read it)."""
    clock = DbClock(url, monkeypatch, T0)
    yield clock
    clock.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/durable.sqlite3"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def open_store(url: str) -> Iterator[Callable[[], Store]]:
    """Opens stores on the test's database, as separate processes would; closes them after."""
    opened: list[Store] = []

    def open_() -> Store:
        opened.append(Store(url))
        return opened[-1]

    yield open_
    for store in opened:
        store.dispose()


@pytest.fixture
def store(open_store: Callable[[], Store], clock: DbClock) -> Store:
    return open_store()


def create(store: Store, run_id: str = "run-1", workflow: str = "shop.checkout") -> None:
    assert store.create_run(NewRun(run_id, workflow, JSON, b'[["o-1"], {}]', {"queue": "wf"}))


def new_steps(*names: str, first: int = 1) -> list[NewStep]:
    return [
        NewStep(seq, ACTIVITY, name, JSON, b"[[], {}, {}]", f"dispatch-{seq}")
        for seq, name in enumerate(names, start=first)
    ]


def commit(
    store: Store,
    run_id: str,
    turn: int,
    delivered: list[int],
    steps: list[NewStep],
    at: float,
    status: str = _store.RUNNING,
    result: tuple[str, bytes] | None = None,
    error: dict[str, Any] | None = None,
    seen: int | None = None,
) -> bool:
    """Commit a turn; True if it landed (the store returns None when fenced out).

    ``seen``: the events the turn read (by default, every event counted so far).
    """
    if seen is None:
        run = store.get_run(run_id)
        seen = 0 if run is None else run.events
    write = TurnWrite(
        turn=turn,
        at=at,
        delivered=delivered,
        new_steps=steps,
        status=status,
        result=result,
        error=error,
        seen=seen,
    )
    return store.commit_turn(run_id, write) is not None


def start(store: Store, *names: str, run_id: str = "run-1") -> None:
    """Create a run and commit its first turn, which schedules ``names``."""
    create(store, run_id)
    begun = store.begin_turn(run_id)
    assert begun is not None and begun.run.turn == 0
    assert commit(store, run_id, 0, [], new_steps(*names), T0)


def states(store: Store, run_id: str = "run-1") -> dict[int, str]:
    return {step.seq: step.state for step in store.history(run_id)}


def ok(value: str = "1") -> tuple[str, bytes]:
    return (JSON, value.encode())


# -- runs ---------------------------------------------------------------------------------


def test_create_run_is_idempotent_per_id(store: Store) -> None:
    assert store.create_run(NewRun("run-1", "shop.checkout", JSON, b"[[1], {}]"))
    assert not store.create_run(NewRun("run-1", "shop.other", JSON, b"[[2], {}]"))

    run = store.require_run("run-1")
    assert (run.workflow, run.input, run.status, run.turn) == (
        "shop.checkout",
        b"[[1], {}]",
        PENDING,
        0,
    )
    assert run.created_at == T0
    assert run.started_at is None
    assert [r.id for r in store.list_runs()] == ["run-1"]


def test_concurrent_creates_of_one_id_create_one_run(open_store: Callable[[], Store]) -> None:
    stores = [open_store() for _ in range(4)]
    for s in stores:
        s.ensure_schema()
    barrier = threading.Barrier(len(stores))
    created: list[bool] = []

    def create_one(s: Store) -> None:
        barrier.wait()
        created.append(s.create_run(NewRun("same-id", "shop.checkout", JSON, b"[]")))

    threads = [threading.Thread(target=create_one, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(created) == [False, False, False, True]


def test_reading_runs(store: Store, clock: DbClock) -> None:
    create(store, "run-a", "shop.checkout")
    clock.advance(1)
    create(store, "run-b", "shop.refund")

    assert store.get_run("nope") is None
    assert store.get_status("nope") is None
    assert store.get_status("run-a") == PENDING
    assert store.require_run("run-a").options == {"queue": "wf"}
    assert [r.id for r in store.list_runs()] == ["run-b", "run-a"]
    assert [r.id for r in store.list_runs(workflow="shop.checkout")] == ["run-a"]
    assert [r.id for r in store.list_runs(status=SUCCESS)] == []
    assert [r.id for r in store.list_runs(limit=1)] == ["run-b"]
    with pytest.raises(WorkflowNotFoundError, match="'nope'"):
        store.require_run("nope")


# -- driver turns -------------------------------------------------------------------------


def test_a_turn_delivers_outcomes_schedules_steps_and_finishes(
    store: Store, clock: DbClock
) -> None:
    start(store, "charge", "reserve")
    run = store.require_run("run-1")
    assert (run.status, run.turn, run.started_at) == (RUNNING, 1, T0)
    history = store.history("run-1")
    assert [(h.seq, h.name, h.state, h.created_turn, h.dispatch_id) for h in history] == [
        (1, "charge", SCHEDULED, 1, "dispatch-1"),
        (2, "reserve", SCHEDULED, 1, "dispatch-2"),
    ]

    assert store.record_outcome("run-1", 1, result=ok('"r-1"'))[:2] == (True, True)
    assert store.record_outcome("run-1", 2, error={"type": "KeyError"})[:2] == (True, False)
    begun = store.begin_turn("run-1")
    assert begun is not None
    assert [(s.seq, s.outcome) for s in begun.new_outcomes] == [(1, "ok"), (2, "error")]
    assert begun.new_outcomes[0].result == b'"r-1"'
    assert begun.new_outcomes[1].error == {"type": "KeyError"}

    at = clock.advance(5)
    assert commit(store, "run-1", 1, [1, 2], [], at, SUCCESS, result=ok('"done"'))

    run = store.require_run("run-1")
    assert (run.status, run.turn, run.result, run.finished_at) == (SUCCESS, 2, b'"done"', at)
    assert [(h.state, h.observed_turn, h.observed_at) for h in store.history("run-1")] == [
        (DELIVERED, 2, at),
        (DELIVERED, 2, at),
    ]
    begun = store.begin_turn("run-1")
    assert begun is not None and begun.new_outcomes == []


def test_a_failed_turn_keeps_the_error_and_the_history(store: Store) -> None:
    start(store, "charge")
    error = {"type": "ValueError", "module": "builtins", "message": "no", "args": ["no"]}
    assert commit(store, "run-1", 1, [], [], T0, FAILURE, error=error)
    run = store.require_run("run-1")
    assert (run.status, run.error, run.finished_at) == (FAILURE, error, T0)
    assert [h.name for h in store.history("run-1")] == ["charge"]


def test_begin_turn_of_a_missing_run_is_none(store: Store) -> None:
    assert store.begin_turn("nope") is None


def test_commit_turn_is_fenced_on_the_turn(store: Store) -> None:
    start(store, "charge")
    store.record_outcome("run-1", 1, result=ok())

    assert commit(store, "run-1", 1, [1], new_steps("ship", first=2), T0)
    # A second driver that read the run at turn 1 too: fenced out, writes nothing.
    assert not commit(store, "run-1", 1, [1], new_steps("refund", first=2), T0, SUCCESS)

    run = store.require_run("run-1")
    assert (run.status, run.turn) == (RUNNING, 2)
    assert [(h.seq, h.name) for h in store.history("run-1")] == [(1, "charge"), (2, "ship")]


def test_two_racing_commits_at_one_turn_exactly_one_wins(
    open_store: Callable[[], Store], clock: DbClock
) -> None:
    first, second = open_store(), open_store()
    start(first, "charge")
    first.record_outcome("run-1", 1, result=ok())
    barrier = threading.Barrier(2)
    won: dict[str, bool] = {}

    def race(name: str, s: Store) -> None:
        barrier.wait()
        won[name] = commit(s, "run-1", 1, [1], new_steps(name, first=2), T0)

    threads = [
        threading.Thread(target=race, args=(name, s))
        for name, s in (("ship", first), ("refund", second))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(won.values()) == [False, True]
    winner = next(name for name, w in won.items() if w)
    assert [h.name for h in first.history("run-1")] == ["charge", winner]
    assert first.require_run("run-1").turn == 2


def test_commit_turn_refuses_a_run_that_is_no_longer_active(store: Store) -> None:
    start(store, "charge")
    assert store.park("run-1", 1, STUCK, {"type": "NonDeterminismError"})
    assert not commit(store, "run-1", 1, [], new_steps("x", first=2), T0)
    assert not store.park("run-1", 1, STUCK, {"type": "again"})
    assert [h.seq for h in store.history("run-1")] == [1]


def test_park_is_fenced_on_the_turn(store: Store) -> None:
    start(store, "charge")
    assert not store.park("run-1", 0, STUCK, {"type": "NonDeterminismError"})
    assert store.require_run("run-1").status == RUNNING


# -- claims -------------------------------------------------------------------------------


def test_claim_step_once_per_dispatch(store: Store) -> None:
    start(store, "charge")
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    # The same message delivered again (broker redelivery, or a second copy).
    assert not store.claim_step("run-1", 1, "dispatch-1", "worker-b", 0)
    step = store.history("run-1")[0]
    assert (step.state, step.claimed_by, step.attempts) == (CLAIMED, "worker-a", 1)


def test_a_celery_retry_of_the_message_may_claim_again(store: Store) -> None:
    start(store, "charge")
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-b", 1)
    assert not store.claim_step("run-1", 1, "dispatch-1", "worker-c", 1)
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-c", 2)
    step = store.history("run-1")[0]
    assert (step.claimed_by, step.attempts) == ("worker-c", 3)


def test_claim_with_the_wrong_dispatch_id_is_dropped(store: Store) -> None:
    start(store, "charge")
    assert not store.claim_step("run-1", 1, "some-old-dispatch", "worker-a", 0)
    assert not store.claim_step("run-1", 2, "dispatch-2", "worker-a", 0)  # no such step
    assert not store.claim_step("run-2", 1, "dispatch-1", "worker-a", 0)  # no such run
    assert states(store) == {1: SCHEDULED}


def test_a_step_with_an_outcome_cannot_be_claimed_again(store: Store) -> None:
    start(store, "charge")
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    store.record_outcome("run-1", 1, result=ok())
    assert not store.claim_step("run-1", 1, "dispatch-1", "worker-a", 5)
    assert states(store) == {1: DONE}


# -- outcomes and wakes -------------------------------------------------------------------


def test_record_outcome_is_idempotent(store: Store) -> None:
    start(store, "charge")
    assert store.record_outcome("run-1", 1, result=ok('"first"'))[:2] == (True, True)
    assert store.record_outcome("run-1", 1, result=ok('"second"'))[:2] == (False, False)
    assert store.record_outcome("run-1", 1, error={"type": "Late"})[:2] == (False, False)
    step = store.history("run-1")[0]
    assert (step.state, step.outcome, step.result, step.error) == (DONE, "ok", b'"first"', None)
    assert step.completed_at == T0


def test_record_outcome_of_an_unknown_step_records_nothing(store: Store) -> None:
    start(store, "charge")
    assert store.record_outcome("run-1", 7, result=ok())[:2] == (False, False)
    assert store.record_outcome("nope", 1, result=ok())[:2] == (False, False)


def test_only_the_first_outcome_a_turn_has_not_seen_asks_for_a_wake(store: Store) -> None:
    start(store, "a", "b", "c", "d", "e")
    assert store.record_outcome("run-1", 1, result=ok())[:2] == (True, True)
    assert store.record_outcome("run-1", 2, result=ok())[:2] == (True, False)
    assert store.record_outcome("run-1", 3, result=ok())[:2] == (True, False)

    begun = store.begin_turn("run-1")  # a turn reads; it takes nothing yet
    assert begun is not None
    assert [s.seq for s in begun.new_outcomes] == [1, 2, 3]
    assert begun.run.events == 3
    # Counted after the read, and not the first unseen: this recorder wakes nobody, so
    # the turn's commit reports it pending and its driver runs another turn.
    assert store.record_outcome("run-1", 4, result=ok())[:2] == (True, False)
    write = TurnWrite(turn=1, at=T0, delivered=[1, 2, 3], seen=begun.run.events)
    committed = store.commit_turn("run-1", write)
    assert committed is not None and committed.pending

    again = store.begin_turn("run-1")
    assert again is not None and [s.seq for s in again.new_outcomes] == [4]
    write = TurnWrite(turn=2, at=T0, delivered=[4], seen=again.run.events)
    committed = store.commit_turn("run-1", write)
    assert committed is not None and not committed.pending
    # Everything counted has been seen: the next outcome wakes the run again.
    assert store.record_outcome("run-1", 5, result=ok())[:2] == (True, True)


def test_a_turn_that_finds_nothing_to_deliver_still_takes_its_events(store: Store) -> None:
    start(store, "a", "b")
    assert store.record_outcome("run-1", 1, result=ok())[:2] == (True, True)
    assert commit(store, "run-1", 1, [1], [], T0)
    # A retried write counts its event again, with nothing new to deliver.
    assert store.record_outcome("run-1", 1, result=ok(), retrying=True)[:2] == (False, True)
    begun = store.begin_turn("run-1")
    assert begun is not None and not begun.new_outcomes
    assert begun.run.events > begun.run.taken
    assert not store.take_events("run-1", begun.run.events)
    assert store.record_outcome("run-1", 2, result=ok())[:2] == (True, True)


def test_the_first_outcome_after_the_first_turn_wakes_even_with_the_start_wake_out(
    store: Store,
) -> None:
    create(store)
    # Nothing has run the turn the start's wake asked for; a turn committed anyway
    # (another copy of it) saw no events, so the outcome is the first unseen one.
    assert commit(store, "run-1", 0, [], new_steps("a"), T0)
    assert store.record_outcome("run-1", 1, result=ok())[:2] == (True, True)


def test_outcomes_of_an_inactive_run_are_recorded_without_a_wake(store: Store) -> None:
    start(store, "a", "b")
    store.begin_turn("run-1")
    assert store.park("run-1", 1, STUCK, {"type": "NonDeterminismError"})
    assert store.record_outcome("run-1", 1, result=ok())[:2] == (True, False)
    assert states(store) == {1: DONE, 2: SCHEDULED}


def test_a_waiting_client_polls_the_status_and_the_age_by_the_databases_clock(
    store: Store, clock: DbClock
) -> None:
    assert store.poll_status("run-1") is None
    create(store)
    clock.advance(30)
    assert store.poll_status("run-1") == (PENDING, pytest.approx(30.0))


@pytest.mark.parametrize("status", [SUCCESS, FAILURE])
def test_a_run_that_is_nobodys_child_finishes_in_one_statement(
    store: Store, clock: DbClock, status: str
) -> None:
    start(store, "charge")
    assert store.record_outcome("run-1", 1, result=ok())[:2] == (True, True)
    at = clock.advance(5)
    error = {"type": "ValueError", "module": "builtins", "message": "no", "args": ["no"]}
    write = TurnWrite(
        turn=1,
        at=T0 + 100,  # the turn's own time: not the finishing time
        delivered=[1],
        seen=store.require_run("run-1").events,
        status=status,
        result=ok("9") if status == SUCCESS else None,
        error=error if status == FAILURE else None,
        child=False,
    )
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(store.engine, "before_cursor_execute", count)
    try:
        committed = store.commit_turn("run-1", write)
    finally:
        event.remove(store.engine, "before_cursor_execute", count)
    assert committed is not None and not committed.pending and committed.parent is None
    if store.dialect == "postgresql":
        assert len(statements) == 1, statements
    run = store.require_run("run-1")
    assert (run.status, run.turn, run.finished_at) == (status, 2, pytest.approx(at))
    assert (run.result, run.error) == ((b"9", None) if status == SUCCESS else (None, error))
    assert states(store) == {1: DELIVERED}


# -- leases and lost workers -------------------------------------------------------------

POLICY = LossPolicy(max_losses=2, backoff=1.0)


def test_a_claim_nobody_renews_expires_and_is_sent_again_after_its_backoff(
    store: Store, clock: DbClock
) -> None:
    start(store, "charge", "reserve")
    store.heartbeat(WorkerInfo("worker-a", "host-a", 100))
    store.heartbeat(WorkerInfo("worker-b", "host-b", 200))
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    assert store.claim_step("run-1", 2, "dispatch-2", "worker-b", 0)

    clock.advance(20)
    # b still holds its message; a lost its message (or died): only b renews.
    assert store.renew_leases("worker-b", {"dispatch-2"}) == 1
    assert store.renew_leases("worker-a", set()) == 0
    assert store.release_expired_claims(30, POLICY) == []
    clock.advance(15)
    assert store.renew_leases("worker-b", {"dispatch-2"}) == 1

    assert store.release_expired_claims(30, POLICY) == []  # no step failed
    assert states(store) == {1: SCHEDULED, 2: CLAIMED}
    [step] = [r for r in store.history("run-1") if r.seq == 1]
    assert (step.losses, step.due_at) == (1, clock.now + 1.0)  # the first backoff
    assert step.dispatch_id != "dispatch-1"
    assert store.take_due_steps() == []  # backing off
    assert store.stale_dispatches(older_than=0) == []  # not lost: not sent yet
    clock.advance(1.0)
    [due] = store.take_due_steps()
    assert (due.run_id, due.seq, due.name, due.dispatch_id) == (
        "run-1",
        1,
        "charge",
        step.dispatch_id,
    )
    assert (due.workflow, due.driver_options) == ("shop.checkout", {"queue": "wf"})
    assert store.take_due_steps() == []  # taken once
    # The lost worker's message, if it ever comes back, may not run; the new one may.
    assert not store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    assert store.claim_step("run-1", 1, step.dispatch_id, "worker-b", 0)


def test_expired_leases_are_left_alone_when_the_caller_says_so(
    store: Store, clock: DbClock
) -> None:
    start(store, "charge")
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    clock.advance(100)
    assert store.release_expired_claims(30, POLICY, leases=False) == []
    assert states(store) == {1: CLAIMED}


def test_claims_of_a_cleanly_stopped_worker_are_released_at_once_and_not_counted(
    store: Store, clock: DbClock
) -> None:
    start(store, "charge")
    store.heartbeat(WorkerInfo("worker-a", "host-a", 100))
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    store.worker_stopped("worker-a")
    assert store.release_expired_claims(3600, POLICY) == []
    [step] = store.history("run-1")
    assert (step.state, step.losses, step.due_at) == (SCHEDULED, 0, clock.now)
    assert [d.seq for d in store.take_due_steps()] == [1]


def test_a_worker_starting_under_a_node_name_leaves_the_others_of_that_name_alone(
    store: Store,
) -> None:
    # Two replicas started with one -n: Celery only warns, and both run steps.
    start(store, "charge", "reserve")
    first = WorkerInfo("celery@host:1:aaaa", "celery@host", 1, "boot/pid:[1]", "100")
    twin = WorkerInfo("celery@host:2:bbbb", "celery@host", 2, "boot/pid:[1]", "200")
    elsewhere = WorkerInfo("celery@host:1:cccc", "celery@host", 1, "other/pid:[1]", "100")
    for worker in (first, twin, elsewhere):
        store.heartbeat(worker)
    assert store.claim_step("run-1", 1, "dispatch-1", first.id, 0)
    assert store.claim_step("run-1", 2, "dispatch-2", twin.id, 0)
    # A new worker of that name is the successor of neither until it sees one is gone.
    new = WorkerInfo("celery@host:3:dddd", "celery@host", 3, "boot/pid:[1]", "300")
    store.heartbeat(new)
    assert store.release_expired_claims(3600, POLICY) == []
    assert states(store) == {1: CLAIMED, 2: CLAIMED}
    # It is shown the others of its name on its own machine (only there can it look)...
    assert sorted(w.id for w in store.live_workers_named(new)) == [first.id, twin.id]
    assert store.live_workers_named(WorkerInfo("x:9:eeee", "celery@host", 9)) == []
    # ...and retires the one whose process is dead: only that one's claims are released.
    assert store.retire_workers([first.id]) == 1
    assert store.retire_workers([first.id]) == 0
    store.release_expired_claims(3600, POLICY)
    assert states(store) == {1: SCHEDULED, 2: CLAIMED}
    assert [w.id for w in store.live_workers_named(new)] == [twin.id]


@pytest.mark.parametrize("offset", [-3600.0, 3600.0], ids=["writer-behind", "writer-ahead"])
def test_a_host_clock_an_hour_off_moves_no_decision_of_the_store(
    open_store: Callable[[], Store], monkeypatch: pytest.MonkeyPatch, offset: float
) -> None:
    # One host writes with its clock an hour off, another one, two hours off the other
    # way, decides: no claim, message, outcome or timer looks older or newer than it is.
    store = open_store()
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + offset)
    start(store, "charge", "reserve", "ship")
    store.heartbeat(WorkerInfo("worker-a", "host-a", 100))
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    assert store.record_outcome("run-1", 2, result=ok())[:2] == (True, True)
    create(store, "timed")
    assert store.begin_turn("timed") is not None
    timer = NewStep(1, "timer", "sleep", JSON, b"null", "t-1", due_in=300)
    assert commit(store, "timed", 0, [], [timer], real() + offset)

    monkeypatch.setattr(time, "time", lambda: real() - offset)
    assert store.release_expired_claims(30, POLICY) == []
    assert states(store) == {1: CLAIMED, 2: DONE, 3: SCHEDULED}
    assert store.stale_dispatches(older_than=10) == []
    assert store.runs_to_wake(older_than=10) == []
    assert store.fire_due_timers() == []
    assert store.take_due_steps() == []
    [step] = store.history("timed")
    assert step.due_at is not None
    assert step.due_at - step.dispatched_at == pytest.approx(300.0)


def test_release_step_only_moves_claimed_steps_and_only_of_their_holder(store: Store) -> None:
    start(store, "charge")
    assert store.release_step("run-1", 1, POLICY) is None  # still SCHEDULED
    assert states(store) == {1: SCHEDULED}
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    assert store.release_step("run-1", 1, POLICY, holder="worker-b") is None
    assert states(store) == {1: CLAIMED}
    assert store.release_step("run-1", 1, POLICY, holder="worker-a") is None
    assert states(store) == {1: SCHEDULED}


def test_a_step_lost_once_too_often_fails_with_step_lost_error(
    store: Store, clock: DbClock
) -> None:
    start(store, "charge")
    for loss in (1, 2):
        [step] = store.history("run-1")
        assert store.claim_step("run-1", 1, step.dispatch_id, "worker-a", 0)
        assert store.release_step("run-1", 1, POLICY) is None
        [step] = store.history("run-1")
        assert step.losses == loss
        assert step.due_at == clock.now + POLICY.delay(loss)  # 1 s, then 2 s
    [step] = store.history("run-1")
    assert store.claim_step("run-1", 1, step.dispatch_id, "worker-a", 0)

    wake = store.release_step("run-1", 1, POLICY)

    assert wake == ("run-1", "shop.checkout", {"queue": "wf"})
    [step] = store.history("run-1")
    assert (step.state, step.outcome, step.losses) == (DONE, "error", 3)
    assert step.error is not None and step.error["type"] == "StepLostError"
    assert "step 1 (charge) of workflow run run-1" in step.error["message"]
    assert "lost with its worker 3 times (3 attempts)" in step.error["message"]
    assert "durable_max_redeliveries" in step.error["message"]


def test_a_requeued_message_gives_back_only_its_own_holders_claim(store: Store) -> None:
    start(store, "charge")
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    # Another worker, or another dispatch of the step: not the lost message's claim.
    assert (
        store.release_step("run-1", 1, POLICY, holder="worker-b", dispatch_id="dispatch-1") is None
    )
    assert store.release_step("run-1", 1, POLICY, holder="worker-a", dispatch_id="other") is None
    assert states(store) == {1: CLAIMED}
    assert (
        store.release_step("run-1", 1, POLICY, holder="worker-a", dispatch_id="dispatch-1") is None
    )
    [step] = store.history("run-1")
    assert (step.state, step.losses) == (SCHEDULED, 1)


def test_a_heartbeat_after_a_clean_stop_is_a_live_worker_again(
    store: Store, clock: DbClock
) -> None:
    start(store, "charge")
    store.heartbeat(WorkerInfo("worker-a", "host-a", 100))
    store.worker_stopped("worker-a")
    store.heartbeat(WorkerInfo("worker-a", "host-a", 100))
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    assert store.release_expired_claims(3600, POLICY) == []
    assert states(store) == {1: CLAIMED}


def test_an_outcome_written_again_after_a_failure_still_flags_its_wake(store: Store) -> None:
    start(store, "charge")
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    # The first try recorded the outcome, then lost its connection before the flag.
    with store.engine.begin() as conn:
        conn.execute(
            update(_schema.steps).values(state=DONE, outcome="ok", content_type=JSON, result=b"1")
        )
        conn.execute(update(_schema.runs).values(wake_pending=False))
    assert store.record_outcome("run-1", 1, result=ok())[:2] == (False, False)
    assert store.record_outcome("run-1", 1, result=ok(), retrying=True)[:2] == (False, True)


def test_stale_dispatches_back_off_and_are_taken_by_one_sweeper(
    store: Store, clock: DbClock
) -> None:
    start(store, "charge")  # dispatched at T0

    clock.advance(10)
    assert store.stale_dispatches(older_than=10) == []  # not older yet
    clock.advance(1)
    [taken] = store.stale_dispatches(older_than=10)
    assert (taken.seq, taken.dispatch_id, taken.name) == (1, "dispatch-1", "charge")
    assert store.stale_dispatches(older_than=10) == []  # another sweeper, same moment

    # The next re-send waits twice as long (20 s), then four times (40 s).
    clock.advance(15)
    assert store.stale_dispatches(older_than=10) == []
    clock.advance(6)
    assert [d.seq for d in store.stale_dispatches(older_than=10)] == [1]
    clock.advance(39)
    assert store.stale_dispatches(older_than=10) == []
    clock.advance(2)
    assert [d.seq for d in store.stale_dispatches(older_than=10)] == [1]
    # Re-sends keep the dispatch id: whichever copy arrives first runs.
    assert store.history("run-1")[0].dispatch_id == "dispatch-1"


def test_claimed_and_finished_steps_are_never_stale(store: Store, clock: DbClock) -> None:
    start(store, "a", "b", "c")
    assert store.claim_step("run-1", 1, "dispatch-1", "worker-a", 0)
    store.record_outcome("run-1", 2, result=ok())
    clock.advance(100)
    assert [d.seq for d in store.stale_dispatches(older_than=10)] == [3]


def test_stale_dispatches_race_has_one_taker(
    open_store: Callable[[], Store], clock: DbClock
) -> None:
    stores = [open_store() for _ in range(4)]
    for i, s in enumerate(stores):
        start(s, "a", "b", run_id=f"run-{i}")
    clock.advance(100)
    barrier = threading.Barrier(len(stores))
    taken: list[tuple[str, int]] = []
    lock = threading.Lock()

    def sweep(s: Store) -> None:
        barrier.wait()
        found = s.stale_dispatches(older_than=10)
        with lock:
            taken.extend((d.run_id, d.seq) for d in found)

    threads = [threading.Thread(target=sweep, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == [(f"run-{i}", seq) for i in range(4) for seq in (1, 2)]


def test_due_timers_fire_only_for_the_workflows_asked(store: Store, clock: DbClock) -> None:
    # Two apps share the store; each worker fires the timers it can route wakes for.
    for run_id, workflow in (("mine", "shop.checkout"), ("theirs", "other.app.poll")):
        create(store, run_id, workflow)
        assert store.begin_turn(run_id) is not None
        timer = NewStep(1, "timer", "sleep", JSON, b"null", f"t-{run_id}", due_in=5)
        assert commit(store, run_id, 0, [], [timer], clock.now)
    clock.advance(6)

    assert [wake[0] for wake in store.fire_due_timers(workflows=["shop.checkout"])] == ["mine"]
    assert states(store, "theirs") == {1: "SCHEDULED"}
    assert [wake[0] for wake in store.fire_due_timers()] == ["theirs"]


def test_runs_to_wake_finds_runs_never_driven(store: Store, clock: DbClock) -> None:
    create(store)
    assert store.runs_to_wake(older_than=10) == []
    clock.advance(11)
    [run] = store.runs_to_wake(older_than=10)
    assert run.id == "run-1"
    assert store.runs_to_wake(older_than=10) == []  # taken; wait another period
    clock.advance(11)
    assert [r.id for r in store.runs_to_wake(older_than=10)] == ["run-1"]


def test_runs_to_wake_takes_only_the_workflows_asked_for(store: Store, clock: DbClock) -> None:
    create(store, "mine", workflow="shop.checkout")
    create(store, "theirs", workflow="billing.invoice")
    clock.advance(11)
    assert [r.id for r in store.runs_to_wake(10, workflows=["shop.checkout"])] == ["mine"]
    assert [r.id for r in store.runs_to_wake(10, exclude=["shop.checkout"])] == ["theirs"]


def test_a_run_queued_long_is_woken_again_ever_less_often(store: Store, clock: DbClock) -> None:
    create(store)  # its first wake waits behind a backlog that takes minutes to drain
    woken = []
    for second in range(1, 301):
        clock.advance(1)
        if store.runs_to_wake(older_than=10):
            woken.append(second)
    # Each new wake waits as long as the run had waited when the previous one was sent.
    assert woken == [11, 22, 44, 88, 176]


def test_runs_to_wake_finds_undelivered_outcomes_only(store: Store, clock: DbClock) -> None:
    start(store, "a", run_id="waiting")  # a step out, no outcome: nothing to do
    start(store, "a", run_id="has-outcome")
    start(store, "a", run_id="finished")
    store.record_outcome("has-outcome", 1, result=ok())
    store.record_outcome("finished", 1, result=ok())
    store.begin_turn("finished")
    assert commit(store, "finished", 1, [1], [], T0, SUCCESS, result=ok())

    clock.advance(11)
    assert [r.id for r in store.runs_to_wake(older_than=10)] == ["has-outcome"]
    assert store.runs_to_wake(older_than=10) == []


def test_runs_to_wake_leaves_recent_outcomes_to_their_own_wake(
    store: Store, clock: DbClock
) -> None:
    start(store, "a")
    clock.advance(100)
    store.record_outcome("run-1", 1, result=ok())
    clock.advance(5)
    assert store.runs_to_wake(older_than=10) == []


def test_runs_to_wake_race_has_one_taker(open_store: Callable[[], Store], clock: DbClock) -> None:
    stores = [open_store() for _ in range(4)]
    for i, s in enumerate(stores):
        create(s, f"run-{i}")
    clock.advance(100)
    barrier = threading.Barrier(len(stores))
    taken: list[str] = []
    lock = threading.Lock()

    def sweep(s: Store) -> None:
        barrier.wait()
        found = s.runs_to_wake(older_than=10)
        with lock:
            taken.extend(r.id for r in found)

    threads = [threading.Thread(target=sweep, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == [f"run-{i}" for i in range(4)]


# -- parents and children: cancelling and terminating -------------------------------------

KID = "shop.quote"


def start_children(store: Store, run_id: str, turn: int, count: int) -> list[str]:
    """Commit turn ``turn`` of ``run_id``, starting ``count`` child runs (steps 1..count
    above the turn's), and drive each child one turn so that it waits on a task."""
    first = len(store.history(run_id)) + 1
    ids = [f"{run_id}/{seq}" for seq in range(first, first + count)]
    write = TurnWrite(
        turn=turn,
        at=T0,
        new_steps=[
            NewStep(seq, "child", KID, JSON, b"[[], {}, {}]", f"d-{child}", child_id=child)
            for seq, child in zip(range(first, first + count), ids, strict=True)
        ],
        children=[
            NewRun(child, KID, JSON, b"[[], {}]", {"queue": "kids"}, run_id, seq)
            for seq, child in zip(range(first, first + count), ids, strict=True)
        ],
    )
    assert store.commit_turn(run_id, write) is not None
    for child in ids:
        assert store.begin_turn(child) is not None  # takes the wake that starting it set
        assert commit(store, child, 0, [], new_steps("price"), T0)
    return ids


def family(store: Store, children: int = 1) -> list[str]:
    """A run ``p`` at turn 1 whose children (``p/1``, ...) each wait on a task."""
    create(store, "p")
    assert store.begin_turn("p") is not None
    return start_children(store, "p", 0, children)


def end_parent(
    store: Store, cancelled: list[int], status: str = CANCELLED, turn: int = 1
) -> TurnCommitted | None:
    """Commit a turn of ``p`` that cancels steps ``cancelled`` and ends with ``status``."""
    error = None if status == SUCCESS else {"type": "CancelledError"}
    result = ok() if status == SUCCESS else None
    write = TurnWrite(
        turn=turn, at=T0, cancelled=cancelled, status=status, result=result, error=error
    )
    return store.commit_turn("p", write)


def finish_child(store: Store, child: str, record: bool = True) -> TurnCommitted | None:
    """Commit the turn in which ``child`` (at turn 1) gets its task's result and returns
    (``record``: record that result first)."""
    if record:
        store.record_outcome(child, 1, result=ok())
    write = TurnWrite(turn=1, at=T0, delivered=[1], status=SUCCESS, result=ok("7"))
    return store.commit_turn(child, write)


def wake_pending(store: Store, run_id: str) -> bool:
    with store.engine.connect() as conn:
        return bool(
            conn.execute(
                select(_schema.runs.c.wake_pending).where(_schema.runs.c.id == run_id)
            ).scalar_one()
        )


@pytest.mark.parametrize("status", [CANCELLED, SUCCESS], ids=["cancelled", "returned"])
def test_a_turn_cancelling_a_child_step_asks_the_child_to_cancel_in_the_same_commit(
    store: Store, status: str
) -> None:
    """Whether the parent was cancelled or returned leaving its child running."""
    [kid] = family(store)
    assert not wake_pending(store, kid)

    committed = end_parent(store, [1], status)

    assert committed is not None
    assert committed.cancelled_children == [(kid, KID, {"queue": "kids"})]
    assert [(c.kind, c.child_id) for c in committed.cancelled] == [("child", kid)]
    assert states(store, "p") == {1: STEP_CANCELLED}
    child = store.require_run(kid)
    assert (child.status, child.cancel_requested, child.cancel_turn) == (RUNNING, True, None)
    assert wake_pending(store, kid)
    # The child's next turn delivers the cancellation.
    begun = store.begin_turn(kid)
    assert begun is not None and begun.run.cancel_requested


def test_a_lost_wake_of_a_cancelled_child_is_sent_by_the_sweeper(
    store: Store, clock: DbClock
) -> None:
    [kid] = family(store)
    assert end_parent(store, [1]) is not None  # and the process dies before publishing
    assert store.runs_to_wake(older_than=10) == []
    clock.advance(11)
    assert [r.id for r in store.runs_to_wake(older_than=10)] == [kid]
    # Taken by this sweeper; the next one waits another period.
    assert store.runs_to_wake(older_than=10) == []


def test_a_lost_wake_of_a_child_whose_wake_was_already_pending_is_sent_too(
    store: Store, clock: DbClock
) -> None:
    [kid] = family(store)
    store.record_outcome(kid, 1, result=ok())  # sets the child's flag, wake lost
    committed = end_parent(store, [1])
    assert committed is not None and committed.cancelled_children == []  # flag was set
    assert store.require_run(kid).cancel_requested
    clock.advance(11)
    assert [r.id for r in store.runs_to_wake(older_than=10)] == [kid]


def test_cancelling_the_step_of_a_finished_child_leaves_the_child_alone(store: Store) -> None:
    [kid] = family(store)
    child_done = finish_child(store, kid)
    assert child_done is not None and child_done.parent is not None  # the parent's step DONE

    committed = end_parent(store, [1])  # the parent had not yet seen the child's end

    assert committed is not None and committed.cancelled_children == []
    assert [c.child_id for c in committed.cancelled] == [kid]
    child = store.require_run(kid)
    assert (child.status, child.cancel_requested) == (SUCCESS, False)


def test_a_child_asked_to_cancel_before_is_not_woken_again(store: Store) -> None:
    [kid] = family(store)
    assert store.request_cancel(kid) == (kid, KID, {"queue": "kids"})
    committed = end_parent(store, [1])
    assert committed is not None and committed.cancelled_children == []
    assert store.require_run(kid).cancel_requested


def test_a_stuck_child_is_asked_to_cancel_without_a_wake(store: Store) -> None:
    """It is retried some day and must then see that nobody waits for it."""
    [kid] = family(store)
    assert store.park(kid, 1, STUCK, {"type": "NonDeterminismError"})
    committed = end_parent(store, [1])
    assert committed is not None and committed.cancelled_children == []
    assert store.require_run(kid).cancel_requested


def test_a_fenced_out_turn_asks_no_child_to_cancel(store: Store) -> None:
    [kid] = family(store)
    assert end_parent(store, [1], turn=0) is None
    assert not store.require_run(kid).cancel_requested
    assert states(store, "p") == {1: SCHEDULED}


def test_request_cancel_refuses_finished_and_unknown_runs(store: Store) -> None:
    [kid] = family(store)
    assert finish_child(store, kid) is not None
    with pytest.raises(DurableError, match="already finished"):
        store.request_cancel(kid)
    with pytest.raises(WorkflowNotFoundError):
        store.request_cancel("nope")
    # The child's end flagged the parent's wake: asked, with that wake still to come.
    assert store.request_cancel("p") is None
    assert store.require_run("p").cancel_requested
    assert store.request_cancel("p") is None  # asked before: nothing more to do


def describe_end(run: RunRecord) -> dict[str, Any]:
    return {"type": "WorkflowTerminatedError", "message": f"{run.workflow}[{run.id}] ended"}


def test_terminate_ends_every_open_descendant_in_one_transaction(store: Store) -> None:
    kid, done, cancelled = family(store, children=3)
    [grandchild] = start_children(store, kid, 1, 1)
    assert finish_child(store, done) is not None
    # A child whose step the parent cancelled earlier may still be cleaning up.
    assert end_parent(store, [3], status=RUNNING, turn=1) is not None
    assert store.require_run(cancelled).cancel_requested

    ended = store.terminate("p", {"type": "WorkflowTerminatedError"}, describe_end)

    assert ended.runs == ["p", kid, cancelled, grandchild]
    assert ended.parent is None
    assert sorted(c.dispatch_id for c in ended.cancelled if c.kind == "activity") == [
        "dispatch-1",
        "dispatch-1",
        "dispatch-1",
    ]
    for run_id in ("p", kid, cancelled, grandchild):
        run = store.require_run(run_id)
        assert run.status == TERMINATED, run_id
        assert all(s.state in (STEP_CANCELLED, DELIVERED) for s in store.history(run_id))
    assert store.require_run("p").error == {"type": "WorkflowTerminatedError"}
    assert store.require_run(grandchild).error == describe_end(store.require_run(grandchild))
    assert store.require_run(done).status == SUCCESS  # a finished child: nothing to do
    assert states(store, "p") == {1: STEP_CANCELLED, 2: STEP_CANCELLED, 3: STEP_CANCELLED}
    # Nothing is left for a sweeper to wake or re-send.
    assert store.runs_to_wake(older_than=-1) == []
    assert store.stale_dispatches(older_than=-1) == []


def test_terminating_a_child_completes_its_parent_step_and_wakes_the_parent(
    store: Store,
) -> None:
    [kid] = family(store)
    [grandchild] = start_children(store, kid, 1, 1)

    ended = store.terminate(kid, {"type": "WorkflowTerminatedError", "message": "stop"})

    assert ended.runs == [kid, grandchild]
    assert ended.parent == ("p", "shop.checkout", {"queue": "wf"})
    [step] = store.history("p")
    assert (step.state, step.outcome, step.error) == (
        DONE,
        "error",
        {"type": "WorkflowTerminatedError", "message": "stop"},
    )
    assert store.require_run(grandchild).error == store.require_run(kid).error


def test_terminate_refuses_finished_and_unknown_runs(store: Store) -> None:
    [kid] = family(store)
    assert finish_child(store, kid) is not None
    with pytest.raises(DurableError, match="already finished"):
        store.terminate(kid, {"type": "E"})
    with pytest.raises(WorkflowNotFoundError):
        store.terminate("nope", {"type": "E"})
    assert store.require_run(kid).status == SUCCESS


def race(*actions: Callable[[], Any]) -> list[Any]:
    """Run ``actions`` at once, each in a thread; their results (or exceptions)."""
    barrier = threading.Barrier(len(actions))
    results: list[Any] = [None] * len(actions)

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = actions[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(actions))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
        assert not thread.is_alive(), "a racing transaction never ended"
    return results


#: Races per test on PostgreSQL: the old lock order deadlocked in more than half of them.
#: SQLite has one writer at a time and only needs its end states checked.
RACES = {"postgresql": 60, "sqlite": 15}


@pytest.mark.parametrize("ending", ["cancelled", "terminated"])
def test_a_parent_ending_while_its_children_finish_never_deadlocks(
    open_store: Callable[[], Store], ending: str
) -> None:
    """The parent's commit (cancelling its child steps) or termination races two children
    finishing, each commit on a connection of its own, many times; every end state is one
    that some order of the three transactions gives."""
    parent_store, *child_stores = open_store(), open_store(), open_store()
    for i in range(RACES[parent_store.dialect]):
        run_id = f"p-{i}"
        create(parent_store, run_id)
        assert parent_store.begin_turn(run_id) is not None
        kids = start_children(parent_store, run_id, 0, 2)
        for kid in kids:
            parent_store.record_outcome(kid, 1, result=ok())

        def end(run_id: str = run_id) -> Any:
            if ending == "terminated":
                return parent_store.terminate(run_id, {"type": "WorkflowTerminatedError"})
            write = TurnWrite(
                turn=1, at=T0, cancelled=[1, 2], status=CANCELLED, error={"type": "C"}
            )
            return parent_store.commit_turn(run_id, write)

        parent_end, *child_ends = race(
            end,
            *(
                lambda s=s, k=k: finish_child(s, k, False)
                for s, k in zip(child_stores, kids, strict=True)
            ),
        )

        for result in (parent_end, *child_ends):
            assert not isinstance(result, Exception), f"race {i}: {result!r}"
        parent = parent_store.require_run(run_id)
        assert parent.status == ending.upper()
        steps = {s.seq: s for s in parent_store.history(run_id)}
        assert {seq: s.state for seq, s in steps.items()} == {1: STEP_CANCELLED, 2: STEP_CANCELLED}
        for kid, child_end in zip(kids, child_ends, strict=True):
            child = parent_store.require_run(kid)
            if ending == "terminated":
                # The child's commit lands (and its end is on the parent's step until
                # the termination cancels it) or is fenced out by the termination.
                assert (child.status == TERMINATED) == (child_end is None), f"race {i}"
                assert (kid in parent_end.runs) == (child_end is None), f"race {i}"
            else:
                # The child always finishes (a cancel request does not fence its turn).
                # It was asked to cancel exactly when the parent committed first, and then
                # its end found the parent's step already closed (no outcome on it). Its
                # wake flag was set by its task's outcome: no wake of the parent's to send.
                assert child.status == SUCCESS and child_end is not None, f"race {i}"
                outcome = steps[child.parent_seq].outcome
                assert child.cancel_requested == (outcome is None), f"race {i}: {outcome}"
                assert parent_end.cancelled_children == [], f"race {i}"


def test_runs_to_wake_skips_a_run_another_transaction_holds(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweeper never waits for a run's row while holding others it took (PostgreSQL;
    SQLite has one writer at a time): waiting could close a cycle with a transaction
    that locks a parent, then its children."""
    clock = DbClock(postgres_url, monkeypatch, T0)
    sweeper = Store(postgres_url)
    try:
        create(sweeper, "held")
        create(sweeper, "free")
        clock.advance(11)
        with sweeper.engine.begin() as conn:
            conn.execute(
                select(_schema.runs.c.id).where(_schema.runs.c.id == "held").with_for_update()
            )
            assert [r.id for r in sweeper.runs_to_wake(older_than=10)] == ["free"]
        assert [r.id for r in sweeper.runs_to_wake(older_than=10)] == ["held"]
    finally:
        sweeper.dispose()
        clock.close()


# -- retrying stuck and failed runs -------------------------------------------------------


def test_resume_a_stuck_run(store: Store) -> None:
    start(store, "charge")
    store.record_outcome("run-1", 1, result=ok())
    store.begin_turn("run-1")
    assert store.park("run-1", 1, STUCK, {"type": "NonDeterminismError"})
    assert [r.id for r in store.stuck_runs()] == ["run-1"]

    assert store.resume("run-1") == STUCK

    run = store.require_run("run-1")
    assert (run.status, run.turn, run.error) == (RUNNING, 1, None)
    assert store.stuck_runs() == []
    # The outcome the stuck turn could not deliver is still there for the next turn.
    begun = store.begin_turn("run-1")
    assert begun is not None and [s.seq for s in begun.new_outcomes] == [1]


def test_resume_a_failed_run_rewinds_the_turn_that_failed(store: Store, clock: DbClock) -> None:
    start(store, "a", "b")
    assert store.claim_step("run-1", 2, "dispatch-2", "worker-a", 0)
    store.record_outcome("run-1", 1, result=ok('"a"'))
    store.record_outcome("run-1", 2, error={"type": "ValueError", "message": "b broke"})
    store.begin_turn("run-1")
    error = {"type": "ValueError", "message": "b broke"}
    assert commit(store, "run-1", 1, [1, 2], [], clock.advance(1), FAILURE, error=error)

    clock.advance(1)
    assert store.resume("run-1") == FAILURE

    run = store.require_run("run-1")
    assert (run.status, run.turn, run.error, run.finished_at) == (RUNNING, 1, None, None)
    a, b = store.history("run-1")
    assert (a.state, a.outcome, a.result, a.observed_turn) == (DONE, "ok", b'"a"', None)
    assert (b.state, b.outcome, b.error, b.claimed_by) == (SCHEDULED, None, None, None)
    assert b.dispatch_id != "dispatch-2"
    assert [(d.seq, d.dispatch_id) for d in store.dispatches_to_resend("run-1")] == [
        (2, b.dispatch_id)
    ]
    # The new dispatch runs; the old message may not.
    assert not store.claim_step("run-1", 2, "dispatch-2", "worker-a", 0)
    assert store.claim_step("run-1", 2, b.dispatch_id, "worker-a", 0)


def test_resume_a_run_that_failed_in_its_first_turn(store: Store) -> None:
    create(store)
    store.begin_turn("run-1")
    assert commit(store, "run-1", 0, [], [], T0, FAILURE, error={"type": "TypeError"})
    assert store.resume("run-1") == FAILURE
    run = store.require_run("run-1")
    assert (run.status, run.turn) == (PENDING, 0)


def test_resume_refuses_a_failed_turn_that_scheduled_steps(store: Store) -> None:
    create(store)
    store.begin_turn("run-1")
    assert commit(store, "run-1", 0, [], new_steps("a"), T0, FAILURE, error={"type": "E"})
    with pytest.raises(DurableError, match="cannot be rewound"):
        store.resume("run-1")
    assert store.require_run("run-1").status == FAILURE


@pytest.mark.parametrize("status", [RUNNING, SUCCESS])
def test_resume_refuses_runs_that_are_not_stuck_or_failed(store: Store, status: str) -> None:
    start(store, "a")
    if status == SUCCESS:
        store.record_outcome("run-1", 1, result=ok())
        assert commit(store, "run-1", 1, [1], [], T0, SUCCESS, result=ok())
    with pytest.raises(DurableError, match=f"run-1.*is {status}"):
        store.resume("run-1")


def test_resume_of_a_missing_run(store: Store) -> None:
    with pytest.raises(WorkflowNotFoundError):
        store.resume("nope")


# -- schema and connections ---------------------------------------------------------------


def test_schema_is_created_with_its_version(store: Store) -> None:
    store.ensure_schema()
    with store.engine.connect() as conn:
        version = conn.execute(
            select(_schema.meta.c.value).where(_schema.meta.c.key == "schema_version")
        ).scalar_one()
    assert version == str(_schema.SCHEMA_VERSION)


def test_a_second_store_on_the_same_database_reuses_the_schema(
    open_store: Callable[[], Store],
) -> None:
    first = open_store()
    create(first)
    second = open_store()
    assert second.require_run("run-1").workflow == "shop.checkout"


def test_a_newer_schema_is_refused_with_advice(open_store: Callable[[], Store]) -> None:
    first = open_store()
    first.ensure_schema()
    with first.engine.begin() as conn:
        conn.execute(
            update(_schema.meta)
            .where(_schema.meta.c.key == "schema_version")
            .values(value=str(_schema.SCHEMA_VERSION + 1))
        )
    newer = open_store()
    with pytest.raises(DurableError, match="newer than this celery_durable") as caught:
        newer.get_run("run-1")
    assert "upgrade celery_durable" in str(caught.value)


def test_an_unreachable_database_raises_store_unavailable() -> None:
    store = Store("postgresql+psycopg://durable:s3cret@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            store.get_run("run-1")
    finally:
        store.dispose()
    message = str(caught.value)
    assert "127.0.0.1:1/nowhere" in message
    assert "s3cret" not in message
    assert "durable_database_url" in message
    assert isinstance(caught.value, ConnectionError)


def test_an_sqlite_path_that_cannot_be_created_raises_store_unavailable() -> None:
    with pytest.raises(StoreUnavailableError, match="durable_database_url") as caught:
        Store("sqlite:////proc/no-such-dir/durable.sqlite3").get_run("run-1")
    assert "/proc/no-such-dir" in str(caught.value)


def _tables_of_version(version: int) -> MetaData:
    """The tables as schema ``version`` had them: no column added since, renamed columns
    under their old names, and no index on a column that did not exist yet."""
    added = {
        column
        for since, columns in _schema.ADDED_COLUMNS.items()
        if since > version
        for column in columns
    }
    renamed = {
        (table, new): old
        for since, renames in _schema.RENAMED_COLUMNS.items()
        if since > version
        for table, old, new in renames
    }
    old = MetaData()
    for table in (_schema.meta, _schema.runs, _schema.steps, _schema.workers):
        columns = []
        for column in table.columns:
            if (table.name, column.name) in added:
                continue
            copy = column._copy()
            copy.name = copy.key = renamed.get((table.name, column.name), column.name)
            columns.append(copy)
        Table(table.name, old, *columns)
    # The indexes that later versions dropped, as the versions before had them.
    steps = old.tables["durable_steps"]
    if version < 6:
        Index("ix_durable_steps_state_dispatched", steps.c.state, steps.c.dispatched_at)
        if "due_at" in steps.c:
            Index("ix_durable_steps_state_due", steps.c.state, steps.c.due_at)
    return old


@pytest.mark.parametrize("version", range(1, _schema.SCHEMA_VERSION))
def test_an_older_store_is_upgraded_in_place_and_keeps_its_runs(url: str, version: int) -> None:
    old = _tables_of_version(version)
    wake_column = "woken_at" if version < 4 else "wake_sent_at"
    engine = create_engine(url)
    with engine.begin() as conn:
        old.create_all(conn)
        conn.execute(
            insert(old.tables["durable_meta"]).values(key="schema_version", value=str(version))
        )
        conn.execute(
            insert(old.tables["durable_runs"]).values(
                id="old-run",
                workflow="shop.checkout",
                status=RUNNING,
                turn=2,
                wake_pending=False,
                **{wake_column: 5.0},
                content_type=JSON,
                input=b"[[], {}]",
                options={},
                created_at=1.0,
                updated_at=1.0,
            )
        )
        # Before version 4 a timer kept its deadline in dispatched_at.
        deadline = {"due_at": 7.0} if version >= 4 else {}
        conn.execute(
            insert(old.tables["durable_steps"]).values(
                **deadline,
                run_id="old-run",
                seq=1,
                kind="timer",
                name="timer",
                created_turn=2,
                state=SCHEDULED,
                dispatch_id="t-1",
                dispatched_at=7.0,
                redispatches=0,
                attempts=0,
                content_type=JSON,
                input=b"null",
            )
        )
        # A task's message out since 7.0, never claimed (from version 6 on, the step
        # says since when it may go stale itself).
        stall = {"stall_from": 7.0} if version >= 6 else {}
        conn.execute(
            insert(old.tables["durable_steps"]).values(
                **stall,
                run_id="old-run",
                seq=2,
                kind="activity",
                name="charge",
                created_turn=2,
                state=SCHEDULED,
                dispatch_id="d-2",
                dispatched_at=7.0,
                redispatches=0,
                attempts=0,
                content_type=JSON,
                input=b"[[], {}, {}]",
            )
        )
    engine.dispose()

    store = Store(url)
    try:
        run = store.require_run("old-run")  # reading needs the new columns
        assert (run.status, run.turn, run.attempt, run.seq_base) == (RUNNING, 2, 1, 0)
        assert (run.incarnation, run.cancel_at, run.parent_id) == (0, None, None)
        timer, _task = store.history("old-run")
        assert timer.due_at == 7.0
        with store.engine.connect() as conn:
            stored = conn.execute(
                select(_schema.meta.c.value).where(_schema.meta.c.key == "schema_version")
            ).scalar_one()
            inspector = inspect(conn)
            columns = {c["name"] for c in inspector.get_columns("durable_runs")}
            wake_sent_at = conn.execute(select(_schema.runs.c.wake_sent_at)).scalar_one()
            indexes = {i["name"] for i in inspector.get_indexes("durable_steps")}
            run_indexes = {i["name"] for i in inspector.get_indexes("durable_runs")}
            step_columns = {c["name"] for c in inspector.get_columns("durable_steps")}
            worker_columns = {c["name"] for c in inspector.get_columns("durable_workers")}
        assert stored == str(_schema.SCHEMA_VERSION)
        assert {"cancel_at", "parent_id", "progress", "incarnation", "wake_sent_at"} <= columns
        assert "woken_at" not in columns
        assert wake_sent_at == 5.0
        # Version 6 replaced the steps' indexes with ones that match the sweeper's queries.
        assert {"ix_durable_steps_state_kind_due", "ix_durable_steps_stall"} <= indexes
        assert not {"ix_durable_steps_state_due", "ix_durable_steps_state_dispatched"} & indexes
        assert {"ix_durable_runs_finished_roots", "ix_durable_runs_parent"} <= run_indexes
        assert {"due_at", "renewed_at", "losses"} <= step_columns
        assert "clean_stop" in worker_columns
        # The timer fires from its upgraded deadline, the message goes stale from when it
        # was sent.
        assert store.fire_due_timers() == [("old-run", "shop.checkout", {})]
        assert [(d.run_id, d.seq) for d in store.stale_dispatches(10)] == [("old-run", 2)]
    finally:
        store.dispose()


def test_only_a_lost_connection_reads_as_an_unreachable_store() -> None:
    import psycopg
    from sqlalchemy.exc import OperationalError

    from celery_durable.store._base import _lost_connection

    def wrapped(orig: Exception) -> OperationalError:
        return OperationalError("SELECT 1", {}, orig)

    closed = wrapped(psycopg.OperationalError("server closed the connection unexpectedly"))
    assert _lost_connection(closed, "postgresql")
    assert _lost_connection(wrapped(psycopg.errors.AdminShutdown("shutting down")), "postgresql")
    # A deadlock or a lock timeout came over a live connection: the store is reachable.
    assert not _lost_connection(wrapped(psycopg.errors.DeadlockDetected("x")), "postgresql")
    assert not _lost_connection(wrapped(psycopg.errors.LockNotAvailable("x")), "postgresql")
    assert not _lost_connection(wrapped(psycopg.OperationalError("database is locked")), "sqlite")
