"""A poller that runs forever with a bounded history: sleep, poll, continue as new.

    uv run examples/nightly_poller.py

Each "night" the workflow polls a feed, sleeps on a durable timer (rows in SQL, not a
worker), and continues as new: the same workflow id starts afresh with the running
total, so its history never holds more than one night. For the demo a night lasts
NIGHTLY_POLLER_INTERVAL seconds (default 1) and the poller stops after three nights.
Runs with nothing installed (in-memory broker, SQLite store, a worker in this process);
NIGHTLY_POLLER_BROKER and NIGHTLY_POLLER_DB point it at a real broker and store.
"""

import os
import uuid

from celery import Celery, shared_task

from celery_durable import durable_workflow, workflow
from celery_durable.testing import configure_embedded, embedded_worker

app = Celery(
    "nightly_poller", broker=os.environ.get("NIGHTLY_POLLER_BROKER", "memory://localhost/")
)
configure_embedded(app, os.environ.get("NIGHTLY_POLLER_DB", "sqlite:///nightly_poller.sqlite3"))
INTERVAL = float(os.environ.get("NIGHTLY_POLLER_INTERVAL", "1"))


@shared_task
def poll_feed(feed: str, night: int) -> int:
    new_items = 3 * night + 1  # stands in for what the feed has published since last night
    print(f"  night {night}: {new_items} new items in {feed}", flush=True)
    return new_items


@durable_workflow
async def nightly_poller(
    feed: str, interval: float, nights: int, night: int = 1, total: int = 0
) -> str:
    total += await poll_feed.s(feed, night)
    workflow.set_status("nights", night)
    if night == nights:
        return f"{feed}: {total} items in {nights} nights"
    await workflow.sleep(interval)  # a night; durable, however long
    workflow.continue_as_new(feed, interval, nights, night=night + 1, total=total)


if __name__ == "__main__":
    with embedded_worker(app):
        workflow_id = f"poller-{uuid.uuid4().hex[:6]}"
        handle = nightly_poller.apply_async(("news", INTERVAL, 3), workflow_id=workflow_id)
        print(f"{handle.id}: {handle.get(timeout=60)}")
        steps = [f"{s.kind} {s.name}" for s in handle.history]
        print(f"{handle.id}: history of the last night only: {steps}")
