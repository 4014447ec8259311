"""``mypy --strict`` on user code: the decorator's types reach ``delay`` and ``get``."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_CODE = Path(__file__).parent / "typing" / "user_code.py"

#: Each line is a mistake mypy must report, with the error code it must report it under.
WRONG_CALLS = """
from celery_durable import durable_workflow


@durable_workflow
async def checkout(order_id: str, skus: list[str], *, express: bool = False) -> dict[str, bool]:
    return {}


checkout.delay(1, ["a"])  # expect: arg-type
checkout.delay("o-1")  # expect: call-arg
checkout.delay("o-1", ["a"], fast=True)  # expect: call-arg
wrong: str = checkout.delay("o-1", []).get()  # expect: assignment
checkout.apply_async(("o-1", []), workflow_id=7)  # expect: arg-type
"""

AWAITS_SIGNATURE = """
from celery import shared_task

from celery_durable import durable_workflow


@shared_task
def charge(order_id: str, cents: int) -> str:
    return f"receipt-{order_id}-{cents}"


@durable_workflow
async def checkout(order_id: str) -> str:
    receipt: str = await charge.s(order_id, 1999)
    return receipt


@durable_workflow
async def mistyped(order_id: str) -> int:
    count: int = await charge.s(order_id, 1999)  # expect: assignment
    return count
"""


@pytest.fixture(scope="module")
def mypy_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[int, str]]]:
    """Run mypy once over every file of this module: ``{file name: [(line, code)]}``."""
    directory = tmp_path_factory.mktemp("typing")
    # What the README tells users to write: the plugin that makes `await task.s()` typed.
    config = directory / "mypy.ini"
    config.write_text("[mypy]\nplugins = celery_durable.mypy\n")
    (directory / "wrong_calls.py").write_text(textwrap.dedent(WRONG_CALLS))
    (directory / "awaits_signature.py").write_text(textwrap.dedent(AWAITS_SIGNATURE))
    files = [
        str(USER_CODE),
        str(directory / "wrong_calls.py"),
        str(directory / "awaits_signature.py"),
    ]
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--no-error-summary",
            "--no-incremental",
            "--config-file",
            str(config),
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    errors: dict[str, list[tuple[int, str]]] = {}
    for line in done.stdout.splitlines():
        found = re.match(r"(?P<path>.+?):(?P<line>\d+): error: .*\[(?P<code>[a-z-]+)\]$", line)
        if found:
            name = Path(found["path"]).name
            errors.setdefault(name, []).append((int(found["line"]), found["code"]))
        elif ": error:" in line or ": note:" not in line:
            errors.setdefault("<other>", []).append((0, line))
    assert done.returncode in (0, 1), done.stdout + done.stderr
    return errors


def test_typed_user_code_passes_strict_mypy(mypy_errors: dict[str, list[tuple[int, str]]]) -> None:
    assert "# type: ignore" not in USER_CODE.read_text()
    assert mypy_errors.get("user_code.py", []) == []
    assert mypy_errors.get("<other>", []) == []


def test_wrong_calls_are_reported(mypy_errors: dict[str, list[tuple[int, str]]]) -> None:
    expected = [
        (number, line.split("# expect: ")[1])
        for number, line in enumerate(textwrap.dedent(WRONG_CALLS).splitlines(), start=1)
        if "# expect: " in line
    ]
    assert len(expected) == 5
    assert mypy_errors.get("wrong_calls.py", []) == expected


def test_awaiting_a_signature_is_typed_by_the_plugin(
    mypy_errors: dict[str, list[tuple[int, str]]],
) -> None:
    # The await has the task's return type: a wrong annotation is caught, a right one passes.
    lines = textwrap.dedent(AWAITS_SIGNATURE).splitlines()
    expected = [n for n, line in enumerate(lines, start=1) if "# expect: assignment" in line]
    assert mypy_errors.get("awaits_signature.py", []) == [(expected[0], "assignment")]
