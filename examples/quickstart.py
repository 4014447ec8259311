"""Quickstart: a durable checkout workflow, with nothing to install but this package.

    uv run examples/quickstart.py

Uses an SQLite file for the store, Celery's in-memory broker and a worker inside this
process. Interrupt it (Ctrl-C) while the steps run and start it again: the same workflow
resumes, and the steps that already finished are not run again.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from celery import Celery, shared_task

from celery_durable import WorkflowHandle, durable_workflow
from celery_durable.testing import configure_embedded, embedded_worker

app = Celery("quickstart", broker=os.environ.get("QUICKSTART_BROKER", "memory://localhost/"))
configure_embedded(app, os.environ.get("QUICKSTART_DB", "sqlite:///quickstart.sqlite3"))
STEP_SECONDS = float(os.environ.get("QUICKSTART_STEP_SECONDS", "0.5"))


@shared_task
def charge(order_id: str, cents: int) -> str:
    print(f"  charging {order_id}: {cents} cents", flush=True)
    time.sleep(STEP_SECONDS)
    return f"receipt-{order_id}"


@shared_task
def reserve(sku: str) -> bool:
    print(f"  reserving {sku}", flush=True)
    time.sleep(STEP_SECONDS)
    return True


@durable_workflow
async def checkout(order_id: str, skus: list[str]) -> dict[str, object]:
    receipt = await charge.s(order_id, 1999)
    held = await asyncio.gather(*(reserve.s(sku) for sku in skus))
    return {"receipt": receipt, "held": held}


def main() -> None:
    workflow_id = sys.argv[1] if len(sys.argv) > 1 else "order-o-1"
    with embedded_worker(app):
        handle = checkout.apply_async(("o-1", ["apple", "pear", "fig"]), workflow_id=workflow_id)
        print(f"workflow {handle.id}: {handle.status}", flush=True)
        result = handle.get(timeout=60)
        print(f"result: {result}")
        for step in WorkflowHandle(workflow_id, app=app).history:
            print(f"  step {step.seq}: {step.name}{tuple(step.args)} -> {step.result!r}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume the workflow")
