"""``examples/durable_chord.py`` runs, and a second run gets the first run's result."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "durable_chord.py"


def run_example(cwd: Path) -> str:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done.stdout


def test_durable_chord_example_runs_and_a_second_run_reuses_the_result(tmp_path: Path) -> None:
    first = run_example(tmp_path)
    assert first.count("fetching") == 3
    assert "total: 66" in first
    assert "step 4: durable_chord.merge([21, 22, 23],) -> 66" in first
    second = run_example(tmp_path)
    assert "fetching" not in second  # the run with that id exists: nothing runs again
    assert "total: 66" in second
