"""celery_durable against plain Celery canvas, side by side, on real workers.

    uv run python benchmarks/compare_celery.py [--pools prefork,threads] [--repeat 3]
        [--rows sequential,gather,concurrent,scaling,long] [--quick]

Starts ``celery worker`` subprocesses of ``comparison_app`` (``--pool``/``--pools``,
``--concurrency`` 2; one pool after the other, the same workers for both sides), warms
them up at small sizes, then times each row ``--repeat`` (3) times (``concurrent`` and
``scaling``, a minute or more each at full size: ``--heavy-repeat``, 1), durable and
Celery in turns so that a slow spell of the machine hits both:

| row | durable | Celery (Redis results) | target |
|---|---|---|---|
| ``sequential`` | a workflow awaiting ``--steps`` (100) tasks in turn | ``chain`` of 100 | 1.3x |
| ``gather`` | a workflow gathering ``--fanout`` (1000) tasks | ``chord`` of 1000 | 1.0x |
| ``concurrent`` | ``--concurrent-runs`` (500) workflows of 4 steps | 500 chains of 4 | 1.5x |
| ``scaling`` | 8 runs at once of 400 steps, and of 40 | 8 chains of each | 1.15x |
| ``long`` | one run of ``--long-steps`` (10,000) steps | none | 1.15x |

``scaling`` compares the time per step of 8 concurrent runs of 400 steps with that of 8
runs of 40 (durable; Celery's chains for reference): a step should not cost more because
its run has a longer history. ``long`` runs one workflow of 10,000 sequential steps and
reads each step's ``completed_at`` (the database's clock) from ``durable_steps`` after
it: the time per step of the last ``--long-window`` (1,000) steps against the first 1,000,
and every window between. It takes a few minutes, so it runs only when named
(``--rows ...,long``); Celery has no twin of it (a chain of 10,000 carries the rest of the
chain in every message).

Every run is timed from the client's first call to the last result in hand (durable:
``.delay()`` then ``WorkflowHandle.get``; Celery: ``apply_async()`` then ``.get()``, or
``ResultSet.join_native`` for many), in wall time and in CPU time (the workers, the
store's PostgreSQL backends, Redis and the client: see ``harness.CpuMeter``; a table
shows who spent it, per step). The tasks do nothing, so what is measured is each engine's
own cost per step. Read the ratios, measured in the same run, not the seconds; on a busy
machine the CPU ratios move less than the wall ones (the setup line shows the load
average). Nothing is asserted.

The workers also count, per process, their SQL round trips and broker messages (see
``round_trips.py`` for exactly what counts as a round trip), and the table shows them per
step over the timed runs: ``SQL/step`` and ``msgs/step`` of the workers' own work (the
sweeper thread's background polls are shown apart, per second), and the client's (the
``.delay()`` and the polling of ``get``) apart too. The floors (``harness.FLOORS``: one
SQL commit, one SQL round trip, one broker round trip, one plain Celery task round trip)
are measured on the same workers before and after the rows, and the sequential step is
shown in units of each. A summary then prints each of the issue's targets beside what
was measured, for every pool.

``--quick`` runs every row at tiny sizes (the smoke test's mode). For digging into one
side: ``--only durable|celery``, ``--profile-dir DIR`` (each worker process writes
cProfile stats there; ``BENCH_PROFILE_CLOCK=cpu`` for CPU time), ``--log-dir``. The
queue, Redis databases and PostgreSQL database are the benchmark's own (see the
options), so it can run beside the test suite; the rows of the benchmark's workflows are
deleted at start.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402 - the sibling modules, importable once on the path
    DEFAULT_QUEUE,
    DEFAULT_STORE,
    FLOORS,
    CpuMeter,
    Sample,
    Workers,
    add_common_options,
    add_pools_option,
    completion_times,
    counted,
    ensure_database,
    floor_medians,
    forget_benchmark_runs,
    measure_floors,
    merge_floors,
    ms,
    pools_of,
    print_table,
    ratio,
    setup_line,
    timed,
    with_pool,
    worker_env,
)
from round_trips import Tally, per_step  # noqa: E402

ROWS = ("sequential", "gather", "concurrent", "scaling", "long")
DEFAULT_ROWS = "sequential,gather,concurrent,scaling"

#: Sizes of a full run, and of ``--quick``; an option given on the command line wins.
FULL = {
    "repeat": 3,
    "heavy_repeat": 1,
    "steps": 100,
    "fanout": 1000,
    "concurrent_runs": 500,
    "concurrent_steps": 4,
    "scaling_runs": 8,
    "scaling_steps": "400,40",
    "long_steps": 10_000,
    "long_window": 1000,
    "floor_samples": 100,
}
QUICK = {
    "repeat": 1,
    "heavy_repeat": 1,
    "steps": 5,
    "fanout": 10,
    "concurrent_runs": 10,
    "concurrent_steps": 4,
    "scaling_runs": 2,
    "scaling_steps": "20,4",
    "long_steps": 60,
    "long_window": 20,
    "floor_samples": 10,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_common_options(parser, DEFAULT_STORE, DEFAULT_QUEUE, timeout=300.0)
    add_pools_option(parser)
    parser.set_defaults(repeat=None)
    parser.add_argument(
        "--rows",
        help=f"comma-separated rows out of {','.join(ROWS)} (default: {DEFAULT_ROWS}; "
        "with --quick: all)",
    )
    parser.add_argument("--quick", action="store_true", help="every row at tiny sizes")
    parser.add_argument(
        "--heavy-repeat",
        type=int,
        help="timed runs of the concurrent and scaling rows, which take a minute or more "
        "each at full size (default 1; --repeat is for sequential and gather)",
    )
    parser.add_argument("--steps", type=int, help="sequential: length of the sequence (100)")
    parser.add_argument("--fanout", type=int, help="gather: width of the fan-out (1000)")
    parser.add_argument("--concurrent-runs", type=int, help="concurrent: runs at once (500)")
    parser.add_argument("--concurrent-steps", type=int, help="concurrent: steps of each (4)")
    parser.add_argument("--scaling-runs", type=int, help="scaling: runs at once (8)")
    parser.add_argument("--scaling-steps", help="scaling: steps per run, long and short (400,40)")
    parser.add_argument("--long-steps", type=int, help="long: steps of the one run (10000)")
    parser.add_argument("--long-window", type=int, help="long: steps per window (1000)")
    parser.add_argument(
        "--long-timeout", type=float, default=3600.0, help="long: seconds the run may take"
    )
    parser.add_argument("--floor-samples", type=int, help="timings of each floor (100)")
    parser.add_argument("--profile-dir", help="write each worker process's cProfile stats here")
    parser.add_argument(
        "--only", choices=("durable", "celery"), help="time one side only (for profiling)"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    for name, value in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.rows = [
        r.strip()
        for r in (args.rows or (",".join(ROWS) if args.quick else DEFAULT_ROWS)).split(",")
        if r.strip()
    ]
    unknown = set(args.rows) - set(ROWS)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(ROWS)}")
    args.scaling_long, args.scaling_short = (int(n) for n in args.scaling_steps.split(","))
    return args


# -- what is timed --------------------------------------------------------------------------


@dataclass
class Row:
    """One durable-vs-Celery comparison: ``runs`` runs at once of ``steps`` steps each."""

    key: str
    durable: str
    celery: str
    runs: int
    steps: int
    expected: Any

    @property
    def heavy(self) -> bool:
        """Timed ``--heavy-repeat`` times rather than ``--repeat``."""
        return self.key not in ("sequential", "gather")

    @property
    def total_steps(self) -> int:
        return self.runs * self.steps


@dataclass
class PoolResult:
    """Everything measured on one pool."""

    pool: str
    samples: dict[str, dict[str, list[Sample]]] = field(default_factory=dict)
    turns: dict[str, list[int]] = field(default_factory=dict)
    floors: dict[str, list[float]] = field(default_factory=dict)
    long: dict[str, Any] | None = None
    sweeper_sql: float = 0.0
    seconds: float = 0.0

    def median(self, key: str, side: str, what: str = "wall") -> float:
        values = [getattr(s, what) for s in self.samples.get(key, {}).get(side, [])]
        return statistics.median(values) if values else math.nan

    def counts(self, key: str, side: str) -> tuple[Counter[str], Counter[str]]:
        workers: Counter[str] = Counter()
        client: Counter[str] = Counter()
        for sample in self.samples.get(key, {}).get(side, []):
            workers.update(sample.workers)
            client.update(sample.client)
        return workers, client


def rows_of(args: argparse.Namespace) -> list[Row]:
    """The durable-vs-Celery rows ``--rows`` asks for, at ``args``' sizes."""
    rows: list[Row] = []
    if "sequential" in args.rows:
        n = args.steps
        rows.append(Row("sequential", f"sequential {n}", f"chain of {n}", 1, n, [n]))
    if "gather" in args.rows:
        n = args.fanout
        rows.append(Row("gather", f"gather {n}", f"chord of {n}", 1, n, [sum(range(1, n + 1))]))
    if "concurrent" in args.rows:
        runs, n = args.concurrent_runs, args.concurrent_steps
        rows.append(
            Row("concurrent", f"{runs} runs of {n} at once", f"{runs} chains of {n}", runs, n,
                [n] * runs)
        )  # fmt: skip
    if "scaling" in args.rows:
        runs = args.scaling_runs
        for key, n in (("scaling-long", args.scaling_long), ("scaling-short", args.scaling_short)):
            rows.append(
                Row(key, f"{runs} runs of {n} at once", f"{runs} chains of {n}", runs, n,
                    [n] * runs)
            )  # fmt: skip
    return rows


