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
import math
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402 - the sibling module, importable once on the path
    DEFAULT_QUEUE,
    DEFAULT_STORE,
    CpuMeter,
    Workers,
    add_common_options,
    ensure_database,
    forget_benchmark_runs,
    setup_line,
    timed,
    worker_env,
)


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


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = worker_env(
        args,
        BENCH_PROFILE_DIR=os.path.abspath(args.profile_dir) if args.profile_dir else "",
    )
    ensure_database(args.store_url)

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
            print(setup_line(args), flush=True)
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
