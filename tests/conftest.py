"""Shared fixtures of the fast test suite."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from celery import Celery
from celery.worker import WorkController
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from celery_durable import _config
from celery_durable.driver import cache as driver_cache
from celery_durable.testing import configure_embedded, embedded_worker

#: The PostgreSQL the suite uses (trust auth on the development machines).
POSTGRES_URL = os.environ.get(
    "DURABLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)


def unavailable(reason: str) -> None:
    """Skip the test on a laptop without the service; fail it on CI, where it must run."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true, so this fails instead of skipping)")
    pytest.skip(reason)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL of the test PostgreSQL whose ``search_path`` is a fresh, private schema.

    Each test gets its own schema, dropped afterwards, so tests (and other suites using
    the same database) never see each other's tables.
    """
    admin = create_engine(POSTGRES_URL)
    schema = f"durable_test_{uuid.uuid4().hex[:12]}"
    try:
        with admin.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    except OperationalError as exc:
        admin.dispose()
        unavailable(f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc.orig}")
    url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={schema}"})
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Celery]:
    """A Celery app on ``memory://`` with a fresh SQLite store, shared by one test module.

    Tests that use it start runs with ids of their own, so they never see each other.
    """
    directory = tmp_path_factory.mktemp("durable")
    app = Celery("durable-tests", broker="memory://", set_as_current=False)
    configure_embedded(app, f"sqlite:///{directory}/durable.sqlite3")
    # memory:// queues are shared by every app in the process: a queue of its own keeps
    # one module's leftover messages away from the next module's worker.
    app.conf.task_default_queue = f"durable-tests-{uuid.uuid4().hex[:8]}"
    yield app
    driver_cache.clear()
    store = _config._stores.pop(_config.settings_for(app).database_url, None)
    if store is not None:
        store.dispose()


@pytest.fixture(scope="module")
def worker(app: Celery) -> Iterator[WorkController]:
    """An embedded worker for ``app`` (thread pool), stopped when the module is done."""
    with embedded_worker(app) as worker:
        yield worker


@pytest.fixture(autouse=True)
def _current_app(request: pytest.FixtureRequest) -> None:
    # ``wf.delay()`` starts runs on the current app, like ``task.delay()``.
    if "app" in request.fixturenames:
        request.getfixturevalue("app").set_current()


@pytest.fixture(params=[1000, 0], ids=["cached", "replayed"])
def cache_size(request: pytest.FixtureRequest, app: Celery, monkeypatch: pytest.MonkeyPatch) -> int:
    """Run the test with suspended runs cached, then with every turn replayed."""
    size: int = request.param
    monkeypatch.setitem(app.conf, "durable_cache_size", size)
    return size
