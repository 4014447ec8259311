"""Recovering what the broker lost, from SQL.

Every worker runs a :class:`Sweeper` (started by the worker bootstep). Each pass it:

1. records a heartbeat for this worker;
2. gives new dispatches to steps claimed by workers that stopped or went silent, and
   re-sends them (a worker killed mid-step, or holding prefetched or ETA messages);
3. re-sends steps published but never claimed for ``durable_stall_timeout`` (a broker
   restart, a crash between commit and publish); copies share the dispatch id, so
   whichever arrives first runs and the others are dropped;
4. wakes active runs that have outcomes nobody delivered, or were never driven.

Between passes it fires durable timers that are due, every ``durable_timer_interval``.

Many workers may sweep at once: each item is taken by one of them in a fenced update.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Collection

from celery import Celery

from .._codec import encode_error
from .._config import settings_for, store_for
from ..errors import DurableError, UnknownWorkflowError
from ..store import STUCK, RunRecord
from ._messages import publish_wake
from ._republish import resend, retry_run

__all__ = ["Sweeper"]

logger = logging.getLogger(__name__)


class Sweeper:
    """Periodic recovery for one worker process; :meth:`sweep` is one pass."""

    def __init__(self, app: Celery, worker_id: str, hostname: str) -> None:
        self.app = app
        self.worker_id = worker_id
        self.hostname = hostname
        self.settings = settings_for(app)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sweep(self) -> dict[str, int]:
        """One recovery pass; returns counts of what it re-sent."""
        store = store_for(self.app)
        store.heartbeat(self.worker_id, self.hostname, os.getpid())
        released = resend(self.app, store.release_dead_claims(self.settings.worker_timeout))
        stale = resend(self.app, store.stale_dispatches(self.settings.stall_timeout), copies=True)
        woken = 0
        known = self._known_workflows()
        # Only runs whose wake this app can route: another app sharing the store has
        # its own workers, queues and maybe broker.
        runs = store.runs_to_wake(self.settings.stall_timeout, workflows=known)
        if runs:
            with self.app.producer_or_acquire() as producer:
                for run in runs:
                    publish_wake(self.app, run.workflow, run.id, run.options, producer=producer)
                    woken += 1
        # A run with work to do that no sweeper has woken for three stall periods has no
        # live worker that knows its workflow (it fails to import?): park it, with why.
        for run in store.runs_to_wake(3 * self.settings.stall_timeout, exclude=known):
            self._park_unknown(run)
        # ...and a worker that knows it again (fixed code deployed) takes it back.
        self.retry_stuck(only_unknown_to=known)
        if released or stale or woken:
            logger.warning(
                "celery_durable sweeper: re-sent %d steps of dead workers, %d unclaimed "
                "steps, and woke %d runs",
                released,
                stale,
                woken,
            )
        return {"released": released, "stale": stale, "woken": woken}

    def _known_workflows(self) -> list[str]:
        return [name for name, task in self.app.tasks.items() if hasattr(task, "durable")]

    def _park_unknown(self, run: RunRecord) -> bool:
        """Park a run that no live worker can drive, as STUCK with the reason.

        Workers that know the workflow retry such runs when they start and on every
        sweep, so it resumes once fixed code is deployed.
        """
        message = (
            f"workflow {run.workflow}[{run.id}] is not making progress and no running "
            f"worker knows the workflow {run.workflow!r}: make sure the workers import "
            "the module that defines it (Celery's `imports`/`include`, or autodiscovery) "
            "and that the module imports without errors"
        )
        error = encode_error(UnknownWorkflowError(message))
        if store_for(self.app).park(run.id, run.turn, STUCK, error):
            logger.error("%s; parked as STUCK", message)
            return True
        return False

    def retry_stuck(self, only_unknown_to: Collection[str] | None = None) -> int:
        """Wake STUCK runs (new code may have fixed them); returns how many.

        ``only_unknown_to``: just the runs parked because no worker knew their workflow,
        of the workflows named (the ones this worker knows).
        """
        count = 0
        for run in store_for(self.app).stuck_runs():
            if only_unknown_to is not None:
                unknown = (run.error or {}).get("type") == UnknownWorkflowError.__name__
                if not (unknown and run.workflow in only_unknown_to):
                    continue
            try:
                retry_run(self.app, run.id)
                count += 1
            except DurableError:
                pass  # another worker starting at the same time took it first
            except Exception:
                logger.exception("could not retry stuck run %s", run.id)
        return count

    def start(self) -> None:
        """Sweep in a daemon thread until :meth:`stop`."""
        self._thread = threading.Thread(
            target=self._loop, name="celery-durable-sweeper", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop sweeping (waits for a pass in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def fire_timers(self) -> int:
        """Fire the durable timers that are due and wake their runs; returns how many.

        Only timers of workflows this worker's app knows: another app sharing the store
        would send their wakes to its own default queue, where nobody drives them.
        """
        wakes = store_for(self.app).fire_due_timers(workflows=self._known_workflows())
        if wakes:
            with self.app.producer_or_acquire() as producer:
                for run_id, workflow, options in wakes:
                    publish_wake(self.app, workflow, run_id, options, producer=producer)
        return len(wakes)

    def _loop(self) -> None:
        try:
            self.retry_stuck()
        except Exception:
            logger.exception("celery_durable sweeper: retrying stuck runs failed")
        next_sweep = 0.0
        while not self._stop.is_set():
            # Timers are checked often (their precision depends on it), the rest of the
            # recovery every sweep interval.
            try:
                self.fire_timers()
            except Exception:
                logger.exception("celery_durable: firing timers failed; will try again")
            if time.monotonic() >= next_sweep:
                try:
                    self.sweep()
                except Exception:
                    # The database or broker may be down for a while; keep trying.
                    logger.exception("celery_durable sweeper pass failed; will try again")
                next_sweep = time.monotonic() + self.settings.sweep_interval
            self._stop.wait(min(self.settings.timer_interval, self.settings.sweep_interval))
