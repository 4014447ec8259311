"""Rebuild a suspended workflow from its history, checking that the code still agrees.

Replay re-runs every committed turn in order: turn ``t`` delivers exactly the outcomes
that were first delivered in turn ``t`` (and the cancellation, if it came then) and must
issue exactly the steps that turn ``t`` scheduled. Anything else means the code changed
under a running workflow, and the run is stopped with a
:class:`~celery_durable.errors.NonDeterminismError` instead of being fed results that
belong to different steps. Patch markers (``workflow.patched``) the code no longer asks
about are the one allowed difference: that is how a patch is retired.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime

from ..errors import NonDeterminismError
from ._commands import (
    PATCH,
    CompleteWorkflow,
    ContinueAsNew,
    FailWorkflow,
    HistoryStep,
    StepOutcome,
)
from ._instance import WorkflowInstance

__all__ = ["replay"]


def replay(
    instance: WorkflowInstance,
    history: Sequence[HistoryStep],
    turns: int,
    turn_times: Mapping[int, datetime],
    cancel_turn: int | None = None,
) -> None:
    """Run ``instance`` through turns ``1..turns`` of ``history``.

    Raises:
        NonDeterminismError: the code issued a step that differs from the recorded one,
            issued one too many or too few, or finished where history continued.
    """
    created: dict[int, dict[int, HistoryStep]] = defaultdict(dict)
    delivered: dict[int, list[StepOutcome]] = defaultdict(list)
    for step in sorted(history, key=lambda s: s.seq):
        created[step.created_turn][step.seq] = step
        if step.observed_turn is not None and step.outcome is not None:
            delivered[step.observed_turn].append(step.outcome)

    instance.recorded = {step.seq: (step.kind, step.name) for step in history}
    instance.replaying = True
    try:
        for turn in range(1, turns + 1):
            now = turn_times.get(turn, instance.now)
            commands = instance.activate(delivered.get(turn, []), now, cancel=turn == cancel_turn)
            _check_turn(instance, turn, commands, created.get(turn, {}))
    except BaseException:
        instance.replaying = False
        instance.close()  # nobody will resume it; its finally blocks must not run later
        raise
    finally:
        instance.replaying = False


def _check_turn(
    instance: WorkflowInstance,
    turn: int,
    commands: Sequence[object],
    recorded: dict[int, HistoryStep],
) -> None:
    run = f"workflow {instance.info.name}[{instance.info.workflow_id}]"
    # Code that raises while replaying (a broken import, a bug in a deploy) diverges
    # because of it: say what it raised, since that is what needs fixing.
    failed = next((c.error for c in commands if isinstance(c, FailWorkflow)), None)

    def diverged(message: str) -> NonDeterminismError:
        if failed is None:
            return NonDeterminismError(message)
        error = NonDeterminismError(
            f"{message} Replaying it raised {type(failed).__name__}: {failed}"
        )
        error.__cause__ = failed
        return error

    issued = {c.seq: c for c in commands if hasattr(c, "seq") and hasattr(c, "kind")}
    for seq, step in sorted(recorded.items()):
        command = issued.get(seq)
        if command is None:
            if step.kind == PATCH:
                continue  # a retired patch
            raise diverged(
                f"{run}: replay of turn {turn} did not schedule step {seq}, which history "
                f"records as {step.kind} {step.name!r}. The code changed under a running "
                "workflow; restore the old path (or guard the change with "
                "workflow.patched()) and retry the run."
            )
        kind, name = getattr(command, "kind"), getattr(command, "name")  # noqa: B009
        if kind != step.kind or name != step.name:
            raise diverged(
                f"{run}: step {seq} is {step.kind} {step.name!r} in history but the code "
                f"now schedules {kind} {name!r} there. Deploy code that schedules the same "
                "steps in the same order (or guard the change with workflow.patched()) "
                "and retry the run."
            )
    for seq, command in sorted(issued.items()):
        if seq not in recorded:
            raise diverged(
                f"{run}: replay of turn {turn} scheduled step {seq} "
                f"({getattr(command, 'kind')} {getattr(command, 'name')!r}), which history "  # noqa: B009
                "does not have. The code changed under a running workflow; restore the old "
                "path (or guard the change with workflow.patched()) and retry."
            )
    if any(isinstance(c, (CompleteWorkflow, FailWorkflow, ContinueAsNew)) for c in commands):
        raise diverged(
            f"{run}: replay of turn {turn} finished the workflow, but history shows it "
            "continued. The code changed under a running workflow; restore the old path "
            "and retry the run."
        )
