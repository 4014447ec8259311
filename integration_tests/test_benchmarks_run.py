"""The benchmark scripts still run (tiny sizes): a table, and ratios, come out.

They are measured by hand, never asserted on; this only keeps them from rotting. Each
run gets a queue of its own on the benchmarks' Redis database and a schema of its own in
their PostgreSQL database (``durable_bench``), so it can run beside a benchmark run by
hand, or beside the same test of another checkout.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import psycopg
import pytest
from sqlalchemy.engine import make_url

from .services import POSTGRES_URL, Broker, require

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
BENCH_REDIS = "redis://127.0.0.1:6379/14"  # the benchmarks' broker (see benchmarks/harness.py)
BENCH_DATABASE = "durable_bench"

SCRIPTS = {
    "compare_celery.py": ["--quick"],
    "local_steps.py": ["--quick"],
    "canvas_vs_celery.py": [
        "--repeat",
        "1",
        "--width",
        "5",
        "--chords",
        "2",
        "--chord-width",
        "3",
        "--fan",
        "2",
    ],
    "waiting_runs.py": ["--runs", "10", "--pings", "2", "--timer-samples", "2"],
    "sweep_cost.py": ["--runs", "20", "--finished-steps", "100", "--repeat", "1", "--explain"],
}
#: The scripts that start workers, and so take a queue and a store of the test's own.
WITH_WORKERS = {"compare_celery.py", "local_steps.py", "canvas_vs_celery.py", "waiting_runs.py"}
#: What each prints last, whatever the machine measured.
TABLE_TITLES = {
    "compare_celery.py": "the issue's targets",
    "local_steps.py": "floors, on the same workers",
}


def _admin(database: str) -> str:
    return (
        make_url(POSTGRES_URL)
        .set(drivername="postgresql", database=database)
        .render_as_string(hide_password=False)
    )


@pytest.fixture
def bench_store() -> Iterator[str]:
    """A store URL: a new schema in the benchmarks' database, dropped afterwards."""
    with psycopg.connect(_admin("postgres"), autocommit=True) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (BENCH_DATABASE,)
        ).fetchone()
        # Another run of this test, or a benchmark, may create it meanwhile.
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                conn.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
    schema = f"smoke_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_admin(BENCH_DATABASE), autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    url = make_url(POSTGRES_URL).set(database=BENCH_DATABASE).render_as_string(False)
    try:
        yield f"{url}?options={quote(f'-csearch_path={schema}')}"
    finally:
        with psycopg.connect(_admin(BENCH_DATABASE), autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_prints_its_table(script: str, bench_store: str) -> None:
    require("redis")
    require("postgres")
    broker = Broker("redis", BENCH_REDIS)
    extra: list[str] = []
    if script in WITH_WORKERS:
        extra = ["--queue", broker.new_queue("bench-smoke"), "--store-url", bench_store]
    try:
        done = subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / script), *SCRIPTS[script], *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=280,
        )
    finally:
        broker.cleanup()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "|" in done.stdout or "x" in done.stdout
    if script in TABLE_TITLES:
        assert TABLE_TITLES[script] in done.stdout, done.stdout[-3000:]
