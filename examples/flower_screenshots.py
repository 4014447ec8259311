"""The README's Flower screenshots: a worker with events (-E), Flower, a few orders.

    uv run python -m examples.flower_screenshots [output directory]

Starts `celery worker -E` and `celery durable flower` for this module's app (broker
SHOTS_BROKER, default local Redis; the store an SQLite file in a temporary directory),
runs five checkouts (paid, declined, one waiting for a manager's approval) and saves the
Workflows tab and the waiting run's page, as Debian's chromium shows them through
Playwright, in flower_workflows.png and flower_run.png (default: next to this file).
"""

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from celery import Celery, shared_task

from celery_durable import durable_workflow, workflow

BROKER = os.environ.get("SHOTS_BROKER", "redis://127.0.0.1:6379/0")
app = Celery("examples.flower_screenshots", broker=BROKER)
app.conf.durable_database_url = os.environ.get("SHOTS_DB", "sqlite:///shots.sqlite3")
app.conf.task_default_queue = os.environ.get("SHOTS_QUEUE", "celery")


@shared_task
def charge(order_id: str, cents: int) -> str:
    time.sleep(0.3)
    if cents > 100_000:
        raise ValueError(f"card declined for {order_id}: {cents} cents is over the limit")
    return f"receipt-{order_id}"


@shared_task
def reserve(sku: str) -> bool:
    time.sleep(0.2)
    return True


@durable_workflow
async def checkout(order_id: str, cents: int, skus: list[str]) -> str:
    workflow.set_status("stage", "charging")
    receipt = await charge.s(order_id, cents)
    workflow.set_status("stage", "reserving")
    await asyncio.gather(*(reserve.s(sku) for sku in skus))
    if cents >= 50_000:
        workflow.set_status("stage", "waiting for a manager")
        await workflow.wait_for_signal("approved", timeout=3600)
    return receipt


#: (order number, cents, SKUs): paid, paid, declined, waiting for approval, paid.
ORDERS = [
    ("1001", 1999, ["mug"]),
    ("1002", 4500, ["tee", "cap"]),
    ("1003", 250_000, ["sofa"]),
    ("1004", 72_000, ["desk", "lamp", "chair"]),
    ("1005", 990, ["pen"]),
]
WAITING = "order-1004"


def until(done: Callable[[], object], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def take(out: Path, workdir: Path) -> list[Path]:
    """Run the worker, Flower and the orders in ``workdir``; save the screenshots in ``out``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store, queue = f"sqlite:///{workdir}/shots.sqlite3", f"shots-{os.getpid()}"
    app.conf.update(durable_database_url=store, task_default_queue=queue)  # for this process
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "SHOTS_DB": store, "SHOTS_QUEUE": queue, "PYTHONPATH": root}
    celery = [sys.executable, "-m", "celery", "-A", "examples.flower_screenshots"]
    commands = {
        "worker": [*celery, "worker", "-E", "--pool=threads", "--concurrency=4"],
        "flower": [*celery, "durable", "flower", f"--port={port}", "--address=127.0.0.1"],
    }
    processes = []
    for name, command in commands.items():
        with (workdir / f"{name}.log").open("wb") as log:
            processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=log))
    try:
        until(lambda: app.control.ping(timeout=0.5), "no worker answered")
        handles = [
            checkout.apply_async((f"o-{n}", cents, skus), workflow_id=f"order-{n}")
            for n, cents, skus in ORDERS
        ]
        waiting = next(h for h in handles if h.id == WAITING)

        def ready() -> bool:
            ended = all(h.status in ("SUCCESS", "FAILURE") for h in handles if h is not waiting)
            return ended and "waiting" in waiting.describe()["status_values"].get("stage", "")

        until(ready, "the orders did not run")
        waiting.signal("gift-note", {"text": "Happy birthday!"})  # no wait takes it: buffered
        return screenshots(f"http://127.0.0.1:{port}", out)
    except BaseException:
        for name in commands:  # the scratch directory goes away with the error
            print(
                f"--- {name}.log:\n{(workdir / f'{name}.log').read_text()[-3000:]}", file=sys.stderr
            )
        raise
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)


def screenshots(base: str, out: Path) -> list[Path]:
    """Save the Workflows tab and the waiting run's page from the Flower at ``base``."""
    from playwright.sync_api import sync_playwright

    def healthy() -> bool:
        try:
            urllib.request.urlopen(base + "/healthcheck", timeout=5).close()
        except OSError:
            return False
        return True

    until(healthy, "Flower did not start")
    shots = [out / "flower_workflows.png", out / "flower_run.png"]
    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            page.goto(base + "/workflows")
            page.wait_for_selector(f'tr[data-run-id="{WAITING}"]')
            page.screenshot(path=str(shots[0]), full_page=True)
            page.goto(f"{base}/workflows/{WAITING}")
            page.wait_for_selector("#run-waiting")
            page.screenshot(path=str(shots[1]), full_page=True)
        finally:
            browser.close()
    return shots


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
    with tempfile.TemporaryDirectory() as scratch:
        for shot in take(target, Path(scratch)):
            print(shot)