def runners(
    row: Row, bench: Any, timeout: float
) -> tuple[Callable[[], Any], Callable[[], Any], list[Any]]:
    """``(run durable, run celery, handles)`` of a row; ``handles`` holds the last
    durable run's handles (read after the timing, for its turns)."""
    from celery import chain, chord
    from celery.result import ResultSet

    handles: list[Any] = []

    def durable() -> list[Any]:
        if row.key == "gather":
            started = [bench.fanout.delay(row.steps)]
        else:
            started = [bench.sequential.delay(row.steps) for _ in range(row.runs)]
        handles[:] = started
        return [h.get(timeout=timeout) for h in started]

    def celery() -> list[Any]:
        if row.key == "gather":
            header = [bench.add_one.s(i) for i in range(row.steps)]
            results = [chord(header, bench.total.s()).apply_async()]
        else:
            results = [
                chain(
                    bench.add_one.s(0), *(bench.add_one.s() for _ in range(row.steps - 1))
                ).apply_async()
                for _ in range(row.runs)
            ]
        if len(results) == 1:
            return [results[0].get(timeout=timeout)]
        # Not one .get() after another: with many results pending, Celery's Redis result
        # consumer sometimes misses one that is already stored, and .get() waits out its
        # timeout (celery/celery#4039, seen here with 5.7.0). join_native waits for all.
        return ResultSet(results).join_native(timeout=timeout)

    return durable, celery, handles


