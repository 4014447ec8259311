"""Rebuild a suspended workflow from its history, checking that the code still agrees.

Replay re-runs every committed turn in order: turn ``t`` delivers exactly the outcomes
that were first delivered in turn ``t`` and must issue exactly the steps that turn ``t``
scheduled. Anything else means the code changed under a running workflow, and the run is
stopped with a :class:`~celery_durable.errors.NonDeterminismError` instead of being fed
results that belong to different steps.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime

from ._commands import (
    ActivityResolved,
    Command,
    CompleteWorkflow,
    FailWorkflow,
    HistoryStep,
    ScheduleActivity,
)
from ._instance import WorkflowInstance
from .errors import NonDeterminismError

__all__ = ["replay"]


def replay(
    instance: WorkflowInstance,
    history: Sequence[HistoryStep],
    turns: int,
    turn_times: Mapping[int, datetime],
) -> None:
    """Run ``instance`` through turns ``1..turns`` of ``history``.

    Raises:
        NonDeterminismError: the code issued a step that differs from the recorded one,
            issued one too many or too few, or finished where history continued.
    """
    created: dict[int, list[HistoryStep]] = defaultdict(list)
    delivered: dict[int, list[ActivityResolved]] = defaultdict(list)
    for step in sorted(history, key=lambda s: s.seq):
        created[step.created_turn].append(step)
        if step.observed_turn is not None and step.outcome is not None:
            delivered[step.observed_turn].append(step.outcome)

    for turn in range(1, turns + 1):
        now = turn_times.get(turn, instance.now)
        commands = instance.activate(delivered.get(turn, []), now)
        _check_turn(instance, turn, commands, created.get(turn, []))


def _check_turn(
    instance: WorkflowInstance,
    turn: int,
    commands: list[Command],
    recorded: list[HistoryStep],
) -> None:
    run = f"workflow {instance.info.name}[{instance.info.workflow_id}]"
    scheduled = [c for c in commands if isinstance(c, ScheduleActivity)]
    for index, step in enumerate(recorded):
        if index >= len(scheduled):
            raise NonDeterminismError(
                f"{run}: replay of turn {turn} did not schedule step {step.seq}, which "
                f"history records as {step.kind} {step.name!r}. The code changed under a "
                "running workflow; restore the old path (or guard the change with a "
                "version check) and retry the run."
            )
        issued = scheduled[index]
        if issued.seq != step.seq or issued.kind != step.kind or issued.name != step.name:
            raise NonDeterminismError(
                f"{run}: step {step.seq} is {step.kind} {step.name!r} in history but the "
                f"code now schedules {issued.kind} {issued.name!r} there. Deploy code that "
                "schedules the same steps in the same order (or version the change) and "
                "retry the run."
            )
    if len(scheduled) > len(recorded):
        extra = scheduled[len(recorded)]
        raise NonDeterminismError(
            f"{run}: replay of turn {turn} scheduled step {extra.seq} ({extra.kind} "
            f"{extra.name!r}), which history does not have. The code changed under a "
            "running workflow; restore the old path (or version the change) and retry."
        )
    finished = [c for c in commands if isinstance(c, (CompleteWorkflow, FailWorkflow))]
    if finished:
        raise NonDeterminismError(
            f"{run}: replay of turn {turn} finished the workflow, but history shows it "
            "continued. The code changed under a running workflow; restore the old path "
            "and retry the run."
        )
