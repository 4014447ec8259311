"""How Celery reads a canvas, as the walk uses it: pure functions, no loop, no worker."""

from __future__ import annotations

import inspect
import json

import pytest
from celery import Signature, chain, chord, group
from celery.canvas import _chain, chunks

from celery_durable import canvas
from celery_durable.canvas._shapes import (
    chain_steps,
    chord_error_calls,
    copy_canvas,
    group_members,
    to_data,
    yields_group,
)


def s(name: str, *args: object) -> Signature:
    return Signature(name, args)


def names(steps: list[Signature]) -> list[str]:
    return [f"{type(step).__name__}:{step.task}" for step in steps]


def test_to_data_is_json_and_rebuilds_every_type_with_generators_materialized() -> None:
    sig = chain(
        s("a"),
        group(s("b", i) for i in range(3)),  # a generator, kept lazily by Celery
        s("c").on_error(s("eb")),
        chord([s("d")], s("e")),
    )
    data = to_data(sig)
    assert json.loads(json.dumps(data)) == json.loads(json.dumps(to_data(copy_canvas(data))))
    copy = copy_canvas(json.loads(json.dumps(data)))
    assert isinstance(copy, _chain)
    [_, upgraded, last] = copy.tasks  # group | c became a chord as the chain was built
    assert isinstance(upgraded, chord) and isinstance(last, chord)
    assert [list(m.args) for m in upgraded.tasks] == [[0], [1], [2]]
    assert upgraded.body.options["link_error"] == [s("eb")]


def test_to_data_leaves_task_arguments_alone() -> None:
    value = (1, {"nested": [2, 3]})
    assert to_data(Signature("a", value))["args"] == value
    assert to_data(Signature("a", value))["args"][1] is value[1]


def test_chain_steps_splice_unroll_drop_and_upgrade_as_prepare_steps_does() -> None:
    tasks = [
        s("a"),
        chain(s("b"), s("c")),  # spliced
        group([]),  # dropped
        group(s("d")),  # unrolled to d
        group(s("e"), s("f")),  # followed by g: a chord with body g
        s("g"),
        group(s("h"), s("i")),  # last: stays a group
    ]
    steps = chain_steps(tasks)
    assert names(steps) == [
        "Signature:a",
        "Signature:b",
        "Signature:c",
        "Signature:d",
        "_chord:celery.chord",
        "group:celery.group",
    ]
    assert steps[4].body.task == "g"
    assert names(chain_steps([group([]), group([])])) == ["group:celery.group"]


def test_a_chains_errbacks_reach_every_step_and_a_chords_body_only() -> None:
    steps = chain_steps([s("a"), group(s("b"), s("c")), s("d")], errbacks=[s("eb")])
    first, upgraded = steps
    assert first.options["link_error"] == [s("eb")]
    assert upgraded.body.options["link_error"] == [s("eb")]
    assert all("link_error" not in member.options for member in upgraded.tasks)


def test_group_members_flatten_nested_groups_and_skip_empty_chains() -> None:
    members = group_members([s("a"), group(s("b"), group(s("c"))), chain()])
    assert [m.task for m in members] == ["a", "b", "c"]


@pytest.mark.parametrize(
    ("sig", "expected"),
    [
        (s("a"), False),
        (group(s("a")), True),
        (chunks(s("a"), [(1,)], 1), True),
        (chain(s("a"), group(s("b"), s("c"))), True),
        (chain(s("a"), group(s("b"))), False),  # a group of one is unrolled in a chain
        (chain(group(s("b"), s("c")), s("d")), False),  # a chord ending in d
        (chord([s("a")], group(s("b"), s("c"))), True),
    ],
)
def test_yields_group(sig: Signature, expected: bool) -> None:
    assert yields_group(sig) is expected


def test_chord_error_calls_follow_chord_error_from_stack() -> None:
    body = s("total")
    body.link_error(s("eb"))
    [call] = chord_error_calls(body)
    assert call["errbacks"] == [to_data(s("eb"))]
    assert call["request"]["task"] == "total"
    group_body = group(s("x").on_error(s("ex")), s("y")).on_error(s("eg"))
    calls = chord_error_calls(group_body)
    assert [c["request"]["task"] for c in calls] == ["x", "y"]
    assert [len(c["errbacks"]) for c in calls] == [2, 1]
    assert chord_error_calls(s("no errbacks")) == []


def test_the_canvas_module_exports_are_pinned_and_documented() -> None:
    assert canvas.__all__ == ["CANVAS_WORKFLOW", "DurableCanvas", "durable", "install"]
    for name in ["DurableCanvas", "durable", "install"]:
        assert inspect.getdoc(getattr(canvas, name)), name
    for name, member in vars(canvas.DurableCanvas).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            assert inspect.getdoc(member), name
    assert inspect.getdoc(canvas)
