"""What a ``workflow.step`` (a local step, run inside the driver) costs, in SQL commits.

    uv run python benchmarks/local_steps.py [--stores sqlite,postgresql]
        [--pools prefork,threads] [--steps 1000] [--repeat 3] [--quick]

For each store (a SQLite file of its own in a temporary directory, and the PostgreSQL
database ``--store-url``) and each pool, starts ``celery worker`` processes of
``comparison_app`` on that store (Redis broker) and times ``--repeat`` runs of
``bench.local_steps``: a workflow of ``--steps`` ``workflow.step`` calls of a function
that adds one, with no task at all. A local step is a driver turn of its own (run the
function, commit its result, go on), with up to ``MAX_TURNS_IN_ONE_TASK`` turns in one
driver task and a wake message between two tasks, so what is measured is the engine's
own cost per step. Per step, two ways:

* ``per step``: from the store, the time between the first and the last local step's
  ``completed_at`` (the database's clock at each commit) divided by the steps between:
  the steady state, without the start of the run or the client's wait;
* ``wall/step``: the client's time from ``.delay()`` to the result, divided by the steps.

Beside them, the floor measured on the same database in the same run (before, between
and after the runs, on the same workers): one SQL commit (``BEGIN``; ``UPDATE`` of one row;
``COMMIT``; on SQLite ``BEGIN IMMEDIATE``, WAL, ``synchronous=NORMAL`` as the store sets
it), and the table prints ``per step = X commits`` next to the issue's targets (SQLite 8,
PostgreSQL 3). The other floors (one SQL round trip, one broker round trip, one plain
Celery task) and the SQL round trips and broker messages counted per step
(``round_trips.py``) are printed too. Nothing is asserted.

``--quick`` runs tiny sizes (the smoke test's mode). The queue and the PostgreSQL
database are this script's own, so it can run beside the other benchmarks; its runs'
rows are deleted at start.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402 - the sibling modules, importable once on the path
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
    setup_line,
    timed,
    with_pool,
    worker_env,
)
from round_trips import Tally, per_step  # noqa: E402

DEFAULT_QUEUE = "durable_local_bench"
DEFAULT_LOCAL_STORE = DEFAULT_STORE.rsplit("/", 1)[0] + "/durable_local_bench"
#: The issue's targets: a local step costs at most this many SQL commits.
TARGETS = {"sqlite": 8.0, "postgresql": 3.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_common_options(parser, DEFAULT_LOCAL_STORE, DEFAULT_QUEUE, timeout=300.0)
    add_pools_option(parser)
    parser.set_defaults(repeat=None, pools="prefork,threads")
    parser.add_argument("--stores", default="sqlite,postgresql", help="which stores to time")
    parser.add_argument("--steps", type=int, help="local steps per run (1000)")
    parser.add_argument("--floor-samples", type=int, help="timings of each floor (100)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one pool")
    args = parser.parse_args(argv)
    quick = {"repeat": 1, "steps": 30, "floor_samples": 10}
    full = {"repeat": 3, "steps": 1000, "floor_samples": 100}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick and "--pools" not in (argv if argv is not None else sys.argv):
        args.pools = args.pool
    return args


def measure(
    args: argparse.Namespace, bench: Any, store: Any, log_dir: Path
) -> tuple[list[Sample], list[float], dict[str, list[float]]]:
    """``(samples, seconds per step from the store, floors)`` on workers of ``args``."""
    from celery_durable import WorkflowHandle

    count_dir = Path(tempfile.mkdtemp(prefix=f"counts-{args.pool}-", dir=log_dir))
    env = worker_env(args, BENCH_COUNT_DIR=str(count_dir))
    samples: list[Sample] = []
    per_step_s: list[float] = []
    floors: dict[str, list[float]] = {}
    n = args.steps
    handles: list[Any] = []

    def run() -> int:
        handles[:] = [bench.local_steps.delay(n)]
        return int(handles[0].get(timeout=args.timeout))

    with Workers(args, env, log_dir) as workers:
        workers.wait_ready(bench.app)
        print(setup_line(args), flush=True)
        meter = CpuMeter(workers, args.store_url)
        tally = Tally(count_dir)
        timed(lambda: bench.local_steps.delay(10).get(timeout=args.timeout), 10, meter)
        for _ in range(args.repeat):
            # Floors between the runs too: a commit's time moves with the disk's mood.
            merge_floors(floors, measure_floors(store, args, bench.add_one, args.floor_samples))
            sample = counted(run, n, meter, tally)
            samples.append(sample)
            done = completion_times(store, handles[0].id, "local")
            per_step_s.append((done[-1] - done[0]) / (len(done) - 1))
            turns = WorkflowHandle(handles[0].id, app=bench.app).describe()["turns"]
            print(
                f"  {store.dialect} {args.pool}: {sample.wall:.3f} s, {ms(per_step_s[-1])}"
                f"/step by the store's clock, {turns} turns",
                flush=True,
            )
        merge_floors(floors, measure_floors(store, args, bench.add_one, args.floor_samples))
    return samples, per_step_s, floors


def report_rows(
    dialect: str,
    pool: str,
    samples: list[Sample],
    by_store: list[float],
    floor_samples: dict[str, list[float]],
    steps: int,
) -> tuple[list[str], list[str], list[str]]:
    """The cells of one store and pool in each of the three tables."""
    floors = floor_medians(floor_samples)
    commit = floors["commit"]
    step = statistics.median(by_store)
    wall = statistics.median(s.wall for s in samples) / steps
    result = [
        dialect, pool, ms(step), ms(wall), ms(commit), f"{step / commit:.1f} commits",
        f"<= {TARGETS.get(dialect, 0):g}", f"{wall / commit:.1f} commits",
    ]  # fmt: skip
    workers: Counter[str] = Counter()
    for sample in samples:
        workers.update(sample.workers)
    n = steps * len(samples)
    w = per_step(workers, n)
    kinds = sorted(
        (k.split(":", 1)[1], v / n) for k, v in workers.items() if k.startswith("work.sql:")
    )
    count = [
        dialect, pool, f"{w['sql']:.2f}", f"{w.get('statements', 0):.2f}",
        f"{w.get('begin', 0):.2f}", f"{w.get('commit', 0):.2f}", f"{w['messages']:.3f}",
        ", ".join(f"{v:.2f} {k}" for k, v in kinds if v >= 0.005),
    ]  # fmt: skip
    return result, [dialect, pool, *(ms(floors[k]) for k in FLOORS)], count


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    worker_env(args)  # the client's BENCH_* before it imports the app
    import comparison_app as bench
    import round_trips

    from celery_durable._config import store_for

    round_trips.install()
    bench.app.set_current()
    results: list[list[str]] = []
    floor_rows: list[list[str]] = []
    counts: list[list[str]] = []
    with tempfile.TemporaryDirectory(prefix="durable-local-bench-") as tmp:
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        for kind in [k.strip() for k in args.stores.split(",") if k.strip()]:
            url = f"sqlite:///{tmp}/durable.sqlite3" if kind == "sqlite" else args.store_url
            ensure_database(url)
            bench.app.conf.durable_database_url = url
            store = store_for(bench.app)
            forget_benchmark_runs(store, bench.WORKFLOWS)
            bench.app.control.purge()
            for pool in pools_of(args):
                pool_args = with_pool(argparse.Namespace(**{**vars(args), "store_url": url}), pool)
                samples, by_store, floor_samples = measure(pool_args, bench, store, log_dir)
                result, floors, count = report_rows(
                    store.dialect, pool, samples, by_store, floor_samples, args.steps
                )
                results.append(result)
                floor_rows.append(floors)
                counts.append(count)
            store.dispose()

    print(f"\n== workflow.step: {args.steps} local steps per run, median of {args.repeat} ==\n")
    print_table(
        ["store", "pool", "per step", "wall/step", "one commit", "per step =", "target",
         "wall/step ="],
        results, align="ll",
    )  # fmt: skip
    print(
        "(per step: by the store's clock, first to last local step; wall/step: .delay() to "
        "the result; one commit: BEGIN, UPDATE of one row, COMMIT on the same database)"
    )
    print("\nSQL round trips and broker messages per local step (workers, round_trips.py):\n")
    print_table(
        ["store", "pool", "SQL/step", "statements", "BEGIN", "COMMIT", "msgs/step",
         "statements of a step"],
        counts, align="llrrrrrl",
    )  # fmt: skip
    print("\nfloors, on the same workers and database, around each run (median):\n")
    print_table(["store", "pool", *FLOORS], floor_rows, align="ll")
    print("(" + "; ".join(f"{k}: {v}" for k, v in FLOORS.items()) + ")")


if __name__ == "__main__":
    main()
