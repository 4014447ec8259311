"""What the benchmarks that start real ``celery worker`` processes share.

Not a script: ``compare_celery.py``, ``local_steps.py``, ``canvas_vs_celery.py``,
``waiting_runs.py`` and ``sweep_cost.py`` import it (``benchmarks/`` is put on
``sys.path`` first). It holds their common options, the worker subprocesses of
``comparison_app``, the CPU meter, the store's cleanup, the floors the benchmarks of
workers print beside their numbers (:data:`FLOORS`: one SQL commit, one SQL round trip,
one broker round trip, one plain Celery task) and a plain-text table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

DEFAULT_BROKER = "redis://127.0.0.1:6379/14"
DEFAULT_RESULT = "redis://127.0.0.1:6379/15"
DEFAULT_STORE = "postgresql+psycopg://postgres@127.0.0.1:5432/durable_bench"
DEFAULT_QUEUE = "durable_bench"


def add_common_options(
    parser: argparse.ArgumentParser, store: str, queue: str, timeout: float
) -> None:
    """The options every durable-vs-Celery benchmark takes: workers, services, timing."""
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per row (median)")
    parser.add_argument("--pool", default="prefork", help="worker pool: prefork, threads, solo")
    parser.add_argument("--concurrency", type=int, default=2, help="pool size per worker")
    parser.add_argument("--workers", type=int, default=1, help="celery worker processes")
    parser.add_argument("--store-url", default=store, help="durable_database_url")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER, help="broker of both sides")
    parser.add_argument("--result-url", default=DEFAULT_RESULT, help="Celery result backend")
    parser.add_argument("--queue", default=queue, help="queue of every message")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per run at most")
    parser.add_argument("--loglevel", default="WARNING", help="worker log level")
    parser.add_argument("--log-dir", help="keep the worker logs here (default: a temp dir)")


def add_pools_option(parser: argparse.ArgumentParser) -> None:
    """``--pools prefork,threads``: run everything once per pool, one table for all."""
    parser.add_argument(
        "--pools",
        help="comma-separated worker pools to run one after the other, e.g. prefork,threads "
        "(default: --pool)",
    )


def pools_of(args: argparse.Namespace) -> list[str]:
    """The pools ``--pools`` (or else ``--pool``) names, in order."""
    named = getattr(args, "pools", None) or args.pool
    return [pool.strip() for pool in named.split(",") if pool.strip()]


def with_pool(args: argparse.Namespace, pool: str) -> argparse.Namespace:
    """A copy of ``args`` whose workers use ``pool``."""
    return argparse.Namespace(**{**vars(args), "pool": pool})


def worker_env(args: argparse.Namespace, **extra: str) -> dict[str, str]:
    """The environment of the workers (``comparison_app`` reads its ``BENCH_*``).

    The ``BENCH_*`` variables that name the services are also set in this process, which
    imports the same app module to start runs; ``extra`` goes to the workers only.
    """
    env = dict(
        os.environ,
        BENCH_BROKER_URL=args.broker_url,
        BENCH_RESULT_URL=args.result_url,
        BENCH_STORE_URL=args.store_url,
        BENCH_QUEUE=args.queue,
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    )
    os.environ.update({k: env[k] for k in env if k.startswith("BENCH_")})
    env.update(extra)
    return env


def setup_line(args: argparse.Namespace) -> str:
    """One line naming the workers, services and versions a measurement ran on, and how
    busy the machine was (the load average of the last minute)."""
    import celery

    return (
        f"workers: {args.workers} x celery worker -P {args.pool} -c {args.concurrency}"
        f" | broker {args.broker_url} | results {args.result_url} | store "
        f"{args.store_url} | Python {platform.python_version()}, Celery {celery.__version__}"
        f" | load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


def ensure_database(url: str) -> None:
    """Create the PostgreSQL database named in ``url`` if it does not exist yet."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql" or not parsed.database:
        return
    admin = create_engine(parsed.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": parsed.database}
            ).first()
            if not exists:
                conn.exec_driver_sql(f'CREATE DATABASE "{parsed.database}"')
    finally:
        admin.dispose()


def forget_benchmark_runs(store: Any, workflows: Sequence[str]) -> None:
    """Delete the store's rows of earlier benchmark runs (and only those)."""
    from sqlalchemy import delete, select

    from celery_durable.store import _schema as s

    store.ensure_schema()
    with store.engine.begin() as conn:
        ours = select(s.runs.c.id).where(s.runs.c.workflow.in_(list(workflows)))
        conn.execute(delete(s.steps).where(s.steps.c.run_id.in_(ours)))
        conn.execute(delete(s.signals).where(s.signals.c.run_id.in_(ours)))
        conn.execute(delete(s.runs).where(s.runs.c.workflow.in_(list(workflows))))


def completion_times(store: Any, run_id: str, kind: str) -> list[float]:
    """When each step of ``kind`` of a run completed (``completed_at``: the database's
    clock, UNIX seconds), in step order."""
    from sqlalchemy import select

    from celery_durable.store import _schema as s

    query = (
        select(s.steps.c.completed_at)
        .where(s.steps.c.run_id == run_id, s.steps.c.kind == kind)
        .order_by(s.steps.c.seq)
    )
    with store.engine.connect() as conn:
        return [row[0] for row in conn.execute(query)]