def long_run(bench: Any, store: Any, steps: int, window: int, timeout: float) -> dict[str, Any]:
    """One run of ``steps`` steps; the time per step of each window of ``window`` steps,
    from the steps' ``completed_at`` (the database's clock)."""
    began = time.perf_counter()
    handle = bench.sequential.delay(steps)
    value = handle.get(timeout=timeout)
    wall = time.perf_counter() - began
    if value != steps:
        raise AssertionError(f"got {value!r}, expected {steps!r}")
    done = completion_times(store, handle.id, "activity")
    # Windows of ``window`` steps each, from the first step's completion (so the start of
    # the run is in none of them); the last one ends with the last step.
    starts = [*range(0, len(done) - window, window)]
    if starts[-1] != len(done) - 1 - window:
        starts.append(len(done) - 1 - window)
    windows = [(done[i + window] - done[i]) / window for i in starts]
    return {
        "wall": wall,
        "steps": len(done),
        "first": windows[0],
        "last": windows[-1],
        "windows": windows,
    }


# -- measuring ------------------------------------------------------------------------------


def measure_pool(args: argparse.Namespace, bench: Any, store: Any, log_dir: Path) -> PoolResult:
    """Start workers of ``args.pool`` and measure every row on them."""
    from celery_durable import WorkflowHandle

    result = PoolResult(args.pool)
    count_dir = Path(tempfile.mkdtemp(prefix=f"counts-{args.pool}-", dir=log_dir))
    if args.profile_dir:
        Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    env = worker_env(
        args,
        BENCH_PROFILE_DIR=os.path.abspath(args.profile_dir) if args.profile_dir else "",
        BENCH_COUNT_DIR=str(count_dir),
    )
    rows = rows_of(args)
    sides = [s for s in ("durable", "celery") if args.only in (None, s)]
    began = time.perf_counter()
    with Workers(args, env, log_dir) as workers:
        workers.wait_ready(bench.app)
        print(setup_line(args), flush=True)
        meter = CpuMeter(workers, args.store_url)
        tally = Tally(count_dir)
        small = argparse.Namespace(
            **{**vars(args), **QUICK, "scaling_long": 20, "scaling_short": 4}
        )
        for row in rows_of(small):  # warm-up: connections, imports, pool children
            durable, celery, _ = runners(row, bench, args.timeout)
            for side, run in (("durable", durable), ("celery", celery)):
                if side in sides:
                    timed(run, row.expected, meter)
        merge_floors(result.floors, measure_floors(store, args, bench.add_one, args.floor_samples))
        sweeper_start = tally.settled()[0]
        sweeper_time = time.monotonic()
        for attempt in range(max(args.repeat, args.heavy_repeat)):
            for row in rows:
                if attempt >= (args.heavy_repeat if row.heavy else args.repeat):
                    continue
                durable, celery, handles = runners(row, bench, args.timeout)
                for side, run in (("durable", durable), ("celery", celery)):
                    if side not in sides:
                        continue
                    sample = counted(run, row.expected, meter, tally)
                    result.samples.setdefault(row.key, {}).setdefault(side, []).append(sample)
                    if side == "durable":
                        turns = WorkflowHandle(handles[0].id, app=bench.app).describe()
                        result.turns.setdefault(row.key, []).append(turns["turns"])
                    print(
                        f"  {args.pool} {row.key} {side}: {sample.wall:.3f} s "
                        f"({sample.cpu:.2f} s CPU)",
                        flush=True,
                    )
        if "long" in args.rows and "durable" in sides:
            print(f"  {args.pool} long: one run of {args.long_steps} steps...", flush=True)
            result.long = long_run(
                bench, store, args.long_steps, args.long_window, args.long_timeout
            )
            print(f"  {args.pool} long: {result.long['wall']:.1f} s", flush=True)
        sweeper_end = tally.settled()[0]
        elapsed = time.monotonic() - sweeper_time
        result.sweeper_sql = per_step(sweeper_end - sweeper_start, 1, "sweeper")["sql"] / elapsed
        merge_floors(result.floors, measure_floors(store, args, bench.add_one, args.floor_samples))
    result.seconds = time.perf_counter() - began
    return result


