"""Fixtures of the integration tests: a :class:`~integration_tests.cluster.Cluster` per test.

Parametrize the ``cluster`` fixture indirectly with setup names::

    @pytest.mark.parametrize("cluster", ALL, indirect=True)
    def test_something(cluster: Cluster) -> None:
        worker = cluster.worker()
        ...

When a test fails, the end of every worker log it produced is added to its report.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from .cluster import SETUPS, Cluster

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
