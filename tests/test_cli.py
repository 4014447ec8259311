"""``celery -A app durable ...``: the sub-command, through Celery's own CLI."""

from __future__ import annotations

import importlib
import pickle
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

APP_MODULE = """
from celery import Celery, shared_task

from celery_durable import durable_workflow, workflow

app = Celery("{module}", broker="memory://", set_as_current=False)
app.conf.durable_database_url = "sqlite:///{db}"


@shared_task
def noop() -> None: ...


@durable_workflow(name="{module}.waiter")
async def waiter(order_id: str) -> str:
    return await workflow.wait_for_signal("go")
"""


MODULE = {"name": "cliapp"}


def _celery(*args: str) -> tuple[int, str]:
    from celery.bin.celery import celery

    result = CliRunner().invoke(celery, ["-A", MODULE["name"], *args], catch_exceptions=False)
    return result.exit_code, result.output.replace(MODULE["name"], "cliapp")


@pytest.fixture
def cli_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # A module name per test: apps of earlier tests are still alive, and Celery warns
    # when a second function registers under a task name they already have.
    name = f"cliapp_{tmp_path.name.replace('-', '_')}"
    MODULE["name"] = name
    (tmp_path / f"{name}.py").write_text(
        APP_MODULE.format(db=tmp_path / "cli.sqlite3", module=name)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield
    sys.modules.pop(name, None)


@pytest.mark.usefixtures("cli_app")
def test_start_list_show_signal_cancel_terminate() -> None:
    assert _celery("durable", "list") == (0, "no runs\n")

    code, out = _celery("durable", "start", f"{MODULE['name']}.waiter", '["o-1"]', "--id", "cli-1")
    assert (code, out) == (0, "cli-1\n")
    code, out = _celery("durable", "list", "--status", "PENDING")
    assert code == 0 and "cli-1" in out and "cliapp.waiter" in out

    code, out = _celery("durable", "show", "cli-1")
    assert code == 0
    assert "workflow: cliapp.waiter" in out and 'args=["o-1"]' in out

    assert _celery("durable", "signal", "cli-1", "go", '{"ok": true}')[0] == 0
    assert _celery("durable", "cancel", "cli-1")[0] == 0
    code, out = _celery("durable", "terminate", "cli-1", "--reason", "test")
    assert (code, out) == (0, "cli-1: terminated\n")
    code, out = _celery("durable", "show", "cli-1")
    assert "status:   TERMINATED" in out and "terminated: test" in out


@pytest.mark.usefixtures("cli_app")
def test_errors_are_clear_and_exit_non_zero() -> None:
    code, out = _celery("durable", "show", "nope")
    assert code == 1, out
    assert "no workflow run with id 'nope'" in out
    code, out = _celery("durable", "start", f"{MODULE['name']}.nothing")
    assert code == 1 and "no workflow named 'cliapp.nothing'" in out and "cliapp.waiter" in out
    code, out = _celery("durable", "start", f"{MODULE['name']}.waiter", "not json")
    assert code == 2 and "JSON" in out
    code, out = _celery("durable", "start", f"{MODULE['name']}.waiter", '["a", "b"]')
    assert code == 1 and "do not match" in out
    code, out = _celery("durable", "retry", "nope")
    assert code == 1 and "nope" in out
    code, out = _celery("durable", "signal", "nope", "go")
    assert code == 1 and "no such run" in out


@pytest.mark.usefixtures("cli_app")
def test_purge_counts_on_a_dry_run_and_deletes_finished_runs() -> None:
    assert _celery("durable", "start", f"{MODULE['name']}.waiter", '["o"]', "--id", "done")[0] == 0
    assert _celery("durable", "start", f"{MODULE['name']}.waiter", '["o"]', "--id", "open")[0] == 0
    assert _celery("durable", "terminate", "done")[0] == 0

    code, out = _celery("durable", "purge", "--older-than", "7d", "--dry-run")
    assert (code, out) == (
        0,
        "would delete 0 runs (0 steps, 0 signals) finished more than 7d ago\n",
    )
    code, out = _celery("durable", "purge", "--older-than", "0", "--dry-run")
    assert (code, out) == (0, "would delete 1 runs (0 steps, 0 signals) finished more than 0 ago\n")
    assert _celery("durable", "show", "done")[0] == 0  # a dry run deletes nothing

    code, out = _celery("durable", "purge", "--older-than", "0")
    assert code == 0 and out.startswith("deleted 1 runs (0 steps, 0 signals)"), out
    code, out = _celery("durable", "show", "done")
    assert code == 1 and "no workflow run with id 'done'" in out
    assert _celery("durable", "show", "open")[0] == 0  # not finished: kept

    code, out = _celery("durable", "purge", "--older-than", "a week")
    assert code == 2 and "is not a duration" in out


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("3600", 3600), ("12h", 43200), ("7d", 604800), ("30m", 1800), ("2w", 1209600), ("1.5s", 1.5)],
)
def test_durations_of_the_purge_command(text: str, seconds: float) -> None:
    from celery_durable.cli import parse_duration

    assert parse_duration(text) == seconds


class _Plant:
    """Unpickling this creates the file at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (self.path, "w"))


@pytest.mark.usefixtures("cli_app")
def test_show_refuses_a_stored_pickle_and_never_unpickles_it(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, update

    from celery_durable.store import _schema

    marker = tmp_path / "code-ran"
    code, out = _celery(
        "durable", "start", f"{MODULE['name']}.waiter", '["o-1"]', "--id", "planted"
    )
    assert code == 0, out
    engine = create_engine(f"sqlite:///{tmp_path / 'cli.sqlite3'}")
    runs = _schema.runs
    pickled = pickle.dumps(_Plant(marker))
    try:
        for values in (
            {"content_type": "application/x-python-serialize", "input": pickled},
            {
                "content_type": "application/x-python-serialize",
                "input": b"\x80\x04]\x94(]\x94}\x94e.",  # [[], {}] as a pickle
                "status": "SUCCESS",
                "result": pickled,
            },
        ):
            with engine.begin() as conn:
                conn.execute(update(runs).where(runs.c.id == "planted").values(**values))
            code, out = _celery("durable", "show", "planted")
            assert code != 0
            assert "planted" in out and "app.conf.accept_content" in out, out
            assert not marker.exists()
    finally:
        engine.dispose()