class Workers:
    """``celery worker`` subprocesses of the comparison app, stopped on exit."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        self.args = args
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        # Named after the queue: benchmarks on other queues of the same broker (the smoke
        # test, say) have workers of their own names, which must not answer these pings.
        self.names = [f"{args.queue}-{i}@{platform.node()}" for i in range(args.workers)]

    def __enter__(self) -> Workers:
        for name in self.names:
            log = open(self.log_dir / f"{name.split('@')[0]}-{self.args.pool}.log", "ab")
            cmd = [
                sys.executable, "-m", "celery", "-A", "comparison_app", "worker",
                "-n", name, "-Q", self.args.queue,
                "-P", self.args.pool, "-c", str(self.args.concurrency),
                "-l", self.args.loglevel,
                "--without-heartbeat", "--without-mingle", "--without-gossip",
            ]  # fmt: skip
            self.procs.append(
                subprocess.Popen(
                    cmd,
                    cwd=HERE,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        return self

    def wait_ready(self, app: Any, timeout: float = 60.0) -> None:
        """Wait until every worker answers a ping."""
        deadline = time.monotonic() + timeout
        waiting = set(self.names)
        while waiting:
            for proc in self.procs:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"a worker exited with {proc.returncode}; see the logs in {self.log_dir}"
                    )
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers {sorted(waiting)} did not start; see {self.log_dir}")
            for reply in app.control.ping(destination=sorted(waiting), timeout=0.5) or []:
                waiting -= set(reply)

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # warm shutdown
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


class CpuMeter:
    """CPU seconds spent by everything a run uses, read from ``/proc`` (Linux).

    Counts the worker processes and their pool children, the store's PostgreSQL backends
    (those connected to its database), the Redis server, and this client. On a busy
    machine wall time also measures the neighbours; CPU time mostly does not. Redis is
    shared with whatever else uses it, so its share is approximate.
    """

    def __init__(self, workers: Workers, store_url: str) -> None:
        from sqlalchemy.engine import make_url

        self.workers = workers
        self.database = make_url(store_url).database
        self.postgres = make_url(store_url).get_backend_name() == "postgresql"
        self.tick = os.sysconf("SC_CLK_TCK")
        self.redis = [p for p in self._all_pids() if self._comm(p) == "redis-server"]
        self.roles: dict[int, str] = {0: "client"}
        self.last_by_role: dict[str, float] = {}

    @staticmethod
    def _all_pids() -> list[int]:
        return [int(d) for d in os.listdir("/proc") if d.isdigit()]

    @staticmethod
    def _comm(pid: int) -> str:
        try:
            return Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            return ""

    def _cpu(self, pid: int) -> float | None:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime + stime

    def _pids(self) -> dict[int, str]:
        """The processes to count, each with its role: workers, postgres, redis."""
        pids = dict.fromkeys(self.redis, "redis")
        for proc in self.workers.procs:
            pids[proc.pid] = "workers"
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            with contextlib.suppress(OSError):
                pids.update(
                    dict.fromkeys((int(c) for c in children.read_text().split()), "workers")
                )
        if self.postgres:
            for pid in self._all_pids():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if cmdline.startswith(b"postgres: ") and f" {self.database} ".encode() in cmdline:
                    pids[pid] = "postgres"
        return pids

    def sample(self) -> dict[int, float]:
        """CPU seconds so far, by process (this client under pid 0)."""
        roles = self._pids()
        seen = {pid: self._cpu(pid) for pid in roles}
        counts = {pid: cpu for pid, cpu in seen.items() if cpu is not None}
        counts[0] = time.process_time()
        self.roles.update(roles)
        return counts

    def since(self, before: dict[int, float]) -> float:
        """CPU seconds spent since ``before`` (processes started since count in full).

        Also keeps them by role in :attr:`last_by_role` (workers, postgres, redis, client).
        """
        after = self.sample()
        spent = {pid: cpu - before.get(pid, 0.0) for pid, cpu in after.items()}
        by_role: Counter[str] = Counter()
        for pid, cpu in spent.items():
            by_role[self.roles.get(pid, "client")] += cpu
        self.last_by_role = dict(by_role)
        return sum(spent.values())


@dataclass
class Sample:
    """One timed run: wall and CPU seconds, and the counts it caused (``round_trips``)."""

    wall: float
    cpu: float
    workers: Counter[str] = field(default_factory=Counter)
    client: Counter[str] = field(default_factory=Counter)
    #: CPU seconds by role: workers, postgres, redis, client (see :class:`CpuMeter`).
    cpu_by_role: dict[str, float] = field(default_factory=dict)


def counted(fn: Callable[[], Any], expected: Any, meter: CpuMeter, tally: Any) -> Sample:
    """:func:`timed`, and what the workers and this client counted meanwhile
    (``tally``: a ``round_trips.Tally``)."""
    workers_before, client_before = tally.settled()
    wall, cpu = timed(fn, expected, meter)
    workers_after, client_after = tally.settled()
    return Sample(
        wall, cpu, workers_after - workers_before, client_after - client_before, meter.last_by_role
    )


def timed(fn: Callable[[], Any], expected: Any, meter: CpuMeter) -> tuple[float, float]:
    """Run ``fn``; returns its wall seconds and the CPU seconds everything spent on it."""
    cpu = meter.sample()
    start = time.perf_counter()
    value = fn()
    elapsed = time.perf_counter() - start
    spent = meter.since(cpu)
    if value != expected:
        raise AssertionError(f"got {value!r}, expected {expected!r}")
    return elapsed, spent


# -- the floors -----------------------------------------------------------------------------

#: What each floor is, in the order they are printed.
FLOORS = {
    "commit": "one SQL commit (BEGIN, UPDATE of one row, COMMIT) on the store's database",
    "select": "one SQL round trip (SELECT 1) to the store's database",
    "broker": "one broker round trip (publish a message, consume it)",
    "task": "one plain Celery task round trip (.delay().get() of a no-op, Redis results)",
}

FLOOR_TABLE = "bench_commit_floor"


def _commit_floor(store: Any, samples: int) -> list[float]:
    from sqlalchemy import text

    create = f"CREATE TABLE IF NOT EXISTS {FLOOR_TABLE} (id INTEGER PRIMARY KEY, n INTEGER)"
    with store.engine.begin() as conn:
        conn.execute(text(create))
        conn.execute(text(f"INSERT INTO {FLOOR_TABLE} VALUES (1, 0) ON CONFLICT DO NOTHING"))
    bump = text(f"UPDATE {FLOOR_TABLE} SET n = n + 1 WHERE id = 1")
    took = []
    for _ in range(samples):
        began = time.perf_counter()
        with store.engine.begin() as conn:  # the store's engine: its pool and SQLite pragmas
            conn.execute(bump)
        took.append(time.perf_counter() - began)
    return took


def _select_floor(store: Any, samples: int) -> list[float]:
    took = []
    with store.engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        if store.dialect == "postgresql":
            raw.autocommit = True  # the SELECT alone, without BEGIN and COMMIT around it
        try:
            cursor = raw.cursor()
            for _ in range(samples):
                began = time.perf_counter()
                cursor.execute("SELECT 1")
                cursor.fetchall()
                took.append(time.perf_counter() - began)
            cursor.close()
        finally:
            if store.dialect == "postgresql":
                raw.autocommit = False
    return took


def _broker_floor(broker_url: str, queue: str, samples: int) -> list[float]:
    from kombu import Connection

    took = []
    with Connection(broker_url) as conn:
        # A queue no worker consumes, so the message comes back to this client.
        simple = conn.SimpleQueue(f"{queue}.floor", no_ack=True)
        try:
            simple.put(0)
            simple.get(timeout=10)
            for i in range(samples):
                began = time.perf_counter()
                simple.put(i)
                simple.get(timeout=10)
                took.append(time.perf_counter() - began)
        finally:
            simple.clear()
            simple.close()
    return took


def _task_floor(task: Any, samples: int, timeout: float) -> list[float]:
    took = []
    task.delay(0).get(timeout=timeout)
    for i in range(samples):
        began = time.perf_counter()
        task.delay(i).get(timeout=timeout)
        took.append(time.perf_counter() - began)
    return took


def measure_floors(
    store: Any, args: argparse.Namespace, task: Any, samples: int
) -> dict[str, list[float]]:
    """Seconds of each of :data:`FLOORS`, ``samples`` times, on the running workers."""
    return {
        "commit": _commit_floor(store, samples),
        "select": _select_floor(store, samples),
        "broker": _broker_floor(args.broker_url, args.queue, samples),
        "task": _task_floor(task, max(1, samples // 2), args.timeout),
    }


def merge_floors(into: dict[str, list[float]], more: dict[str, list[float]]) -> None:
    """Add the samples of ``more`` to ``into``."""
    for name, values in more.items():
        into.setdefault(name, []).extend(values)


def floor_medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """The median seconds of each floor."""
    return {name: statistics.median(values) for name, values in samples.items() if values}


# -- printing -------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "l") -> None:
    """A plain-text table; ``align`` has an ``l`` (left) or ``r`` (right) per column, and
    the columns past its end are aligned right."""
    widths = [max(len(str(c)) for c in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(
            f"{c:<{w}}" if align[i : i + 1] == "l" else f"{c:>{w}}"
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(headers))
    print("-+-".join("-" * w for w in widths))
    for row in rows:
        print(line([str(c) for c in row]))


def ms(seconds: float) -> str:
    """Seconds as milliseconds, for a table cell ("-" when unknown)."""
    if seconds != seconds:
        return "-"
    return f"{seconds * 1000:.3f} ms" if seconds < 0.001 else f"{seconds * 1000:.2f} ms"


def ratio(a: float, b: float) -> str:
    """``a / b`` as ``1.23x`` ("-" when either is unknown)."""
    if a != a or b != b or not b:
        return "-"
    return f"{a / b:.2f}x"
