"""The worker bootstep: registers the worker in the store and runs its sweeper."""

from __future__ import annotations

import logging
from typing import Any

from celery import bootsteps
from celery.concurrency.prefork import TaskPool as PreforkPool

from .._config import settings_for, store_for
from . import _identity
from ._sweeper import Sweeper
from ._wakes import drain_local_driver, set_runs_tasks

__all__ = [
    "DurableWorkerStep",
    "on_process_init",
    "on_process_shutdown",
    "on_worker_init",
    "on_worker_shutdown",
]

logger = logging.getLogger(__name__)


class DurableWorkerStep(bootsteps.StartStopStep):
    """Starts this worker's sweeper and registers the worker in the store."""

    label = "celery_durable"
    # The sweeper thread must not run while the prefork pool forks its children: a child
    # forked while that thread holds a lock (an import, the store's, SQLite's) inherits it
    # held forever. Started after the pool, later forks (replacing a dead child) find the
    # store already built and the thread mostly idle.
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        self.sweeper: Sweeper | None = None

    def start(self, worker: Any) -> None:
        global _sweeper
        identity = _identity.adopt(worker.hostname)
        # A prefork worker's main process runs the consumer, not tasks: turns are driven
        # in its children (which say so in on_process_init), never here.
        set_runs_tasks(not isinstance(worker.pool, PreforkPool))
        settings_for(worker.app)  # fail at start, with the fix, on a bad setting
        try:
            store_for(worker.app).ensure_schema()  # here, not first in the sweeper thread
        except Exception:
            logger.exception("celery_durable: the store is not reachable yet; will retry")
        self.sweeper = _sweeper = Sweeper(worker.app, identity, worker.hostname)
        self.sweeper.start()

    def stop(self, worker: Any) -> None:
        # Bootsteps stop in reverse order, so this runs before the pool drains: keep the
        # heartbeats (and the leases of the running steps) going until on_worker_shutdown,
        # or other workers would take this one for dead and run its steps again.
        if self.sweeper is not None:
            self.sweeper.drain()

    def shutdown(self, worker: Any) -> None:
        self.stop(worker)


#: The sweeper of this worker, stopped by :func:`on_worker_shutdown`.
_sweeper: Sweeper | None = None


def on_worker_shutdown(sender: Any = None, **_: Any) -> None:
    """Stop the sweeper and record a clean shutdown of this worker in the store.

    ``worker_shutdown`` comes after the pool has drained: every step this worker ran has
    finished and its outcome is recorded, so what it still claims it never started.
    """
    # Turns this process took for local driving (threads and solo pools) end first:
    # they may publish steps, and the sweeper's stop records a clean shutdown.
    drain_local_driver(LOCAL_TURNS_PATIENCE)
    if _sweeper is not None:
        _sweeper.stop()
    if not _identity.registered() or sender is None:
        return
    try:
        store_for(sender.app).worker_stopped(_identity.worker_id())
    except Exception:
        logger.exception("could not record this worker's shutdown")


#: Seconds a stopping process waits for the turns it is driving locally; one still going
#: then is cut off, and its run is woken again by a sweeper (``durable_stall_timeout``).
LOCAL_TURNS_PATIENCE = 10.0


def on_process_init(**_: Any) -> None:
    """A prefork child: it runs tasks, so it drives turns of the outcomes it records."""
    set_runs_tasks(True)


def on_process_shutdown(**_: Any) -> None:
    """A prefork child exiting (a warm shutdown, ``max_tasks_per_child``): finish the
    turns it is driving rather than leave their runs to the sweeper."""
    drain_local_driver(LOCAL_TURNS_PATIENCE)


def on_worker_init(sender: Any = None, **_: Any) -> None:
    """Add the bootstep (``worker_init`` comes before the worker builds its blueprint)."""
    if sender is not None:
        sender.app.steps["worker"].add(DurableWorkerStep)
