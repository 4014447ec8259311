"""Wait for a person: ask a manager, escalate to a director if nobody answers in time.

    uv run examples/human_approval.py

Runs two expense claims with nothing installed (in-memory broker, SQLite store, a worker
in this process). The script plays the manager for the first claim and approves it; the
second gets no answer, is escalated, and is rejected when the director is silent too.
While a claim waits it holds no worker: it is a row in SQL and a durable timer.
HUMAN_APPROVAL_TIMEOUT sets the seconds each person has to answer the second claim
(default 2); HUMAN_APPROVAL_BROKER and HUMAN_APPROVAL_DB point it at a real broker and store.
"""

import os
import time
import uuid

from celery import Celery, shared_task

from celery_durable import WorkflowHandle, durable_workflow, workflow
from celery_durable.testing import configure_embedded, embedded_worker

app = Celery(
    "human_approval", broker=os.environ.get("HUMAN_APPROVAL_BROKER", "memory://localhost/")
)
configure_embedded(app, os.environ.get("HUMAN_APPROVAL_DB", "sqlite:///human_approval.sqlite3"))
TIMEOUT = float(os.environ.get("HUMAN_APPROVAL_TIMEOUT", "2"))


@shared_task
def notify(person: str, text: str) -> None:
    print(f"  to {person}: {text}", flush=True)


@durable_workflow
async def expense_claim(claim: str, amount: int, timeout: float) -> str:
    for person in ("manager", "director"):
        await notify.s(person, f"please approve {claim} ({amount} EUR)")
        workflow.set_status("waiting_for", person)
        try:
            decision = await workflow.wait_for_signal("decision", timeout=timeout)
        except TimeoutError:
            continue  # nobody answered in time: escalate
        return f"{decision['verdict']} by {decision['by']}"
    return f"rejected: nobody answered within {timeout:g} s"


def waiting_for(handle: WorkflowHandle[str], person: str) -> None:
    while handle.describe()["status_values"].get("waiting_for") != person:
        time.sleep(0.05)


if __name__ == "__main__":
    with embedded_worker(app):
        # (claim, amount, seconds each person has): an hour for the one the script approves.
        claims = [
            (f"claim-{uuid.uuid4().hex[:6]}", amount, t)
            for amount, t in ((120, 3600), (4800, TIMEOUT))
        ]
        first, second = (expense_claim.apply_async(c, workflow_id=c[0]) for c in claims)
        waiting_for(first, "manager")
        print(f"{first.id}: the manager approves")
        first.signal("decision", {"verdict": "approved", "by": "manager"})
        print(f"{second.id}: nobody answers")
        for handle in (first, second):
            print(f"{handle.id}: {handle.get(timeout=60)}")
