"""Make an existing Celery chord durable: one import, one wrapper, no result backend.

    uv run examples/durable_chord.py

Runs with nothing installed: Celery's in-memory broker, an SQLite store and a worker
inside this process. DURABLE_CHORD_BROKER and DURABLE_CHORD_DB point it at a real broker
and store. Run it twice: the second time the run with that id already exists, and its
result comes back without any task running again.
"""

import os

from celery import Celery, chord, group, shared_task

from celery_durable.canvas import durable
from celery_durable.testing import configure_embedded, embedded_worker

app = Celery("durable_chord", broker=os.environ.get("DURABLE_CHORD_BROKER", "memory://localhost/"))
configure_embedded(app, os.environ.get("DURABLE_CHORD_DB", "sqlite:///durable_chord.sqlite3"))


@shared_task
def fetch(url: str) -> int:
    print(f"  fetching {url}", flush=True)
    return len(url)  # stands in for the page's size


@shared_task
def merge(sizes: list[int]) -> int:
    return sum(sizes)


if __name__ == "__main__":
    urls = [f"https://example.com/{page}" for page in ("a", "bb", "ccc")]
    canvas = chord(group(fetch.s(u) for u in urls), merge.s())  # plain Celery
    with embedded_worker(app):
        handle = durable(canvas).apply_async(workflow_id="pages-1")  # -> WorkflowHandle
        print("total:", handle.get(timeout=60))
        for step in handle.history:  # one workflow run, every task a recorded step
            print(f"  step {step.seq}: {step.name}{tuple(step.args)} -> {step.result!r}")
