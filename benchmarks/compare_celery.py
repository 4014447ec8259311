"""celery_durable against plain Celery canvas, side by side, on real workers.

    uv run python benchmarks/compare_celery.py [--repeat 3] [--pool prefork] [--concurrency 2]

Starts ``celery worker`` subprocesses (one pool and concurrency for both sides), does a
warm-up run of everything, then times, ``--repeat`` times each and interleaved:

* a durable workflow awaiting ``--steps`` activities one by one, against a Celery
  ``chain`` of the same tasks (``chain(...).apply_async().get()``);
* a durable workflow gathering ``--fanout`` activities, against a Celery ``chord`` of the
  same tasks with a summing callback.

Celery's side uses a Redis result backend; the durable side needs none (its outcomes are
in the store) and waits with ``WorkflowHandle.get``. Both are timed from the client's
first call to the result in hand, and the median of the repeats is printed with the
ratio durable/celery, in wall time and in CPU time (of the workers, the store's
PostgreSQL backends, Redis and the client: see :class:`CpuMeter`). The tasks themselves
do nothing, so what is measured is each engine's own cost per step. The machine's noise
affects both sides alike: read the ratios, not the seconds; on a busy machine the CPU
ratio moves less than the wall-time one.

For digging into one side: ``--rows sequential|fanout`` and ``--only durable|celery``
narrow what is timed, ``--profile-dir DIR`` has every worker process write cProfile
stats there (``BENCH_PROFILE_CLOCK=cpu`` for CPU time), ``--log-dir`` keeps the logs.

The broker queue, Redis databases and PostgreSQL database are the benchmark's own (see
the options), so it can run beside the test suite. The store's rows of the benchmark's
workflows are deleted at start.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_options(parser, DEFAULT_STORE, DEFAULT_QUEUE, timeout=300.0)
    parser.add_argument("--steps", type=int, default=100, help="length of the sequence")
    parser.add_argument("--fanout", type=int, default=1000, help="width of the fan-out")
    parser.add_argument("--profile-dir", help="write each worker process's cProfile stats here")
    parser.add_argument(
        "--only", choices=("durable", "celery"), help="time one side only (for profiling)"
    )
    parser.add_argument(
        "--rows", choices=("both", "sequential", "fanout"), default="both", help="what to time"
    )
    return parser.parse_args(argv)


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


class Workers:
    """``celery worker`` subprocesses of the comparison app, stopped on exit."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], log_dir: Path) -> None:
        self.args = args
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names = [f"bench{i}@{platform.node()}" for i in range(args.workers)]

    def __enter__(self) -> Workers:
        for name in self.names:
            log = open(self.log_dir / f"{name.split('@')[0]}.log", "wb")
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

    def _pids(self) -> set[int]:
        pids = set(self.redis)
        for proc in self.workers.procs:
            pids.add(proc.pid)
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
            with contextlib.suppress(OSError):
                pids.update(int(c) for c in children.read_text().split())
        if self.postgres:
            for pid in self._all_pids():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                if cmdline.startswith(b"postgres: ") and f" {self.database} ".encode() in cmdline:
                    pids.add(pid)
        return pids

    def sample(self) -> dict[int, float]:
        """CPU seconds so far, by process (this client under pid 0)."""
        seen = {pid: self._cpu(pid) for pid in self._pids()}
        counts = {pid: cpu for pid, cpu in seen.items() if cpu is not None}
        counts[0] = time.process_time()
        return counts

    def since(self, before: dict[int, float]) -> float:
        """CPU seconds spent since ``before`` (processes started since count in full)."""
        after = self.sample()
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = dict(
        os.environ,
        BENCH_BROKER_URL=args.broker_url,
        BENCH_RESULT_URL=args.result_url,
        BENCH_STORE_URL=args.store_url,
        BENCH_QUEUE=args.queue,
        BENCH_PROFILE_DIR=os.path.abspath(args.profile_dir) if args.profile_dir else "",
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    )
    os.environ.update({k: env[k] for k in env if k.startswith("BENCH_")})
    sys.path.insert(0, str(HERE))
    ensure_database(args.store_url)

    import celery
    import comparison_app as bench
    from celery import chain, chord

    from celery_durable import WorkflowHandle
    from celery_durable._config import store_for

    app = bench.app
    app.set_current()
    forget_benchmark_runs(store_for(app), [bench.sequential.name, bench.fanout.name])
    app.control.purge()

    n, width, timeout = args.steps, args.fanout, args.timeout
    last_turns: dict[str, int] = {}

    def durable(workflow: Any, size: int, row: str) -> Callable[[], Any]:
        def run() -> Any:
            handle = workflow.delay(size)
            value = handle.get(timeout=timeout)
            last_turns[row] = WorkflowHandle(handle.id, app=app).describe()["turns"]
            return value

        return run

    def celery_chain() -> Any:
        first, *rest = [bench.add_one.s(0)] + [bench.add_one.s() for _ in range(n - 1)]
        return chain(first, *rest).apply_async().get(timeout=timeout)

    def celery_chord() -> Any:
        header = [bench.add_one.s(i) for i in range(width)]
        return chord(header, bench.total.s()).apply_async().get(timeout=timeout)

    rows: list[tuple[str, str, Callable[[], Any], Callable[[], Any], Any]] = [
        (f"sequential {n}", f"chain of {n}", durable(bench.sequential, n, "seq"),
         celery_chain, n),
        (f"gather {width}", f"chord of {width}", durable(bench.fanout, width, "fan"),
         celery_chord, sum(range(1, width + 1))),
    ]  # fmt: skip
    keys = ["seq", "fan"]
    if args.rows != "both":
        keep = 0 if args.rows == "sequential" else 1
        rows, keys = [rows[keep]], [keys[keep]]
    turns: dict[str, list[int]] = {"seq": [], "fan": []}

    with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        with Workers(args, env, log_dir) as workers:
            workers.wait_ready(app)
            print(
                f"workers: {args.workers} x celery worker -P {args.pool} -c {args.concurrency}"
                f" | broker {args.broker_url} | results {args.result_url} | store "
                f"{args.store_url} | Python {platform.python_version()}, Celery "
                f"{celery.__version__}",
                flush=True,
            )
            meter = CpuMeter(workers, args.store_url)
            sides = {"durable": args.only != "celery", "celery": args.only != "durable"}
            for _, _, run_durable, run_celery, expected in rows:  # warm-up
                if sides["durable"]:
                    timed(run_durable, expected, meter)
                if sides["celery"]:
                    timed(run_celery, expected, meter)
            skipped = (math.nan, math.nan)
            samples: list[tuple[list[tuple[float, float]], list[tuple[float, float]]]] = [
                ([], []) for _ in rows
            ]
            for _ in range(args.repeat):
                # Interleaved, so that a slow spell of the machine hits both sides.
                for (_, _, run_durable, run_celery, expected), (d, c), key in zip(
                    rows, samples, keys, strict=True
                ):
                    d.append(timed(run_durable, expected, meter) if sides["durable"] else skipped)
                    turns[key].append(last_turns.get(key, 0))
                    c.append(timed(run_celery, expected, meter) if sides["celery"] else skipped)
                    print(
                        f"  {key}: durable {d[-1][0]:.3f} s ({d[-1][1]:.2f} s CPU), "
                        f"celery {c[-1][0]:.3f} s ({c[-1][1]:.2f} s CPU)",
                        flush=True,
                    )

    print()
    header = (
        f"{'durable workflow':<16} {'celery canvas':<14} {'durable s':>9} {'celery s':>9} "
        f"{'ratio':>6} | {'durable CPU':>11} {'celery CPU':>10} {'ratio':>6} | {'turns':>5}"
    )
    print(header)
    print("-" * len(header))
    for (durable_name, celery_name, *_), (d, c), key in zip(rows, samples, keys, strict=True):
        dw, cw = statistics.median(x[0] for x in d), statistics.median(x[0] for x in c)
        dc, cc = statistics.median(x[1] for x in d), statistics.median(x[1] for x in c)
        print(
            f"{durable_name:<16} {celery_name:<14} {dw:>9.3f} {cw:>9.3f} {dw / cw:>5.2f}x | "
            f"{dc:>11.2f} {cc:>10.2f} {dc / cc:>5.2f}x | {statistics.median(turns[key]):>5.0f}"
        )
    print(
        f"(median of {args.repeat}; seconds of wall time, and CPU seconds of the workers, "
        "the store's PostgreSQL backends, Redis and this client; turns = driver turns per run)"
    )


if __name__ == "__main__":
    main()
