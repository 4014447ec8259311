"""A saga: charge, reserve, ship; undo what was done if a step fails or the order is cancelled.

    uv run examples/order_saga.py

Runs three orders with nothing installed (in-memory broker, SQLite store, a worker in
this process): one ships, one fails to ship and is compensated, one is cancelled while
it waits for the warehouse and is compensated. ORDER_SAGA_BROKER and ORDER_SAGA_DB
point it at a real broker and store.
"""

import asyncio
import os
import time
import uuid

from celery import Celery, shared_task

from celery_durable import durable_workflow, workflow
from celery_durable.testing import configure_embedded, embedded_worker

app = Celery("order_saga", broker=os.environ.get("ORDER_SAGA_BROKER", "memory://localhost/"))
configure_embedded(app, os.environ.get("ORDER_SAGA_DB", "sqlite:///order_saga.sqlite3"))


class ShippingError(Exception):
    pass


@shared_task
def charge(order: str) -> str:
    print(f"  {order}: charged", flush=True)
    return f"payment-{order}"


@shared_task
def refund(payment: str) -> None:
    print(f"  {payment}: refunded", flush=True)


@shared_task
def reserve(order: str, sku: str) -> str:
    print(f"  {order}: reserved {sku}", flush=True)
    return f"hold-{sku}"


@shared_task
def release(hold: str) -> None:
    print(f"  {hold}: released", flush=True)


@shared_task
def ship(order: str, address: str) -> str:
    if not address:
        raise ShippingError(f"{order} has no address")
    print(f"  {order}: shipped to {address}", flush=True)
    return f"tracking-{order}"


@durable_workflow
async def order_saga(order: str, sku: str, address: str) -> str:
    undo = []  # compensations of the steps done so far
    try:
        undo.append(refund.si(await charge.s(order)))
        undo.append(release.si(await reserve.s(order, sku)))
        workflow.set_status("stage", "packing")
        await workflow.wait_for_signal("packed")  # the warehouse says when it is ready
        return str(await ship.s(order, address))
    except (Exception, asyncio.CancelledError):
        for step in reversed(undo):  # a failure or a cancel: undo, latest first
            await step
        raise


def place(sku: str, address: str, then: str) -> None:
    order = f"o-{uuid.uuid4().hex[:6]}"
    handle = order_saga.apply_async((order, sku, address), workflow_id=f"saga-{order}")
    while handle.describe()["status_values"].get("stage") != "packing":
        time.sleep(0.05)  # wait until the order is with the warehouse
    if then == "cancel":
        handle.cancel()
    else:
        handle.signal("packed")
    try:
        print(f"{order}: {handle.get(timeout=60)}")
    except Exception as exc:
        print(f"{order}: {handle.status} ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    with embedded_worker(app):
        place("lamp", "1 Main St", then="pack")  # ships
        place("desk", "", then="pack")  # shipping fails: refund and release
        place("sofa", "2 Side St", then="cancel")  # cancelled while packing: same
