"""10,000 workflow runs waiting at once hold no worker slot and leave worker memory flat.

    uv run python benchmarks/waiting_runs.py [--runs 10000] [--concurrency 2]
        [--store-url postgresql+psycopg://...] [--broker-url redis://...]

Starts one real ``celery worker -P prefork`` of ``waiting_app`` with every ``durable_*``
setting at its default, then:

1. **Timer lateness, idle.** ``--timer-samples`` runs sleep a few seconds each; for each
   timer it reports how long after its deadline the sweeper fired it, the workflow saw
   it (``workflow.now()`` after the sleep) and the run finished.
2. **Start** ``--runs`` runs with the normal API (``.delay()``, one after another): half
   sleep ``--sleep`` seconds (an hour by default), half wait for a signal. Timed, and the
   time until every run has had its first turn and waits.
3. **While they wait:** the worker's active tasks (``inspect().active()``), the latency
   of a plain task (sent to its first instruction, ``--pings`` times), and timer lateness
   again with all of them waiting.
4. **Signal** every signal-waiter and time until all have completed.

All along, the worker's resident memory (main process plus pool children, from
``/proc``) is sampled every 0.2 s; the table shows it before, at the peak of each phase,
and after. Nothing here is asserted: it prints what it measured.

The queue and PostgreSQL database are the benchmark's own (see the options), so it can
run beside the test suite and ``compare_celery.py``; its rows are deleted before and
after. ``--profile start`` (or ``signal``) prints where the
client's time goes while starting runs (or signalling them).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import ensure_database, forget_benchmark_runs  # noqa: E402 - sibling module

DEFAULT_BROKER = "redis://127.0.0.1:6379/14"
DEFAULT_RESULT = "redis://127.0.0.1:6379/15"
DEFAULT_STORE = "postgresql+psycopg://postgres@127.0.0.1:5432/durable_waiting_bench"
DEFAULT_QUEUE = "durable_waiting_bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000, help="runs waiting at once")
    parser.add_argument("--concurrency", type=int, default=2, help="prefork pool size")
    parser.add_argument("--store-url", default=DEFAULT_STORE, help="durable_database_url")
    parser.add_argument("--broker-url", default=DEFAULT_BROKER, help="broker URL")
    parser.add_argument("--result-url", default=DEFAULT_RESULT, help="plain task's backend")
    parser.add_argument("--queue", default=DEFAULT_QUEUE, help="queue of every message")
    parser.add_argument(
        "--cache-size",
        type=int,
        help="the worker's durable_cache_size (default: the library's, 1000 per process)",
    )
    parser.add_argument("--sleep", type=float, default=3600.0, help="the sleepers' sleep, s")
    parser.add_argument("--pings", type=int, default=30, help="plain tasks timed per phase")
    parser.add_argument("--timer-samples", type=int, default=40, help="short timers timed")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per phase")
    parser.add_argument("--loglevel", default="WARNING", help="worker log level")
    parser.add_argument("--log-dir", help="keep the worker log here (default: a temp dir)")
    parser.add_argument(
        "--analyze-every",
        type=float,
        default=10.0,
        help="if the server's autovacuum is off, ANALYZE the store's tables this often (s), "
        "as autovacuum would; 0: never",
    )
    parser.add_argument(
        "--profile",
        choices=("start", "signal"),
        help="print where the client's time goes while starting runs or signalling them",
    )
    return parser.parse_args(argv)


# -- the store ------------------------------------------------------------------------------


def count_runs(store: Any, ids: Sequence[str] | None, workflow: str, **where: Any) -> int:
    """Runs of ``workflow`` matching ``where`` (``status=``, ``min_turn=``)."""
    from sqlalchemy import func, select

    from celery_durable.store import _schema as s

    query = select(func.count()).select_from(s.runs).where(s.runs.c.workflow == workflow)
    if "status" in where:
        query = query.where(s.runs.c.status == where["status"])
    if "min_turn" in where:
        query = query.where(s.runs.c.turn >= where["min_turn"])
    if ids is not None:
        query = query.where(s.runs.c.id.in_(list(ids)))
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


class Analyzer:
    """Stands in for PostgreSQL's autovacuum where it is off: ANALYZE the store's tables
    every ``interval`` seconds, so the planner knows how big they have grown."""

    def __init__(self, store: Any, interval: float) -> None:
        from sqlalchemy import text

        self.store = store
        self.interval = interval
        self.enabled = False
        if store.dialect == "postgresql" and interval > 0:
            with store.engine.connect() as conn:
                self.enabled = conn.execute(text("SHOW autovacuum")).scalar_one() == "off"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        from sqlalchemy import text

        while not self._stop.wait(self.interval):
            with self.store.engine.connect() as conn:
                conn.execute(text("ANALYZE durable_runs, durable_steps, durable_signals"))
                conn.commit()

    def start(self) -> None:
        if self.enabled:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def wait_until(what: str, done: Callable[[], bool], timeout: float, every: float = 0.2) -> float:
    """Poll ``done`` until true; returns the seconds it took."""
    start = time.perf_counter()
    while not done():
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(every)
    return time.perf_counter() - start


# -- the worker and its memory --------------------------------------------------------------


class Worker:
    """One ``celery worker -P prefork`` of ``waiting_app``, stopped on exit."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str], log: Path) -> None:
        self.name = f"waiting-bench@{platform.node()}"
        command = [
            sys.executable, "-m", "celery", "-A", "waiting_app", "worker", "-n", self.name,
            "-Q", args.queue, "-P", "prefork", "-c", str(args.concurrency),
            "-l", args.loglevel, "--without-heartbeat", "--without-mingle", "--without-gossip",
        ]  # fmt: skip
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def wait_ready(self, app: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not app.control.ping(destination=[self.name], timeout=0.5):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker did not start; see {self.log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # warm shutdown
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        found += children
        frontier += children
    return found


def _rss(pid: int) -> int:
    """Resident bytes of one process (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MemorySampler:
    """Samples the worker's RSS (main + pool children) every ``interval`` seconds, by phase."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid = pid
        self.interval = interval
        self.phase = "before"
        self.samples: dict[str, list[int]] = {}
        self.processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> int:
        pids = [self.pid, *_descendants(self.pid)]
        self.processes = len(pids)
        return sum(_rss(p) for p in pids)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.setdefault(self.phase, []).append(self.sample())
            self._stop.wait(self.interval)

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        self.phase = phase
        self.samples.setdefault(phase, []).append(self.sample())
        yield
        self.samples[phase].append(self.sample())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, phase: str | None = None) -> int:
        if phase is None:
            return max(max(v) for v in self.samples.values())
        return max(self.samples.get(phase) or [0])

    def last(self, phase: str) -> int:
        return (self.samples.get(phase) or [0])[-1]


# -- measurements ---------------------------------------------------------------------------


def ping_latencies(task: Any, count: int, timeout: float) -> list[float]:
    """Seconds from sending a plain task to its first instruction, ``count`` times."""
    latencies = []
    for _ in range(count):
        sent = time.time()
        began = task.apply_async().get(timeout=timeout)
        latencies.append(began - sent)
    return latencies


def timer_lateness(app: Any, bench: Any, samples: int, timeout: float) -> dict[str, list[float]]:
    """Start ``samples`` short sleeps (1-4.5 s, spread) and measure how late each fired
    (sweeper), was seen by the workflow, and finished, after its deadline."""
    from celery_durable._config import store_for

    store = store_for(app)
    handles = [bench.sleeper.delay(1.0 + (i * 0.37) % 3.5) for i in range(samples)]
    ids = [h.id for h in handles]
    wait_until(
        "the short sleeps",
        lambda: count_runs(store, ids, bench.sleeper.name, status="SUCCESS") == len(ids),
        timeout,
    )
    late: dict[str, list[float]] = {"fired": [], "seen": [], "finished": []}
    for handle in handles:
        [timer] = [s for s in store.history(handle.id) if s.kind == "timer"]
        run = store.require_run(handle.id)
        due = timer.due_at
        assert timer.completed_at is not None and run.finished_at is not None
        late["fired"].append(timer.completed_at - due)
        late["seen"].append(handle.get(timeout=1) - due)  # workflow.now() after the sleep
        late["finished"].append(run.finished_at - due)
    return late


def active_tasks(app: Any, name: str) -> int | None:
    """Tasks the worker is running right now (None if it did not answer)."""
    replies = app.control.inspect(destination=[name], timeout=2.0).active()
    if not replies:
        return None
    return sum(len(tasks) for tasks in replies.values())


def queued(app: Any, queue: str) -> int:
    """Messages waiting in ``queue`` (not counting those a worker has taken)."""
    with app.connection_for_write() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        except conn.channel_errors:  # Redis: an empty queue is no key at all
            return 0


def sweeper_wakes(log: Path) -> int:
    """Wakes the worker's sweeper sent for runs it took for lost, from its log."""
    found = re.findall(rb"and woke (\d+) runs", log.read_bytes())
    return sum(int(n) for n in found)


@contextmanager
def profiled(enabled: bool, top: int = 25) -> Iterator[None]:
    """Print the ``top`` functions by cumulative time of the block, if ``enabled``."""
    if not enabled:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("cumulative").print_stats(top)
        print(out.getvalue())


# -- the report -----------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def mb(value: int) -> str:
    return f"{value / 2**20:.0f} MB"


def spread(values: Sequence[float]) -> str:
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return (
        f"p50 {ms(statistics.median(ordered))}, p95 {ms(p95)}, max {ms(ordered[-1])} "
        f"(min {ms(ordered[0])}, n={len(ordered)})"
    )


def print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print()
    for key, value in rows:
        print(f"{key:<{width}}  {value}" if value else f"\n{key}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = dict(
        os.environ,
        BENCH_BROKER_URL=args.broker_url,
        BENCH_RESULT_URL=args.result_url,
        BENCH_STORE_URL=args.store_url,
        BENCH_QUEUE=args.queue,
        BENCH_CACHE_SIZE="" if args.cache_size is None else str(args.cache_size),
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
    )
    os.environ.update({k: v for k, v in env.items() if k.startswith("BENCH_")})
    sys.path.insert(0, str(HERE))
    ensure_database(args.store_url)

    import celery
    import waiting_app as bench

    from celery_durable import WorkflowHandle
    from celery_durable._config import store_for

    app = bench.app
    app.set_current()
    store = store_for(app)
    forget_benchmark_runs(store, bench.WORKFLOWS)
    app.control.purge()

    rows: list[tuple[str, str]] = []
    sleepers, waiters = args.runs // 2, args.runs - args.runs // 2
    with tempfile.TemporaryDirectory(prefix="durable-waiting-") as tmp:
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        worker = Worker(args, env, log_dir / "worker.log")
        memory = MemorySampler(worker.proc.pid)
        analyzer = Analyzer(store, args.analyze_every)
        try:
            worker.wait_ready(app)
            cache = "default" if args.cache_size is None else args.cache_size
            print(
                f"worker: celery worker -P prefork -c {args.concurrency} (durable_cache_size "
                f"{cache}) | broker "
                f"{args.broker_url} | store {args.store_url} | Python "
                f"{platform.python_version()}, Celery {celery.__version__}, "
                f"{os.cpu_count()} cores",
                flush=True,
            )
            ping_latencies(bench.started_at, 5, args.timeout)  # warm-up
            if analyzer.enabled:
                print(
                    f"autovacuum is off on this server: ANALYZE every {args.analyze_every:g} s "
                    "stands in for it",
                    flush=True,
                )
            analyzer.start()
            memory.start()

            with memory.during("idle"):
                idle_pings = ping_latencies(bench.started_at, args.pings, args.timeout)
                idle_timers = timer_lateness(app, bench, args.timer_samples, args.timeout)
            print("idle measurements done", flush=True)

            waiter_ids: list[str] = []
            with memory.during("start"), profiled(args.profile == "start"):
                began = time.perf_counter()
                for i in range(args.runs):
                    if i % 2 == 0 and i // 2 < sleepers:
                        bench.sleeper.delay(args.sleep)
                    else:
                        waiter_ids.append(bench.waiter.delay().id)
                start_seconds = time.perf_counter() - began
            print(f"started {args.runs} runs in {start_seconds:.1f} s", flush=True)

            def all_waiting() -> bool:
                waiting = sum(
                    count_runs(store, None, w, min_turn=1, status="RUNNING")
                    for w in bench.WORKFLOWS
                )
                return waiting >= int(args.runs)

            with memory.during("first turns"):
                settle_seconds = wait_until("every run waiting", all_waiting, args.timeout, 0.5)
            print(f"all {args.runs} waiting after {settle_seconds:.1f} s more", flush=True)

            with memory.during("waiting"):
                # The first turns may still be draining (and duplicate wakes the sweeper
                # sent for runs that waited in the queue longer than the stall timeout).
                drain_seconds = wait_until(
                    "the queue draining", lambda: queued(app, args.queue) == 0, args.timeout
                )
                busy = []
                for _ in range(5):
                    time.sleep(0.5)
                    busy.append(active_tasks(app, worker.name))
                waiting_pings = ping_latencies(bench.started_at, args.pings, args.timeout)
                loaded_timers = timer_lateness(app, bench, args.timer_samples, args.timeout)
                time.sleep(2.0)  # a few more memory samples of the quiet state

            with memory.during("signal all"), profiled(args.profile == "signal"):
                began = time.perf_counter()
                for number, run_id in enumerate(waiter_ids):
                    WorkflowHandle(run_id, app=app).signal("go", number)
                signal_seconds = time.perf_counter() - began
                done_seconds = signal_seconds + wait_until(
                    "every signalled run finishing",
                    lambda: (
                        count_runs(store, waiter_ids, bench.waiter.name, status="SUCCESS")
                        == len(waiter_ids)
                    ),
                    args.timeout,
                )
            results = _results(store, waiter_ids)
            wrong = sum(1 for n, rid in enumerate(waiter_ids) if results.get(rid) != n)

            with memory.during("after"):
                time.sleep(2.0)
            memory.stop()
            resent = sweeper_wakes(worker.log)
        finally:
            analyzer.stop()
            worker.stop()
            forget_benchmark_runs(store, bench.WORKFLOWS)

    rows += [
        (f"{args.runs:,} runs waiting at once ({sleepers:,} on a {args.sleep:g} s sleep, "
         f"{waiters:,} on a signal)", ""),
        ("start them (client, .delay() one by one)",
         f"{start_seconds:.1f} s ({args.runs / start_seconds:,.0f} runs/s)"),
        ("until every run has had its first turn", f"{settle_seconds:.1f} s more"),
        ("until the queue was empty", f"{drain_seconds:.1f} s more"),
        ("wakes the sweeper re-sent (runs queued > stall timeout)", f"{resent:,}"),
        ("worker tasks running while they wait (5 looks)",
         " ".join("?" if b is None else str(b) for b in busy)
         + f" (of {args.concurrency} slots)"),
        (f"signal all {waiters:,} waiters (client)", f"{signal_seconds:.1f} s"),
        (f"until all {waiters:,} signalled runs completed",
         f"{done_seconds:.1f} s after the first signal"
         + ("" if not wrong else f" ({wrong} with a wrong result!)")),
        ("plain task latency (sent -> running)", ""),
        ("  idle worker", spread(idle_pings)),
        (f"  {args.runs:,} runs waiting", spread(waiting_pings)),
        (f"worker RSS (main + pool children, {memory.processes} processes)", ""),
        ("  before (idle)", mb(memory.last("idle"))),
        ("  peak while starting / first turns",
         f"{mb(memory.peak('start'))} / {mb(memory.peak('first turns'))}"),
        (f"  peak while {args.runs:,} wait", mb(memory.peak("waiting"))),
        ("  peak while signalled runs complete", mb(memory.peak("signal all"))),
        ("  after", mb(memory.last("after"))),
        ("  peak overall", mb(memory.peak())),
        ("timer lateness after the deadline (default durable_timer_interval 0.5 s)", ""),
        ("  idle: fired by the sweeper", spread(idle_timers["fired"])),
        ("  idle: seen by the workflow", spread(idle_timers["seen"])),
        ("  idle: run finished", spread(idle_timers["finished"])),
        (f"  {args.runs:,} waiting: fired", spread(loaded_timers["fired"])),
        (f"  {args.runs:,} waiting: seen by the workflow", spread(loaded_timers["seen"])),
        (f"  {args.runs:,} waiting: run finished", spread(loaded_timers["finished"])),
    ]  # fmt: skip
    print_table(rows)


def _results(store: Any, ids: Sequence[str]) -> dict[str, Any]:
    """The decoded results of runs ``ids`` (JSON), read in one query."""
    from sqlalchemy import select

    from celery_durable.store import _schema as s

    with store.engine.connect() as conn:
        rows = conn.execute(
            select(s.runs.c.id, s.runs.c.result).where(s.runs.c.id.in_(list(ids)))
        ).all()
    return {row.id: json.loads(row.result) for row in rows if row.result is not None}


if __name__ == "__main__":
    main()
