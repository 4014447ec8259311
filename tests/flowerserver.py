"""A Flower application with the Workflows tab, served in this process on a free port.

For the fast tests of the tab's pages and routes: Flower's own ``Flower`` application,
built from ``flower.urls`` after ``celery_durable.flower.install()`` as ``celery flower``
builds it, on an IO loop in a thread of its own. No worker, broker or events are needed.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from celery import Celery
from flower import urls
from flower.app import Flower
from prometheus_client import REGISTRY
from tornado.httpserver import HTTPServer
from tornado.ioloop import IOLoop
from tornado.netutil import bind_sockets
from tornado.options import options

import celery_durable.flower as durable_flower
from celery_durable.flower import _metrics

__all__ = ["FlowerServer", "serve_flower"]


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@dataclass
class FlowerServer:
    """The running application and how to ask it things."""

    base: str
    app: Flower

    def get(self, path: str) -> tuple[int, str, str]:
        """``(status, Location header, body)`` of a GET, redirects not followed."""
        opener = urllib.request.build_opener(_NoRedirect)
        try:
            with opener.open(self.base + path, timeout=10) as response:
                body = response.read().decode()
                return response.status, response.headers.get("Location", ""), body
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Location", ""), exc.read().decode()


@contextmanager
def serve_flower(capp: Celery) -> Iterator[FlowerServer]:
    """Serve Flower for ``capp`` until the block ends; Flower's routes are restored after."""
    handlers, settings = list(urls.handlers), dict(urls.settings)
    durable_flower.install()
    started = threading.Event()
    served: dict[str, object] = {}

    def serve() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        loop = IOLoop.current()
        application = Flower(capp=capp, options=options, io_loop=loop, **urls.settings)
        sockets = bind_sockets(0, "127.0.0.1")
        HTTPServer(application).add_sockets(sockets)
        served.update(loop=loop, app=application, port=sockets[0].getsockname()[1])
        started.set()
        loop.start()
        application.executor.shutdown(wait=False)
        loop.close(all_fds=True)

    thread = threading.Thread(target=serve, name="flower", daemon=True)
    thread.start()
    assert started.wait(10), "Flower did not start"
    loop, application = served["loop"], served["app"]
    assert isinstance(loop, IOLoop) and isinstance(application, Flower)
    try:
        yield FlowerServer(f"http://127.0.0.1:{served['port']}", application)
    finally:
        loop.add_callback(loop.stop)
        thread.join(10)
        urls.handlers[:] = handlers
        urls.settings.clear()
        urls.settings.update(settings)
        collector = _metrics._registered.pop("collector", None)
        if collector is not None:
            REGISTRY.unregister(collector)