# -- the report -----------------------------------------------------------------------------


def per_step_s(result: PoolResult, row: Row, side: str, what: str = "wall") -> float:
    return result.median(row.key, side, what) / row.total_steps


def sample_steps(result: PoolResult, row: Row, side: str) -> int:
    """Steps of all the timed runs of ``row`` on ``side``."""
    return row.total_steps * len(result.samples.get(row.key, {}).get(side, []))


def print_times(result: PoolResult, rows: list[Row], args: argparse.Namespace) -> None:
    """Wall and CPU time of each row, then the scaling and long rows' per-step ratios."""
    table = []
    for row in rows:
        dw, cw = result.median(row.key, "durable"), result.median(row.key, "celery")
        dc, cc = result.median(row.key, "durable", "cpu"), result.median(row.key, "celery", "cpu")
        turns = result.turns.get(row.key)
        table.append([
            row.durable, row.celery, f"{dw:.3f}", f"{cw:.3f}", ratio(dw, cw),
            f"{dc:.2f}", f"{cc:.2f}", ratio(dc, cc),
            ms(dw / row.total_steps), ms(cw / row.total_steps),
            f"{statistics.median(turns):.0f}" if turns else "-",
        ])  # fmt: skip
    if table:
        print_table(
            ["durable", "celery", "durable s", "celery s", "ratio", "durable CPU", "celery CPU",
             "ratio", "durable/step", "celery/step", "turns"],
            table, align="ll",
        )  # fmt: skip
        print(
            f"(median of {args.repeat}; concurrent and scaling: of {args.heavy_repeat}; wall "
            "seconds, CPU seconds of workers, store, Redis and client; /step = wall / steps of "
            "all runs; turns = driver turns of one run)"
        )
    by_key = {row.key: row for row in rows}
    if "scaling-long" in by_key and "scaling-short" in by_key:
        long_row, short_row = by_key["scaling-long"], by_key["scaling-short"]
        print()
        for side in ("durable", "celery"):
            a, b = per_step_s(result, long_row, side), per_step_s(result, short_row, side)
            print(
                f"scaling, {side}: {args.scaling_runs} runs x {long_row.steps} steps "
                f"{ms(a)}/step vs x {short_row.steps} {ms(b)}/step = {ratio(a, b)}"
            )
    if result.long is not None:
        long = result.long
        print(
            f"\nlong: one run of {long['steps']} steps in {long['wall']:.1f} s; per step, "
            f"first {args.long_window}: {ms(long['first'])}, last {args.long_window}: "
            f"{ms(long['last'])} = {ratio(long['last'], long['first'])}"
        )
        print("  every window: " + " ".join(f"{w * 1000:.2f}" for w in long["windows"]) + " ms")


