"""Tasks of the canvas integration tests, and the canvases they are arranged in.

Workers import this module with ``--include`` (see ``test_canvas.CanvasWorker``). Every
task takes an index ``i``, unique within a canvas, and logs one side effect under it
per execution (in ``wfapp``'s ``effects.log``), so a test can count how many times each
task of a canvas ran. ``hold=True`` blocks the task the first time it runs (see
``wfapp.pause_once``; the pause point is ``canvas-<i>``).

Each shape comes with the value Celery gives for it, computed here by hand (the unit
tests check every shape against Celery itself, and ``test_canvas`` runs these once on
plain Celery with a Redis result backend).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, chain, chord, group, shared_task
from celery.canvas import Signature

from .wfapp import _append_effect, configure, pause_once, step_value


def _effect(task: Any, i: int, hold: bool) -> None:
    run_id = task.request.get("durable_run") or "no-run"
    _append_effect(f"{run_id}\t{i}\t{os.getpid()}\n")
    if hold:
        pause_once(run_id, f"canvas-{i}")


def total(value: Any) -> int:
    """The sum of a (nested) list of ints, or the int itself."""
    return sum(total(v) for v in value) if isinstance(value, list) else int(value)


@shared_task(bind=True, name="canvas_it.leaf")
def leaf(self: Any, i: int, hold: bool = False) -> int:
    """A header task: ``3i + 1``."""
    _effect(self, i, hold)
    return step_value(i)


@shared_task(bind=True, name="canvas_it.combine")
def combine(self: Any, value: Any, i: int, hold: bool = False) -> int:
    """A chain step or chord body: what came before (an int or a list of them), plus
    ``3i + 1``."""
    _effect(self, i, hold)
    return total(value) + step_value(i)


@shared_task(bind=True, name="canvas_it.note")
def note(self: Any, value: Any, i: int) -> int:
    """A ``link`` callback: records that it ran."""
    _effect(self, i, False)
    return total(value)


@dataclass
class Shape:
    """A canvas, the indexes of its tasks, and the value Celery gives for it."""

    signature: Signature
    indexes: list[int]
    expected: Any


class _Indexes:
    def __init__(self) -> None:
        self.used: list[int] = []

    def __call__(self) -> int:
        self.used.append(len(self.used))
        return self.used[-1]


def chord_of(n: int, hold: set[int] | None = None) -> Shape:
    """``chord([leaf(0..n-1)], combine(n))``."""
    held = hold or set()
    header = [leaf.s(i, hold=i in held) for i in range(n)]
    expected = sum(step_value(i) for i in range(n + 1))
    return Shape(chord(header, combine.s(n, hold=n in held)), list(range(n + 1)), expected)


def chain_of_chords(chords: int, width: int, hold_body: int = -1) -> Shape:
    """``leaf(0) | chord(width x combine) | chord(...) ...``: each header task adds to the
    previous chord's result, each body sums its header."""
    index = _Indexes()
    steps: list[Signature] = [leaf.s(index())]
    value = step_value(0)
    for k in range(chords):
        members = [index() for _ in range(width)]
        body = index()
        header = [combine.s(i) for i in members]
        steps.append(chord(header, combine.s(body, hold=(k == hold_body))))
        value = sum(value + step_value(i) for i in members) + step_value(body)
    return Shape(chain(*steps), index.used, value)


def body_index_of_chord(k: int, width: int) -> int:
    """The index of the body of chord ``k`` in :func:`chain_of_chords`."""
    return 1 + k * (width + 1) + width


def nested_chord_in_chain_in_group(
    branches: int, width: int, hold_body: int = -1, link_body: int = -1
) -> Shape:
    """``group(leaf | chord([combine...], combine) for each branch)``, with optionally a
    held body and a ``link`` callback on one body."""
    index = _Indexes()
    members: list[Signature] = []
    values = []
    for b in range(branches):
        first = index()
        header = [index() for _ in range(width)]
        body_i = index()
        body = combine.s(body_i, hold=(b == hold_body))
        if b == link_body:
            body = body.set(link=note.s(index()))
        members.append(chain(leaf.s(first), chord([combine.s(i) for i in header], body)))
        start = step_value(first)
        values.append(sum(start + step_value(i) for i in header) + step_value(body_i))
    return Shape(group(members), index.used, values)


def basic_shapes() -> dict[str, Callable[[], Shape]]:
    """The plain canvas shapes, each small."""

    def a_chain() -> Shape:
        sig = chain(leaf.s(0), combine.s(1), combine.si(100, 2), combine.s(3))
        return Shape(sig, [0, 1, 2, 3], 100 + step_value(2) + step_value(3))

    def a_group() -> Shape:
        return Shape(group(leaf.s(i) for i in range(4)), [0, 1, 2, 3], [1, 4, 7, 10])

    def group_in_chain() -> Shape:
        sig = chain(leaf.s(0), group(combine.s(1), combine.s(2)), combine.s(3))
        expected = (1 + 4) + (1 + 7) + step_value(3)
        return Shape(sig, [0, 1, 2, 3], expected)

    # celery.starmap calls the task in-process (task(*args)), outside any request: its
    # side effects are not logged under the run, so these two have no indexes to count.
    def chunks() -> Shape:
        return Shape(leaf.chunks([(i,) for i in range(5)], 2), [], [[1, 4], [7, 10], [13]])

    def starmap() -> Shape:
        return Shape(leaf.starmap([(0,), (1,)]), [], [1, 4])

    return {
        "chain": a_chain,
        "group": a_group,
        "chord": lambda: chord_of(10),
        "group in a chain": group_in_chain,
        "chunks": chunks,
        "starmap": starmap,
        "nested chord in chain in group": lambda: nested_chord_in_chain_in_group(3, 3),
        "chain of 10 chords": lambda: chain_of_chords(10, 10),
        "chord of 1000": lambda: chord_of(1000),
    }


def celery_results(result_url: str) -> dict[str, Any]:
    """Every basic shape's result from plain Celery, with ``result_url`` as its result
    backend (the broker and queue come from the ``DURABLE_IT_*`` environment)."""
    app = configure(Celery("canvas-celery"), os.environ)
    app.conf.result_backend = result_url
    app.set_current()  # signatures of shared tasks are sent by the current app's tasks
    return {
        name: make().signature.apply_async().get(timeout=120)
        for name, make in basic_shapes().items()
    }


if __name__ == "__main__":
    print(json.dumps(celery_results(sys.argv[1])))
