"""The same Celery canvases run by plain Celery and made durable, side by side.

    uv run python benchmarks/canvas_vs_celery.py [--repeat 3] [--pool prefork] [--concurrency 2]

Three shapes from Celery's chord issues, each run as ``canvas.apply_async().get()`` by
plain Celery (Redis broker, Redis result backend) and as
``durable(canvas).apply_async().get()`` (same broker, PostgreSQL store, no result
backend), on the same ``celery worker`` processes:

* a chord of ``--width`` (1000) tasks with a summing body;
* a chain of ``--chords`` (10) chords of ``--chord-width`` (100), each header task taking
  the previous chord's result;
* a 3-level nested chord: a chord of ``--fan`` (10) chords of 10 chords of 10 tasks.

Warm-up first, then ``--repeat`` timed runs of each, interleaved; the medians of wall
time and of CPU time (workers, store, Redis and client together, which a busy machine
disturbs less) and the ratios durable/celery are printed, then the floors measured on the
same workers (``harness.FLOORS``: one SQL commit, one broker round trip, one plain task).
The workers and the app are those of ``compare_celery.py`` (the helpers are
``harness.py``'s); the queue and the store are this script's own, so both can run at once.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (  # noqa: E402 - the sibling module, importable once on the path
    DEFAULT_STORE,
    FLOORS,
    CpuMeter,
    Workers,
    add_common_options,
    ensure_database,
    floor_medians,
    forget_benchmark_runs,
    measure_floors,
    ms,
    print_table,
    setup_line,
    timed,
    worker_env,
)

# A queue and a store of its own, so that it can run beside compare_celery.py: their workers
# would take each other's messages, and their sweepers each other's runs.
DEFAULT_QUEUE = "durable_canvas_bench"
DEFAULT_CANVAS_STORE = DEFAULT_STORE.rsplit("/", 1)[0] + "/durable_canvas_bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    add_common_options(parser, DEFAULT_CANVAS_STORE, DEFAULT_QUEUE, timeout=600.0)
    parser.add_argument("--width", type=int, default=1000, help="header size of the chord")
    parser.add_argument("--chords", type=int, default=10, help="chords in the chain")
    parser.add_argument("--chord-width", type=int, default=100, help="header size of each")
    parser.add_argument("--fan", type=int, default=10, help="fan-out at each nested level")
    return parser.parse_args(argv)


def shapes(bench: Any, args: argparse.Namespace) -> list[tuple[str, Callable[[], Any], Any]]:
    """``(name, make canvas, expected result)`` of each row."""
    from celery import chain, chord

    add_one, total = bench.add_one, bench.total

    def a_chord() -> Any:
        return chord([add_one.s(i) for i in range(args.width)], total.s())

    def chain_of_chords() -> Any:
        chords = [
            chord([add_one.s() for _ in range(args.chord_width)], total.s())
            for _ in range(args.chords)
        ]
        return chain(add_one.s(0), *chords)

    chained = 1
    for _ in range(args.chords):
        chained = args.chord_width * (chained + 1)

    def nested() -> Any:
        fan = args.fan

        def level(depth: int) -> Any:
            if depth == 0:
                return [add_one.s(i) for i in range(fan)]
            return [chord(level(depth - 1), total.s()) for _ in range(fan)]

        return chord(level(2), total.s())

    nested_total = args.fan**2 * sum(range(1, args.fan + 1))
    return [
        (f"chord of {args.width}", a_chord, sum(range(1, args.width + 1))),
        (f"chain of {args.chords} chords of {args.chord_width}", chain_of_chords, chained),
        (f"3-level nested chord ({args.fan}^3)", nested, nested_total),
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = worker_env(args)
    ensure_database(args.store_url)

    import comparison_app as bench

    from celery_durable._config import store_for
    from celery_durable.canvas import CANVAS_WORKFLOW, durable

    app = bench.app
    app.set_current()
    forget_benchmark_runs(store_for(app), [CANVAS_WORKFLOW])
    app.control.purge()
    timeout = args.timeout

    def run_celery(make: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: make().apply_async().get(timeout=timeout)

    def run_durable(make: Callable[[], Any]) -> Callable[[], Any]:
        return lambda: durable(make()).apply_async(app=app).get(timeout=timeout)

    rows = shapes(bench, args)
    with tempfile.TemporaryDirectory(prefix="durable-bench-") as tmp:
        log_dir = Path(args.log_dir or tmp)
        log_dir.mkdir(parents=True, exist_ok=True)
        with Workers(args, env, log_dir) as workers:
            workers.wait_ready(app)
            print(setup_line(args), flush=True)
            meter = CpuMeter(workers, args.store_url)
            for _, make, expected in rows:  # warm-up
                timed(run_durable(make), expected, meter)
                timed(run_celery(make), expected, meter)
            floors = measure_floors(store_for(app), args, bench.add_one, samples=50)
            Sample = tuple[float, float]  # wall seconds, CPU seconds
            samples: list[tuple[list[Sample], list[Sample]]] = [([], []) for _ in rows]
            for _ in range(args.repeat):
                # Interleaved, so that a slow spell of the machine hits both sides.
                for (name, make, expected), (d, c) in zip(rows, samples, strict=True):
                    d.append(timed(run_durable(make), expected, meter))
                    c.append(timed(run_celery(make), expected, meter))
                    print(
                        f"  {name}: durable {d[-1][0]:.3f} s ({d[-1][1]:.2f} s CPU), "
                        f"celery {c[-1][0]:.3f} s ({c[-1][1]:.2f} s CPU)",
                        flush=True,
                    )

    print()
    header = (
        f"{'canvas':<32} {'durable s':>9} {'celery s':>9} {'ratio':>6} | "
        f"{'durable CPU':>11} {'celery CPU':>10} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for (name, _, _), (d, c) in zip(rows, samples, strict=True):
        dw, cw = statistics.median(x[0] for x in d), statistics.median(x[0] for x in c)
        dc, cc = statistics.median(x[1] for x in d), statistics.median(x[1] for x in c)
        print(
            f"{name:<32} {dw:>9.3f} {cw:>9.3f} {dw / cw:>5.2f}x | "
            f"{dc:>11.2f} {cc:>10.2f} {dc / cc:>5.2f}x"
        )
    print(
        f"(median of {args.repeat}; ratio = durable / celery, below 1 when durable is faster; "
        "CPU = seconds of CPU all the processes involved spent, see harness.CpuMeter)"
    )
    print("\nfloors, measured on the same workers (median):\n")
    print_table(["floor", "time"], [[FLOORS[k], ms(v)] for k, v in floor_medians(floors).items()])


if __name__ == "__main__":
    main()
