"""The benchmark scripts still run (tiny sizes): a table, and ratios, come out.

They are measured by hand, never asserted on; this only keeps them from rotting.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .services import require

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {
    "compare_celery.py": ["--repeat", "1", "--steps", "3", "--fanout", "5"],
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


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_benchmark_script_prints_its_table(script: str, tmp_path: Path) -> None:
    require("redis")
    require("postgres")
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *SCRIPTS[script]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "|" in done.stdout or "x" in done.stdout
