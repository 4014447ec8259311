"""The workflows of the chaos test: every kind of step in a few small shapes.

Each activity is :func:`~integration_tests.wfapp.record`, so every execution is logged
with its run, index and time, and each shape's result can be computed beforehand.
"""

from __future__ import annotations

import asyncio

from celery_durable import durable_workflow, workflow

from .wfapp import record, step_value

KINDS = ("sequential", "fan_out", "timer", "signal", "child")


@durable_workflow
async def chaos_child(n: int) -> int:
    """``n`` activities in sequence."""
    total = 0
    for i in range(n):
        total = await record.s(i, total)
    return total


@durable_workflow
async def mixed(kind: str) -> int:
    """One shape per ``kind``; see :func:`expected`."""
    if kind == "sequential":
        total = 0
        for i in range(4):
            total = await record.s(i, total)
        return total
    if kind == "fan_out":
        values = await asyncio.gather(*(record.s(i) for i in range(8)))
        return int(await record.s(8, sum(values)))
    if kind == "timer":
        first = await record.s(0)
        await workflow.sleep(1.5)
        return int(await record.s(1, first))
    if kind == "signal":
        payload = await workflow.wait_for_signal("go")
        return int(await record.s(0, int(payload)))
    if kind == "child":
        child = await chaos_child.s(3)
        return int(await record.s(0, child))
    raise ValueError(kind)


def expected(kind: str) -> int:
    """What ``mixed(kind)`` returns (a signal's payload is 1000)."""
    v = step_value
    return {
        "sequential": v(0) + v(1) + v(2) + v(3),
        "fan_out": sum(v(i) for i in range(9)),
        "timer": v(0) + v(1),
        "signal": 1000 + v(0),
        "child": v(0) + v(1) + v(2) + v(0),
    }[kind]
