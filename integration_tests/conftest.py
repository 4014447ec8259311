"""Fixtures of the integration tests: a :class:`~integration_tests.cluster.Cluster` per test.

Parametrize the ``cluster`` fixture indirectly with setup names::

    @pytest.mark.parametrize("cluster", ALL, indirect=True)
    def test_something(cluster: Cluster) -> None:
        worker = cluster.worker()
        ...

When a test fails, the end of every worker log it produced is added to its report.

A test that must stop, restart or break its database or broker takes a private instance
on a spare port (see :mod:`integration_tests.own_services`), never the shared services::

    def test_store_restart(own_postgres: OwnPostgres) -> None:
        own_postgres.restart()

Those fixtures skip when the machine lacks the server's binaries, or fail when ``CI=true``.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import SETUPS, Cluster
from .own_services import OwnPostgres, OwnRabbitMQ, OwnRedis
from .services import skip_or_fail

_CLUSTER = pytest.StashKey[Cluster]()


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A fresh deployment on the setup named by the parameter (default: the first)."""
    name = getattr(request, "param", next(iter(SETUPS)))
    deployment = Cluster(SETUPS[name], tmp_path)
    request.node.stash[_CLUSTER] = deployment
    try:
        yield deployment
    finally:
        deployment.close()


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    """A private PostgreSQL cluster with an empty database, removed after the test."""
    _require(OwnPostgres.unavailable(), "a private PostgreSQL")
    with OwnPostgres() as server:
        yield server


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    """A private, non-persistent Redis server, removed after the test."""
    _require(OwnRedis.unavailable(), "a private Redis")
    with OwnRedis() as server:
        yield server


@pytest.fixture
def own_rabbitmq() -> Iterator[OwnRabbitMQ]:
    """A private RabbitMQ node (5-11 s to boot), removed after the test."""
    _require(OwnRabbitMQ.unavailable(), "a private RabbitMQ node")
    with OwnRabbitMQ() as server:
        yield server


def _require(reason: str | None, what: str) -> None:
    if reason is not None:
        skip_or_fail(f"{what} cannot be started: {reason}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[Any]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    deployment = item.stash.get(_CLUSTER, None)
    if deployment is not None and report.failed and report.when in ("setup", "call"):
        for nodename, tail in deployment.log_tails():
            report.sections.append((f"worker log {nodename}", tail))
    return report
