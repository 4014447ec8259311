"""The two Flower routes the tab takes over, in a Flower application served in-process:
``/task/<id>`` (a run's id redirects to its page, any other id is Flower's task page) and
``/metrics`` (Flower's series and the workflow series)."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import Celery
from flower import urls
from flower.app import Flower
from prometheus_client import REGISTRY
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets
from tornado.options import options

import celery_durable.flower as durable_flower
from celery_durable import _config
from celery_durable.flower import _metrics
from celery_durable.store import NewRun


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@pytest.fixture
def durable_app(tmp_path: Path) -> Iterator[Celery]:
    app = Celery("routes-tests", broker="memory://", set_as_current=False)
    app.conf.durable_database_url = f"sqlite:///{tmp_path}/durable.sqlite3"
    yield app
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


@pytest.fixture
def flower(durable_app: Celery) -> Iterator[tuple[str, Flower]]:
    """The base URL of a Flower application with the tab installed, and the application."""
    handlers, settings = list(urls.handlers), dict(urls.settings)
    durable_flower.install()
    started = threading.Event()
    served: dict[str, object] = {}

    def serve() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        loop = IOLoop.current()
        application = Flower(capp=durable_app, options=options, io_loop=loop, **urls.settings)
        sockets = bind_sockets(0, "127.0.0.1")
        HTTPServer(application).add_sockets(sockets)
        served.update(loop=loop, app=application, port=sockets[0].getsockname()[1])
        started.set()
        loop.start()
        application.executor.shutdown(wait=False)
        loop.close(all_fds=True)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(10)
    loop = served["loop"]
    assert isinstance(loop, IOLoop)
    application = served["app"]
    assert isinstance(application, Flower)
    try:
        yield f"http://127.0.0.1:{served['port']}", application
    finally:
        loop.add_callback(loop.stop)
        thread.join(10)
        urls.handlers[:] = handlers
        urls.settings.clear()
        urls.settings.update(settings)
        collector = _metrics._registered.pop("collector", None)
        if collector is not None:
            REGISTRY.unregister(collector)


def _get(url: str) -> tuple[int, str, str]:
    """(status, Location header, body) without following redirects."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=10) as response:
            return response.status, response.headers.get("Location", ""), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", ""), exc.read().decode()


def test_a_runs_id_as_task_id_redirects_to_the_run_page(
    durable_app: Celery, flower: tuple[str, Flower]
) -> None:
    base, _ = flower
    store = _config.store_for(durable_app)
    for run_id in ("order-o-1", "order-o-1/2"):
        assert store.create_run(NewRun(run_id, "shop.checkout", "application/json", b"[[],{}]"))
    status, location, _ = _get(f"{base}/task/order-o-1")
    assert (status, location) == (302, "/workflows/order-o-1")
    status, location, _ = _get(f"{base}/task/order-o-1%2F2")
    assert status == 302 and location.startswith("/workflows/order-o-1")
    assert "/2" in location.replace("%2F", "/")


def test_any_other_id_is_flowers_own_task_page(flower: tuple[str, Flower]) -> None:
    base, application = flower
    status, _, text = _get(f"{base}/task/no-such-task")
    assert status == 404 and "Unknown task" in text  # Flower's TaskView said so
    now = time.time()
    application.events.state.event(
        {
            "type": "task-received",
            "uuid": "step-1",
            "name": "shop.charge",
            "hostname": "w1@host",
            "timestamp": now,
            "local_received": now,
            "clock": 1,
            "args": "('o-1',)",
            "kwargs": "{}",
            "root_id": "order-o-1",
            "parent_id": "order-o-1",
        }
    )
    status, _, text = _get(f"{base}/task/step-1")
    assert status == 200 and "shop.charge" in text and 'href="/task/order-o-1"' in text


def test_metrics_serve_flowers_series_and_the_workflow_series(
    durable_app: Celery, flower: tuple[str, Flower]
) -> None:
    base, _ = flower
    store = _config.store_for(durable_app)
    assert store.create_run(NewRun("order-o-2", "shop.checkout", "application/json", b"[[],{}]"))
    status, _, text = _get(f"{base}/metrics")
    assert status == 200
    assert "flower_events_total" in text  # Flower's own
    assert 'celery_durable_runs{status="PENDING",workflow="shop.checkout"} 1.0' in text
    assert "order-o-2" not in text
