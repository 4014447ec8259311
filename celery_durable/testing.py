"""Running workflows in one process: for tests, notebooks and the quickstart.

:func:`embedded_worker` starts a real Celery worker (thread pool) inside the current
process, with the celery_durable bootstep, and stops it on exit. With the ``memory://``
broker nothing needs to be installed or running; with a real broker it behaves like any
other worker.

Example::

    app = Celery("shop", broker="memory://")
    configure_embedded(app, "sqlite:///shop.sqlite3")
    with embedded_worker(app):
        print(checkout.delay("o-1", ["a"]).get(timeout=30))

For pytest, ``celery_durable.testing`` also offers the ``durable_app`` and
``durable_worker`` fixtures (enable with ``pytest_plugins = ["celery_durable.testing"]``).
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.exceptions import SecurityWarning
from celery.worker import WorkController

__all__ = ["configure_embedded", "durable_app", "durable_worker", "embedded_worker"]


def configure_embedded(app: Celery, database_url: str | None = None) -> Celery:
    """Tune ``app`` for an in-process worker: fast polling of ``memory://``, quick recovery.

    The in-memory broker forgets every message when the process exits; the store does
    not, so a short stall timeout lets the next run of the program pick up where the last
    one stopped within a second or two.
    """
    app.conf.broker_transport_options = {
        "polling_interval": 0.01,
        **(app.conf.broker_transport_options or {}),
    }
    app.conf.worker_redirect_stdouts = False
    app.conf.worker_hijack_root_logger = False
    app.conf.setdefault("durable_sweep_interval", 0.5)
    app.conf.setdefault("durable_stall_timeout", 1.0)
    app.conf.setdefault("durable_timer_interval", 0.05)
    app.conf.setdefault("durable_worker_timeout", 2.0)
    if database_url is not None:
        app.conf.durable_database_url = database_url
    return app


@contextmanager
def embedded_worker(
    app: Celery,
    concurrency: int = 4,
    loglevel: str = "WARNING",
    **options: Any,
) -> Iterator[WorkController]:
    """Run a Celery worker (thread pool) in this process while the block runs."""
    with warnings.catch_warnings():
        # Celery warns when a worker *process* runs as root (in containers, often); this
        # worker is a thread of the calling program, which already runs as whoever it is.
        warnings.simplefilter("ignore", SecurityWarning)
        worker: WorkController = app.Worker(
            pool="threads",
            concurrency=concurrency,
            loglevel=loglevel,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
            quiet=True,
            **options,
        )
    ready = threading.Event()

    def _started(**_: Any) -> None:
        ready.set()

    thread = threading.Thread(target=worker.start, name="celery-durable-embedded", daemon=True)
    from celery import signals

    signals.worker_ready.connect(_started, weak=False)
    try:
        thread.start()
        ready.wait(timeout=30)
        yield worker
    finally:
        signals.worker_ready.disconnect(_started)
        worker.stop(in_sighandler=False)
        thread.join(timeout=30)


try:  # pytest fixtures, when pytest is importable
    import pytest
except ImportError:  # pragma: no cover
    pass
else:

    @pytest.fixture
    def durable_app(tmp_path: Any) -> Iterator[Celery]:
        """A Celery app on ``memory://`` with a fresh SQLite store in ``tmp_path``."""
        app = Celery("durable-test", broker="memory://", set_as_current=True)
        configure_embedded(app, f"sqlite:///{tmp_path}/durable.sqlite3")
        yield app
        # The next test has a database of its own: close this one's connections and
        # forget the suspended runs kept in memory for it.
        from . import _config, driver

        store = _config._stores.pop(_config.settings_for(app).database_url, None)
        if store is not None:
            store.dispose()
        driver.cache.clear()

    @pytest.fixture
    def durable_worker(durable_app: Celery) -> Iterator[WorkController]:
        """An embedded worker for ``durable_app``, stopped after the test."""
        with embedded_worker(durable_app) as worker:
            yield worker