def print_cpu(result: PoolResult, rows: list[Row]) -> None:
    """Where the CPU time of each row went, per step: workers, PostgreSQL, Redis, client."""
    roles = ("workers", "postgres", "redis", "client")
    table = []
    for row in rows:
        for side in ("durable", "celery"):
            samples = result.samples.get(row.key, {}).get(side, [])
            if not samples:
                continue
            cells = [
                ms(
                    statistics.median(s.cpu_by_role.get(role, 0.0) for s in samples)
                    / row.total_steps
                )
                for role in roles
            ]
            table.append([row.durable if side == "durable" else row.celery, side, *cells])
    if table:
        print("\nCPU per step, by who spent it (median):\n")
        print_table(["workload", "side", *roles], table, align="ll")


def print_counts(result: PoolResult, rows: list[Row]) -> None:
    """SQL round trips and broker messages per step of each row and side."""
    table = []
    for row in rows:
        for side in ("durable", "celery"):
            workers, client = result.counts(row.key, side)
            n = sample_steps(result, row, side)
            if not n:
                continue
            w, c = per_step(workers, n), per_step(client, n)
            other = w.get("rollback", 0) + w.get("ping", 0) + w.get("prepare", 0)
            table.append([
                row.durable if side == "durable" else row.celery, side,
                f"{w['sql']:.2f}", f"{w.get('statements', 0):.2f}", f"{w.get('begin', 0):.2f}",
                f"{w.get('commit', 0):.2f}", f"{other:.2f}",
                f"{w['messages']:.2f}", f"{w.get('messages.step', 0):.2f}",
                f"{w.get('messages.wake', 0):.2f}", f"{w.get('messages.task', 0):.2f}",
                f"{c['sql']:.2f}", f"{c['messages']:.2f}",
            ])  # fmt: skip
    if not table:
        return
    print("\nper step, over the timed runs (workers; see round_trips.py for what counts):\n")
    print_table(
        ["workload", "side", "SQL/step", "statements", "BEGIN", "COMMIT", "other SQL",
         "msgs/step", "steps", "wakes", "tasks", "client SQL", "client msgs"],
        table, align="ll",
    )  # fmt: skip
    print(
        f"(SQL/step = statements + BEGIN + COMMIT + other (ROLLBACK, pings, prepares); "
        f"the sweeper thread's background work: {result.sweeper_sql:.1f} SQL round trips/s)"
    )
    for row in rows:
        if row.key == "sequential" and sample_steps(result, row, "durable"):
            n = sample_steps(result, row, "durable")
            workers, _ = result.counts(row.key, "durable")
            kinds = sorted(
                (
                    (k.split(":", 1)[1], v / n)
                    for k, v in workers.items()
                    if k.startswith("work.sql:")
                ),
                key=lambda kv: -kv[1],
            )
            print(
                "  statements of a sequential step: " + ", ".join(f"{v:.2f} {k}" for k, v in kinds)
            )


