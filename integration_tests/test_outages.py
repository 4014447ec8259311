"""Database and broker outages, on private servers the tests stop and start.

With the store's PostgreSQL stopped for ten seconds, its connections cut, Redis restarted
empty (every queued and prefetched message gone) or RabbitMQ restarted: the workers stay
up, no run ends FAILURE or STUCK because of it, every run completes once the service is
back, and no step runs more than twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from celery_durable import WorkflowHandle

from . import wfapp
from .checks import assert_side_effects
from .cluster import SETUPS, Cluster
from .own_services import OwnPostgres

pytestmark = pytest.mark.integration

#: Leases short enough that a claim left behind by a lost message expires within the
#: test, long enough that the outage outlasts it (which must not cost a second run).
SETTINGS = {"DURABLE_IT_WORKER_TIMEOUT": "4"}


@pytest.fixture
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    """A cluster on the setup named by the parameter, on a private PostgreSQL when the
    test takes ``own_postgres``, and on a private broker when it takes ``restart``."""
    setup = SETUPS[request.param]
    names = set(request.fixturenames)
    store_url = request.getfixturevalue("own_postgres").url if "own_postgres" in names else None
    broker_url = None
    if "restart" in names:  # the broker is the one the test restarts
        own = "own_redis" if setup.broker == "redis" else "own_rabbitmq"
        broker_url = request.getfixturevalue(own).url
    cluster = Cluster(setup, tmp_path, broker_url=broker_url, store_url=store_url)
    try:
        yield cluster
    finally:
        cluster.close()


def finish_all(
    cluster: Cluster, handles: list[WorkflowHandle[int]], expected: int, fault: str
) -> None:
    """Every run completes with ``expected``; every worker is still up. Prints how long
    the runs took to finish after the service came back, and the extra executions."""
    back = time.monotonic()
    for handle in handles:
        assert handle.get(timeout=120) == expected, cluster.log_tails()
    counts = [c for (run, _), c in cluster.effects().items() if run in {h.id for h in handles}]
    print(
        f"\n{fault}: {len(handles)} runs completed {time.monotonic() - back:.1f} s after it "
        f"was back; {len(counts)} steps, {sum(counts) - len(counts)} extra executions"
    )
    assert all(worker.running for worker in cluster.workers), "a worker died in the outage"
    for worker in cluster.workers:
        assert "AttributeError" not in worker.log_tail(lines=100_000)


def sum_of(n: int) -> int:
    return sum(wfapp.step_value(i) for i in range(n))


@pytest.mark.parametrize(
    "deployment", ["redis-postgres-threads", "rabbitmq-postgres-prefork"], indirect=True
)
def test_runs_complete_after_the_store_is_stopped_for_ten_seconds(
    own_postgres: OwnPostgres, deployment: Cluster
) -> None:
    deployment.worker(concurrency=3, env=SETTINGS)
    handles = [wfapp.slow_steps.apply_async((5, 0.5), app=deployment.client) for _ in range(4)]
    deadline = time.monotonic() + 60
    while sum(deployment.effects().values()) < 4:  # steps are running
        assert time.monotonic() < deadline
        time.sleep(0.05)

    own_postgres.stop("immediate")
    time.sleep(10)  # the outage: nothing of the test depends on its length
    own_postgres.start()

    finish_all(deployment, handles, sum_of(5), "store stopped 10 s")
    deployment.kills = 1  # an outage may cost a step one more run, never more
    for handle in handles:
        assert_side_effects(deployment, handle.id, range(5))


@pytest.mark.parametrize("deployment", ["redis-postgres-threads"], indirect=True)
def test_runs_complete_when_the_stores_connections_are_cut(
    own_postgres: OwnPostgres, deployment: Cluster
) -> None:
    deployment.worker(concurrency=3, env=SETTINGS)
    handles = [wfapp.slow_steps.apply_async((6, 0.2), app=deployment.client) for _ in range(5)]

    cut = 0
    until = time.monotonic() + 3
    while time.monotonic() < until:
        cut += own_postgres.terminate_connections()
        time.sleep(0.1)
    assert cut > 0

    finish_all(deployment, handles, sum_of(6), f"store connections cut ({cut})")
    deployment.kills = 1
    for handle in handles:
        assert_side_effects(deployment, handle.id, range(6))


@pytest.mark.parametrize(
    ("deployment", "restart"),
    [
        ("redis-postgres-threads", "Redis restarted empty"),
        ("redis-sqlite-prefork", "Redis restarted empty"),
        ("rabbitmq-postgres-prefork", "RabbitMQ restarted"),
    ],
    indirect=["deployment"],
)
def test_a_fan_out_completes_after_the_broker_restarts(
    request: pytest.FixtureRequest, deployment: Cluster, restart: str
) -> None:
    for name in ("w1", "w2"):
        deployment.worker(name, concurrency=2, env=SETTINGS)
    handle = wfapp.slow_fan_out.apply_async((40, 0.3), app=deployment.client)
    deadline = time.monotonic() + 60
    while sum(deployment.effects().values()) < 8:  # prefetched and running now
        assert time.monotonic() < deadline
        time.sleep(0.05)

    if deployment.setup.broker == "redis":
        request.getfixturevalue("own_redis").restart_empty()
    else:
        request.getfixturevalue("own_rabbitmq").restart()

    finish_all(deployment, [handle], sum_of(40), restart)
    deployment.kills = 1
    assert_side_effects(deployment, handle.id, range(40))
