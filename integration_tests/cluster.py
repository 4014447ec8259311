"""One test's deployment: a broker queue, an empty store, worker processes and a client.

The four setups below are the matrix the tests run on: between them every pair of
choices (broker and store, broker and pool, store and pool) occurs once, so a fault that
needs two of them together is caught without running the full cross product.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from celery import Celery

from celery_durable import WorkflowHandle
from celery_durable._config import store_for
from celery_durable.store import Store

from . import wfapp
from .services import Broker, StoreDatabase, require
from .worker_process import WorkerProcess


@dataclass(frozen=True)
class Setup:
    """Which broker, store and worker pool a test runs on."""

    broker: str  # "redis" | "rabbitmq"
    store: str  # "sqlite" | "postgres"
    pool: str  # "prefork" | "threads"

    @property
    def id(self) -> str:
        return f"{self.broker}-{self.store}-{self.pool}"


SETUPS = {
    s.id: s
    for s in (
        Setup("redis", "sqlite", "prefork"),
        Setup("redis", "postgres", "threads"),
        Setup("rabbitmq", "postgres", "prefork"),
        Setup("rabbitmq", "sqlite", "threads"),
    )
}

#: Every setup (parametrize the ``cluster`` fixture with ``indirect=True``).
ALL = list(SETUPS)
#: The prefork setups: both brokers and both stores (and children to kill).
PREFORK = [name for name, s in SETUPS.items() if s.pool == "prefork"]
#: The thread-pool setups: both brokers and both stores.
THREADS = [name for name, s in SETUPS.items() if s.pool == "threads"]
#: One setup per broker, one per pool (for the broker-specific message-loss tests).
ONE_PER_BROKER = ["redis-postgres-threads", "rabbitmq-postgres-prefork"]


class Cluster:
    """Workers, a client app and the evidence (store, side-effect log) of one test."""

    def __init__(
        self,
        setup: Setup,
        tmp_path: Path,
        broker_url: str | None = None,
        store_url: str | None = None,
    ) -> None:
        """``broker_url`` and ``store_url``: a private server of the test's own (see
        ``own_services``) instead of the shared one of ``setup``'s kind."""
        if broker_url is None:
            require(setup.broker)
        if setup.store == "postgres" and store_url is None:
            require("postgres")
        self.setup = setup
        self.dir = tmp_path / "run"
        self.log_dir = tmp_path / "logs"
        self.dir.mkdir()
        self.log_dir.mkdir()
        self.broker = Broker(setup.broker, broker_url)
        self.queue = self.broker.new_queue()
        self.database = StoreDatabase(setup.store, str(tmp_path), store_url)
        self.env = {
            "DURABLE_IT_BROKER": self.broker.url,
            "DURABLE_IT_STORE": self.database.url,
            "DURABLE_IT_QUEUE": self.queue,
            "DURABLE_IT_DIR": str(self.dir),
        }
        self.client = wfapp.configure(
            Celery(f"client-{self.queue}", set_as_current=False), self.env
        )
        self.workers: list[WorkerProcess] = []
        #: SIGKILLs delivered so far: each may make one running activity run once more.
        self.kills = 0

    # -- workers ------------------------------------------------------------------------

    def worker(
        self,
        name: str = "w1",
        concurrency: int = 3,
        queues: list[str] | None = None,
        start: bool = True,
        env: dict[str, str] | None = None,
        pool: str | None = None,
        include: Sequence[str] = (),
        nodename: str | None = None,
        args: Sequence[str] = (),
    ) -> WorkerProcess:
        """A worker node on this test's queue (started unless ``start=False``); ``env``
        adds settings (see ``wfapp``) for this worker only. Its node name is built from
        ``name`` unless ``nodename`` gives it (replicas started with one ``-n``); ``args``
        are more ``celery worker`` options (``-E``)."""
        worker = WorkerProcess(
            nodename or f"{name}-{self.queue}@localhost",
            {**self.env, **(env or {})},
            self.log_dir,
            pool=pool or self.setup.pool,
            concurrency=concurrency,
            queues=queues or [self.queue],
            include=include,
            label=name,
            args=args,
        )
        self.workers.append(worker)
        return worker.start() if start else worker

    def kill(self, worker: WorkerProcess) -> None:
        """SIGKILL the worker's whole process group."""
        worker.kill()
        self.kills += 1

    def kill_pid(self, pid: int) -> None:
        """SIGKILL one process (a prefork child)."""
        os.kill(pid, signal.SIGKILL)
        self.kills += 1

    # -- what the workers do ------------------------------------------------------------

    def wait_for_pause(self, run_id: str, point: str, timeout: float = 90.0) -> int:
        """Wait until ``point`` of the run is paused (see ``wfapp.pause_once``); its pid."""
        marker = wfapp.marker_path(self.dir, run_id, point)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                text = marker.read_text()
            except FileNotFoundError:
                text = ""
            if text:
                return int(text)
            time.sleep(0.02)
        raise TimeoutError(f"run {run_id} did not reach the pause {point!r} in {timeout} s")

    def pause_publish_at(self, seq: int) -> None:
        """Make drivers pause before publishing step ``seq`` (after committing it)."""
        (self.dir / wfapp.PAUSE_PUBLISH_FILE).write_text(str(seq))

    def pause_after_cancelling(self, *run_ids: str) -> None:
        """Make the drivers of these runs pause right after a commit that cancelled
        child steps, before anything that follows it in memory."""
        (self.dir / wfapp.PAUSE_AFTER_CANCEL_FILE).write_text("\n".join(run_ids))

    def effects(self) -> Counter[tuple[str, int]]:
        """How many times each ``(run_id, index)`` activity executed."""
        return Counter({key: len(times) for key, times in self.effect_times().items()})

    def effect_times(self) -> dict[tuple[str, int], list[float]]:
        """When each ``(run_id, index)`` activity executed (UNIX seconds), in order."""
        times: dict[tuple[str, int], list[float]] = {}
        path = self.dir / wfapp.EFFECTS_FILE
        if path.exists():
            for line in path.read_text().splitlines():
                run_id, index, _pid, at = line.split("\t")
                times.setdefault((run_id, int(index)), []).append(float(at))
        return times

    @property
    def store(self) -> Store:
        """The workflow store, as the test process sees it."""
        return store_for(self.client)

    def handle(self, run_id: str) -> WorkflowHandle[object]:
        return WorkflowHandle(run_id, app=self.client)

    def log_tails(self) -> list[tuple[str, str]]:
        """``(node name, log tail)`` of every worker, for failure reports."""
        return [(w.nodename, w.log_tail()) for w in self.workers]

    # -- teardown -----------------------------------------------------------------------

    def close(self) -> None:
        """Kill the workers and delete the queues and the store."""
        errors: list[BaseException] = []
        for worker in self.workers:
            try:
                worker.kill()
            except Exception as exc:
                errors.append(exc)
        self.client.close()
        self.store.dispose()
        for cleanup in (self.broker.cleanup, self.database.cleanup):
            try:
                cleanup()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
