"""The README's example: a checkout workflow on Redis and PostgreSQL.

    celery -A examples.shop worker --loglevel=INFO      # a worker, as for any Celery app
    python -m examples.shop                              # start a run and wait for it

Broker and store come from SHOP_BROKER and SHOP_DB (defaults: local Redis and PostgreSQL).
"""

import asyncio
import os

from celery import Celery, shared_task

from celery_durable import WorkflowHandle, durable_workflow

# The app is named after its module, so task names match in the worker and in `python -m`.
app = Celery("examples.shop", broker=os.environ.get("SHOP_BROKER", "redis://127.0.0.1:6379/0"))
app.conf.durable_database_url = os.environ.get(
    "SHOP_DB", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


@shared_task
def charge(order_id: str, cents: int) -> str:
    return f"receipt-{order_id}-{cents}"


@shared_task
def reserve(sku: str) -> bool:
    return not sku.startswith("sold-out")


@durable_workflow
async def checkout(order_id: str, skus: list[str]) -> dict:
    receipt = await charge.s(order_id, 1999)  # one activity
    held = await asyncio.gather(*(reserve.s(s) for s in skus))  # fan-out / fan-in
    return {"receipt": receipt, "held": held}


if __name__ == "__main__":
    h = checkout.delay("o-1", ["a", "b"])  # -> WorkflowHandle
    print(h.get(timeout=30))
    h = checkout.apply_async(("o-1", ["a"]), workflow_id="order-o-1")  # idempotent start
    h.get(timeout=30)
    print(WorkflowHandle("order-o-1", app=app).status)  # from any process