def print_floors(result: PoolResult, rows: list[Row]) -> None:
    """The floors, and a sequential step in units of each."""
    floors = floor_medians(result.floors)
    print("\nfloors, measured on the same workers before and after the rows (median):\n")
    print_table(["floor", "time"], [[FLOORS[k], ms(v)] for k, v in floors.items()])
    for row in rows:
        if row.key == "sequential" and sample_steps(result, row, "durable"):
            step = per_step_s(result, row, "durable")
            units = ", ".join(f"{step / v:.1f} x {k}" for k, v in floors.items() if v)
            print(f"  a durable sequential step ({ms(step)}) = {units}")


def print_summary(results: list[PoolResult], args: argparse.Namespace) -> None:
    """Each target of the issue beside what each pool measured."""
    rows = {row.key: row for row in rows_of(args)}
    lines: list[list[str]] = []

    def add(name: str, target: str, value: Callable[[PoolResult], str]) -> None:
        lines.append([name, target, *(value(r) for r in results)])

    def versus(key: str) -> Callable[[PoolResult], str]:
        def value(r: PoolResult) -> str:
            wall = ratio(r.median(key, "durable"), r.median(key, "celery"))
            cpu = ratio(r.median(key, "durable", "cpu"), r.median(key, "celery", "cpu"))
            return f"{wall} (CPU {cpu})"

        return value

    def scaling(side: str) -> Callable[[PoolResult], str]:
        long_row, short_row = rows["scaling-long"], rows["scaling-short"]

        def value(r: PoolResult) -> str:
            wall = ratio(per_step_s(r, long_row, side), per_step_s(r, short_row, side))
            cpu = ratio(per_step_s(r, long_row, side, "cpu"), per_step_s(r, short_row, side, "cpu"))
            return f"{wall} (CPU {cpu})"

        return value

    def counted(what: str) -> Callable[[PoolResult], str]:
        def value(r: PoolResult) -> str:
            n = sample_steps(r, rows["sequential"], "durable")
            return f"{per_step(r.counts('sequential', 'durable')[0], n)[what]:.2f}" if n else "-"

        return value

    for key, target in (
        ("sequential", "<= 1.3x"),
        ("gather", "<= 1.0x"),
        ("concurrent", "<= 1.5x"),
    ):
        if key in rows:
            add(f"{rows[key].durable} vs {rows[key].celery}", target, versus(key))
    if "scaling-long" in rows:
        long_steps, short_steps = rows["scaling-long"].steps, rows["scaling-short"].steps
        for side, target in (("durable", "<= 1.15x"), ("celery", "(reference)")):
            name = f"{side}: {args.scaling_runs} x {long_steps} vs x {short_steps}, per step"
            add(name, target, scaling(side))
    if "long" in args.rows:
        add(
            f"one run of {args.long_steps}: last {args.long_window} vs first, per step",
            "<= 1.15x",
            lambda r: ratio(r.long["last"], r.long["first"]) if r.long else "-",
        )
    if "sequential" in rows:
        add("SQL round trips per sequential step", "<= 4", counted("sql"))
        add("broker messages per sequential step", "<= 1", counted("messages"))
    print("\n== the issue's targets (ratios measured in this run: wall time, and CPU) ==\n")
    print_table(["workload", "target", *(f"-P {r.pool}" for r in results)], lines, align="ll")
    print(
        "(also: workflow.step per step in SQL commits: benchmarks/local_steps.py; worker "
        "memory with 10,000 runs waiting: benchmarks/waiting_runs.py)"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    worker_env(args)  # the client's BENCH_* before it imports the app
    ensure_database(args.store_url)

    import comparison_app as bench
    import round_trips

    from celery_durable._config import store_for

    round_trips.install()  # this client's own counts, in memory
    bench.app.set_current()
    store = store_for(bench.app)
    forget_benchmark_runs(store, bench.WORKFLOWS)
    bench.app.control.purge()

    results = []
    with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for pool in pools_of(args):
            results.append(measure_pool(with_pool(args, pool), bench, store, log_dir))
    rows = rows_of(args)
    for result in results:
        print(f"\n== -P {result.pool} -c {args.concurrency} ({args.workers} worker) ==\n")
        print_times(result, rows, args)
        print_cpu(result, rows)
        print_counts(result, rows)
        print_floors(result, rows)
    print_summary(results, args)
    print(f"\n(took {sum(r.seconds for r in results):.0f} s)")


if __name__ == "__main__":
    main()
