"""Assertions about what a run left behind: its history and its side effects.

None of them depends on timing: a kill may land anywhere inside the window a test opens,
and the bounds hold wherever it lands.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from celery_durable.store import DELIVERED, StepRecord

from .cluster import Cluster
from .wfapp import record, step_value

RECORD = record.name


@dataclass(frozen=True)
class ExpectedStep:
    """What step ``seq`` of a run must be: which task, with which arguments, returning what."""

    name: str
    args: list[Any]
    result: Any


def sequential_steps(n: int) -> list[ExpectedStep]:
    """The steps of ``wfapp.sequential(n)``: each adds ``3i + 1`` to the previous result."""
    steps, total = [], 0
    for i in range(n):
        steps.append(ExpectedStep(RECORD, [i, total], total + step_value(i)))
        total += step_value(i)
    return steps


def sequential_result(n: int) -> int:
    return sum(step_value(i) for i in range(n))


def fan_out_steps(n: int) -> list[ExpectedStep]:
    """The steps of ``wfapp.fan_out(n)``: ``n`` in parallel, then one taking their sum."""
    total = sum(step_value(i) for i in range(n))
    return [ExpectedStep(RECORD, [i], step_value(i)) for i in range(n)] + [
        ExpectedStep(RECORD, [n, total], total + step_value(n))
    ]


def fan_out_result(n: int) -> int:
    return sum(step_value(i) for i in range(n + 1))


def assert_delivered_once(
    cluster: Cluster, run_id: str, expected: list[ExpectedStep]
) -> list[StepRecord]:
    """The run's history is exactly ``expected``: seqs 1..N without gaps or extras, each
    step's arguments and recorded result right, and each outcome delivered to the
    workflow in exactly one committed turn, after the turn that scheduled it."""
    history = cluster.handle(run_id).history
    assert [s.seq for s in history] == list(range(1, len(expected) + 1)), (
        f"steps of run {run_id} are {[s.seq for s in history]}, expected 1..{len(expected)}"
    )
    for step, want in zip(history, expected, strict=True):
        got = (step.name, step.args, step.state, step.result, step.error)
        assert got == (want.name, want.args, DELIVERED, want.result, None), (
            f"step {step.seq} of run {run_id}"
        )
    run = cluster.store.require_run(run_id)
    records = cluster.store.history(run_id)
    for r in records:
        assert r.observed_turn is not None and r.created_turn < r.observed_turn <= run.turn, (
            f"step {r.seq} of run {run_id}: created in turn {r.created_turn}, delivered in "
            f"turn {r.observed_turn}, run at turn {run.turn}"
        )
    return records


def assert_sequential_turns(cluster: Cluster, records: list[StepRecord], run_id: str) -> None:
    """A sequential run took exactly one committed turn per outcome: turn k delivered
    step k-1 and scheduled step k, and nothing else ever committed."""
    turns = [(r.created_turn, r.observed_turn) for r in records]
    assert turns == [(seq, seq + 1) for seq in range(1, len(records) + 1)]
    assert cluster.store.require_run(run_id).turn == len(records) + 1


def assert_fan_out_turns(cluster: Cluster, records: list[StepRecord], run_id: str) -> None:
    """A fan-out run scheduled its ``n`` steps in turn 1 and the last step in the turn that
    delivered the last of them, and finished in the turn that delivered that one."""
    *parallel, last = records
    assert {r.created_turn for r in parallel} == {1}
    assert last.created_turn == max(r.observed_turn or 0 for r in parallel)
    assert cluster.store.require_run(run_id).turn == last.observed_turn


def assert_side_effects(
    cluster: Cluster,
    run_id: str,
    indexes: Iterable[int],
    exactly: Mapping[int, int] | None = None,
    at_least: Mapping[int, int] | None = None,
) -> None:
    """Each activity of ``indexes`` ran at least once and at most once per kill more; no
    other activity ran for the run. ``exactly`` pins counts the test's kills determine
    (an activity killed while running must have run exactly twice, and so on);
    ``at_least`` gives lower bounds where only those are determined."""
    counts = {i: c for (run, i), c in cluster.effects().items() if run == run_id}
    wanted = set(indexes)
    assert set(counts) <= wanted, f"unexpected activities ran: {sorted(set(counts) - wanted)}"
    never = sorted(wanted - set(counts))
    assert not never, f"activities of run {run_id} that never ran: {never}"
    bound = 1 + cluster.kills
    too_often = {i: c for i, c in counts.items() if c > bound}
    assert not too_often, f"activities ran more than {bound} times (1 + kills): {too_often}"
    if exactly is not None:
        wrong = {i: (counts.get(i, 0), c) for i, c in exactly.items() if counts.get(i, 0) != c}
        assert not wrong, f"(ran, expected) counts that differ: {wrong}"
    if at_least is not None:
        low = {i: (counts.get(i, 0), c) for i, c in at_least.items() if counts.get(i, 0) < c}
        assert not low, f"(ran, expected at least) counts too low: {low}"


def once_except(n: int, twice: Iterable[int] = ()) -> dict[int, int]:
    """Counts for ``exactly=``: every index of ``range(n)`` once, those in ``twice`` twice."""
    again = set(twice)
    return {i: 2 if i in again else 1 for i in range(n)}
