"""The sweeper's choices when apps with different workflows share one store."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from dbclock import DbClock
from sqlalchemy import select

from celery_durable import durable_workflow
from celery_durable._config import store_for
from celery_durable.store import PENDING, STUCK, SUCCESS, NewRun, TurnWrite, WorkerInfo, _schema
from celery_durable.worker import Sweeper
from celery_durable.worker._sweeper import RETENTION_EVERY

_names = itertools.count()


@durable_workflow(name="sweeper_tests.known")
async def known() -> None: ...


def test_a_run_no_worker_knows_is_parked_then_taken_back_by_one_that_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = Celery(f"sweeper-{next(_names)}", broker="memory://", set_as_current=False)
    app.conf.durable_database_url = f"sqlite:///{tmp_path}/sweep.sqlite3"
    clock = DbClock(app.conf.durable_database_url, monkeypatch, 1_000_000.0)
    app.conf.durable_stall_timeout = 10
    store = store_for(app)
    name = f"sweeper_tests.elsewhere{next(_names)}"  # a workflow no app here defines
    for run_id, workflow in (("orphan", name), ("mine", "sweeper_tests.known")):
        assert store.create_run(NewRun(run_id, workflow, "application/json", b"[[], {}]"))
    sweeper = Sweeper(app, "sweeper-test", "sweeper@test")

    clock.advance(11)  # one stall period: this app re-wakes only the run it can route
    assert sweeper.sweep()["woken"] == 1
    assert store.get_status("orphan") == PENDING

    clock.advance(31)  # three periods and no sweeper woke it: no live worker knows it
    sweeper.sweep()
    orphan = store.require_run("orphan")
    assert orphan.status == STUCK
    assert orphan.error is not None and orphan.error["type"] == "UnknownWorkflowError"
    assert name in orphan.error["message"]
    assert store.get_status("mine") == PENDING

    @durable_workflow(name=name)  # fixed code is deployed: the workflow exists again
    async def elsewhere() -> None: ...

    sweeper.sweep()
    assert store.get_status("orphan") == PENDING
    store.dispose()
    clock.close()


@pytest.mark.parametrize("expires", [3600, None], ids=["an hour", "never"])
def test_every_sixth_pass_deletes_a_batch_of_expired_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, expires: int | None
) -> None:
    app = Celery(f"sweeper-{next(_names)}", broker="memory://", set_as_current=False)
    app.conf.durable_database_url = f"sqlite:///{tmp_path}/retention.sqlite3"
    app.conf.durable_result_expires = expires
    clock = DbClock(app.conf.durable_database_url, monkeypatch, 1_000_000.0)
    store = store_for(app)
    assert store.create_run(NewRun("done", "sweeper_tests.known", "application/json", b"[]"))
    assert store.begin_turn("done") is not None
    write = TurnWrite(turn=0, at=clock.now, status=SUCCESS, result=("application/json", b"1"))
    assert store.commit_turn("done", write) is not None
    store.heartbeat(WorkerInfo("gone", "gone@host", 1))
    clock.advance(2 * 86400)  # the run is two days old, the worker was last seen then
    sweeper = Sweeper(app, "sweeper-test", "sweeper@test")

    for _ in range(RETENTION_EVERY - 1):
        assert "purged" not in sweeper.sweep()  # recovery passes only
    assert store.get_run("done") is not None
    assert sweeper.sweep()["purged"] == (1 if expires else 0)
    assert (store.get_run("done") is None) == bool(expires)
    assert [w for w in _worker_ids(store) if w != "sweeper-test"] == []  # forgotten anyway
    store.dispose()
    clock.close()


def _worker_ids(store: Any) -> list[str]:
    with store.engine.connect() as conn:
        return list(conn.execute(select(_schema.workers.c.id)).scalars())
