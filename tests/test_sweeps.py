# The store's fixtures (store, clock, url, open_store) come from test_store, and pytest
# passes them by parameter name: ruff takes each parameter for a redefinition.
# ruff: noqa: F811
"""The sweeper's selections at scale and their lock order, on SQLite and PostgreSQL.

Every selection is filtered, ordered and limited in SQL, so work that is due is reached
however much is waiting that is not; and firing a timer takes the run's row before the
step's, like every other transaction (no deadlock with a turn's commit).
"""

from __future__ import annotations

from collections.abc import Callable

from dbclock import DbClock as Clock
from test_store import (  # noqa: F401 - fixtures
    JSON,
    RACES,
    T0,
    clock,
    commit,
    create,
    new_steps,
    ok,
    open_store,
    race,
    start,
    states,
    store,
    url,
)

from celery_durable.errors import UnknownWorkflowError
from celery_durable.store import (
    STEP_CANCELLED,
    STUCK,
    LossPolicy,
    NewStep,
    Store,
    TurnWrite,
    WorkerInfo,
)

#: The sweeper's stall timeout in these tests, and how often it sweeps.
STALL = 10.0
EVERY = 5.0


def test_undeliverable_steps_never_hold_back_another_runs_lost_message(
    store: Store, clock: Clock
) -> None:
    """2,000 steps routed to a queue nobody consumes are re-sent ever less often (their
    backoff); a message lost meanwhile by another run is still re-sent within one stall
    timeout and one sweep, though the sweep takes at most 1,000 steps."""
    start(store, *["to-a-mistyped-queue"] * 2000, run_id="stray")
    for _ in range(int(600 / EVERY)):  # ten minutes of sweeps: the copies back off
        clock.advance(EVERY)
        store.stale_dispatches(older_than=STALL)
    start(store, "charge", run_id="victim")  # its message is lost at once
    sent = clock.now
    resent_at = None
    while resent_at is None and clock.now < sent + 10 * STALL:
        clock.advance(EVERY)
        taken = store.stale_dispatches(older_than=STALL)
        if any(d.run_id == "victim" for d in taken):
            resent_at = clock.now
    assert resent_at is not None and resent_at - sent <= STALL + EVERY, resent_at


def test_stale_copies_back_off_by_doubling_before_the_limit(store: Store, clock: Clock) -> None:
    """The backoff is applied in SQL: a limit of one still finds the one step due."""
    start(store, "a", run_id="early")
    clock.advance(11)
    assert [d.run_id for d in store.stale_dispatches(STALL, limit=1)] == ["early"]
    start(store, "b", run_id="late")  # sent after early's copy
    clock.advance(11)
    # early's next copy waits 20 s; late is due now and is reached with limit 1.
    assert [d.run_id for d in store.stale_dispatches(STALL, limit=1)] == ["late"]
    clock.advance(10)
    assert [d.run_id for d in store.stale_dispatches(STALL, limit=1)] == ["early"]


def _timer(store: Store, run_id: str, workflow: str, due_in: float) -> None:
    create(store, run_id, workflow)
    assert store.begin_turn(run_id) is not None
    step = NewStep(1, "timer", "sleep", JSON, b"null", f"t-{run_id}", due_in=due_in)
    assert commit(store, run_id, 0, [], [step], T0)


def test_due_timers_of_other_apps_do_not_hold_back_ours(store: Store, clock: Clock) -> None:
    for i in range(3):
        _timer(store, f"theirs-{i}", "other.app.poll", 1)
    _timer(store, "mine", "shop.checkout", 2)
    clock.advance(5)
    wakes = store.fire_due_timers(limit=2, workflows=["shop.checkout"])
    assert [w[0] for w in wakes] == ["mine"]
    # Oldest deadline first.
    assert [w[0] for w in store.fire_due_timers(limit=2)] == ["theirs-0", "theirs-1"]


def test_stuck_runs_are_filtered_in_sql_before_the_limit(store: Store, clock: Clock) -> None:
    unknown = {"type": UnknownWorkflowError.__name__, "message": "nobody knows it"}
    for i in range(3):
        create(store, f"bad-deploy-{i}")
        assert store.park(f"bad-deploy-{i}", 0, STUCK, {"type": "NonDeterminismError"})
        clock.advance(1)
    create(store, "unknown", workflow="shop.refund")
    assert store.park("unknown", 0, STUCK, unknown)
    create(store, "unknown-elsewhere", workflow="billing.invoice")
    assert store.park("unknown-elsewhere", 0, STUCK, unknown)

    found = store.stuck_runs(limit=1, unknown_to=["shop.refund"])
    assert [r.id for r in found] == ["unknown"]
    # Without the filter: every stuck run, the longest stuck first.
    assert [r.id for r in store.stuck_runs(limit=2)] == ["bad-deploy-0", "bad-deploy-1"]


def test_runs_to_wake_reaches_due_runs_past_ones_of_other_workflows(
    store: Store, clock: Clock
) -> None:
    for i in range(3):
        create(store, f"theirs-{i}", workflow="billing.invoice")
    start(store, "a", run_id="mine")
    store.record_outcome("mine", 1, result=ok())
    clock.advance(11)
    woken = store.runs_to_wake(STALL, limit=1, workflows=["shop.checkout"])
    assert [r.id for r in woken] == ["mine"]


def test_expired_claims_are_released_oldest_first_within_the_limit(
    store: Store, clock: Clock
) -> None:
    start(store, "a", "b", "c")
    for seq in (1, 2, 3):
        assert store.claim_step("run-1", seq, f"dispatch-{seq}", "worker-a", 0)
        clock.advance(1)
    store.heartbeat(WorkerInfo("worker-a", "host-a", 1))
    store.renew_leases("worker-a", ["dispatch-1"])  # 1 is still held
    clock.advance(30)
    store.release_expired_claims(30, LossPolicy(), limit=1)
    assert states(store) == {1: "CLAIMED", 2: "SCHEDULED", 3: "CLAIMED"}


def test_firing_timers_while_turns_cancel_them_never_deadlocks(
    open_store: Callable[[], Store], clock: Clock
) -> None:
    """``asyncio.wait_for`` timing out as its step finishes: the turn that delivers the
    step's outcome cancels the timer while the sweeper fires it, each on a connection of
    its own, many times. Both take the run's row first, so neither can wait for the other
    while holding what the other needs."""
    turns, sweeper = open_store(), open_store()
    for i in range(RACES[turns.dialect]):
        run_id = f"r-{i}"
        create(turns, run_id)
        assert turns.begin_turn(run_id) is not None
        timer = NewStep(2, "timer", "wait_for", JSON, b"null", f"t-{i}", due_in=5)
        assert commit(turns, run_id, 0, [], [*new_steps("charge"), timer], clock.now)
        turns.record_outcome(run_id, 1, result=ok())
        clock.advance(6)
        assert turns.begin_turn(run_id) is not None
        write = TurnWrite(turn=1, at=clock.now, delivered=[1], cancelled=[2])

        committed, fired = race(
            lambda w=write, r=run_id: turns.commit_turn(r, w), sweeper.fire_due_timers
        )

        for result in (committed, fired):
            assert not isinstance(result, Exception), f"race {i}: {result!r}"
        assert committed is not None, f"race {i}"
        # Fired first or not at all, the turn's cancel closes the timer.
        assert states(turns, run_id) == {1: "DELIVERED", 2: STEP_CANCELLED}, f"race {i}"
