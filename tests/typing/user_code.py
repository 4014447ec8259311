"""Typed user code: ``mypy --strict`` accepts this file as it is, with no ignores.

It is what a user's IDE sees: the decorator keeps each workflow's parameters (through
``ParamSpec``) and its return type, so ``delay`` checks its arguments and ``get``
returns what the workflow returns.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from datetime import datetime

from celery import Celery, shared_task

from celery_durable import (
    DurableWorkflow,
    StepInfo,
    WorkflowHandle,
    WorkflowInfo,
    durable_workflow,
    workflow,
)
from celery_durable.testing import configure_embedded, embedded_worker

app = configure_embedded(Celery("typed", broker="memory://"), "sqlite:///typed.sqlite3")


@shared_task
def charge(order_id: str, cents: int) -> str:
    return f"receipt-{order_id}-{cents}"


async def checked(sku: str) -> bool:
    await asyncio.sleep(0)
    return bool(sku)


@durable_workflow
async def checkout(order_id: str, skus: list[str], *, express: bool = False) -> dict[str, bool]:
    """Bare form."""
    started: datetime = workflow.now()
    token: uuid.UUID = workflow.uuid4()
    rng: random.Random = workflow.random()
    info: WorkflowInfo = workflow.info()
    held = await asyncio.gather(*(checked(sku) for sku in skus))
    assert started.tzinfo is not None and token.version == 4 and rng.random() < 1
    return {f"{info.workflow_id}:{sku}": ok for sku, ok in zip(skus, held, strict=True)}


@durable_workflow(name="shop.refund", queue="workflows")
async def refund(order_id: str, cents: int = 0) -> bool:
    """Option form."""
    return cents >= 0


def start() -> None:
    with embedded_worker(app):
        handle: WorkflowHandle[dict[str, bool]] = checkout.delay("o-1", ["a"], express=True)
        result: dict[str, bool] = handle.get(timeout=10)
        refunded: bool = refund.delay("o-1").get(timeout=10)
        again: WorkflowHandle[bool] = refund.apply_async(("o-1",), {"cents": 5}, workflow_id="r")
        steps: list[StepInfo] = again.history
        status: str = again.status
        definition: DurableWorkflow[[str, int], bool] = refund
        print(result, refunded, steps, status, definition.name)
