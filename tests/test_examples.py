"""Every example runs, and the README's code blocks are the code that runs."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def _service(port: int, name: str) -> None:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        message = f"{name} is not reachable on 127.0.0.1:{port}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


def _run(args: list[str], cwd: Path, timeout: float = 120, **env: str) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_quickstart_runs_end_to_end_and_a_second_run_reuses_the_result(tmp_path: Path) -> None:
    script = str(ROOT / "examples" / "quickstart.py")
    env = {"QUICKSTART_STEP_SECONDS": "0.05"}
    first = _run([sys.executable, script], tmp_path, **env)
    assert "charging o-1" in first
    assert "result: {'receipt': 'receipt-o-1', 'held': [True, True, True]}" in first
    second = _run([sys.executable, script], tmp_path, **env)
    assert "workflow order-o-1: SUCCESS" in second
    assert "charging" not in second  # nothing ran again
    assert "result: {'receipt': 'receipt-o-1', 'held': [True, True, True]}" in second


def test_quickstart_interrupted_resumes_the_same_workflow(tmp_path: Path) -> None:
    script = str(ROOT / "examples" / "quickstart.py")
    env = _env(QUICKSTART_STEP_SECONDS="1")
    proc = subprocess.Popen(
        [sys.executable, script, "order-int"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "reserving" in line:  # the charge step finished and was recorded
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stdout.close()
    out = _run([sys.executable, script, "order-int"], tmp_path, QUICKSTART_STEP_SECONDS="0.05")
    assert "workflow order-int: RUNNING" in out
    assert "charging" not in out  # the recorded step is not run again
    assert "result: {'receipt': 'receipt-o-1', 'held': [True, True, True]}" in out


def _match(pattern: str, out: str) -> str:
    found = re.search(pattern, out, flags=re.M)
    assert found is not None, f"{pattern!r} not in:\n{out}"
    return found.group(1)


def test_order_saga_ships_compensates_a_failure_and_a_cancel(tmp_path: Path) -> None:
    out = _run([sys.executable, str(ROOT / "examples" / "order_saga.py")], tmp_path)
    shipped, failed, cancelled = re.findall(r"^(o-\w+): (.*)$", out, flags=re.M)
    assert shipped[1] == f"tracking-{shipped[0]}"
    assert failed[1] == f"FAILURE (ShippingError: {failed[0]} has no address)"
    assert cancelled[1].startswith("CANCELLED (WorkflowCancelledError: ")
    assert f"{shipped[0]}: shipped to 1 Main St" in out
    for order, sku in ((failed[0], "desk"), (cancelled[0], "sofa")):
        # Undone, latest first, and only what was done.
        undo = [f"hold-{sku}: released", f"payment-{order}: refunded"]
        lines = [line.strip() for line in out.splitlines()]
        assert [line for line in lines if line in undo] == undo
        assert f"{order}: shipped" not in out
    assert f"payment-{shipped[0]}: refunded" not in out  # the shipped order was not undone


def test_human_approval_approves_one_claim_and_escalates_the_other(tmp_path: Path) -> None:
    script = str(ROOT / "examples" / "human_approval.py")
    out = _run([sys.executable, script], tmp_path, HUMAN_APPROVAL_TIMEOUT="0.3")
    first = _match(r"^(claim-\w+): the manager approves$", out)
    second = _match(r"^(claim-\w+): nobody answers$", out)
    assert f"{first}: approved by manager" in out
    assert f"{second}: rejected: nobody answered within 0.3 s" in out
    assert f"to director: please approve {second} (4800 EUR)" in out
    assert f"to director: please approve {first}" not in out


def test_nightly_poller_continues_as_new_with_a_bounded_history(tmp_path: Path) -> None:
    script = str(ROOT / "examples" / "nightly_poller.py")
    out = _run([sys.executable, script], tmp_path, NIGHTLY_POLLER_INTERVAL="0.1")
    assert [line.strip() for line in out.splitlines() if "new items" in line] == [
        "night 1: 4 new items in news",
        "night 2: 7 new items in news",
        "night 3: 10 new items in news",
    ]
    assert re.search(r"^poller-\w+: news: 21 items in 3 nights$", out, re.M)
    assert re.search(
        r"history of the last night only: \['activity nightly_poller.poll_feed'\]", out
    )


@pytest.mark.integration
def test_shop_example_on_redis_and_postgresql(tmp_path: Path, postgres_url: str) -> None:
    _service(6379, "Redis")
    # A schema of its own, so that no other run's store (of another version) is in the way.
    env = {"SHOP_BROKER": "redis://127.0.0.1:6379/14", "SHOP_DB": postgres_url}
    command = [sys.executable, "-m", "celery", "-A", "examples.shop", "worker"]
    command += ["-P", "threads", "-c", "4", "-l", "WARNING", "-n", f"shop-{os.getpid()}@%h"]
    with (tmp_path / "worker.log").open("w") as log:
        worker = subprocess.Popen(
            command,
            cwd=ROOT,
            env=_env(**env),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            out = _run([sys.executable, "-m", "examples.shop"], ROOT, timeout=90, **env)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(timeout=60)
    assert "{'receipt': 'receipt-o-1-1999', 'held': [True, True]}" in out
    assert out.strip().endswith("SUCCESS")
    shown = _run(
        [sys.executable, "-m", "celery", "-A", "examples.shop", "durable", "show", "order-o-1"],
        ROOT,
        **env,
    )
    assert "status:   SUCCESS" in shown
    assert "examples.shop.charge" in shown
    # The README's "Operating it" commands, as written there.
    for line in _readme_cli_lines():
        done = subprocess.run(
            [sys.executable, "-m", *shlex.split(line)],
            cwd=ROOT,
            env=_env(**env),
            capture_output=True,
            text=True,
            timeout=60,
        )
        if " retry " in line:  # the example's run succeeded: nothing to retry, said clearly
            assert done.returncode == 1 and "only STUCK or FAILURE" in done.stdout + done.stderr
        else:
            assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"


def _readme_cli_lines() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    lines = [
        line.split("  #")[0].strip()
        for block in blocks
        for line in block.splitlines()
        if line.startswith("celery -A examples.shop durable")
    ]
    assert len(lines) >= 5
    return lines


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks() -> None:
    assert len(_python_blocks()) >= 4


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs(index: int, tmp_path: Path) -> None:
    block = _python_blocks()[index]
    first, _, rest = block.partition("\n")
    if re.fullmatch(r"# examples/\w+\.py", first.strip()):
        # The block is an example file, verbatim; the example's own test runs it.
        assert (ROOT / first.strip()[2:]).read_text() == rest
        return
    (tmp_path / "block.py").write_text(block)
    _run([sys.executable, "block.py"], tmp_path, timeout=60)


def test_readme_commands_are_the_ones_ci_runs() -> None:
    text = README.read_text()
    assert "uv run examples/quickstart.py" in text
    assert "uv run pytest" in text
    assert "uv run pytest" in (ROOT / ".ci" / "run").read_text()
