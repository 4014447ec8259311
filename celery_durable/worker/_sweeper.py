"""Recovering what the broker lost, from SQL.

Every worker runs a :class:`Sweeper` (started by the worker bootstep). It renews, on
every heartbeat, the claims of the step messages this worker holds (a claim is a lease),
and each pass it:

1. records a heartbeat for this worker (the first time, it also retires the older
   workers of its node name that it can see are dead: see ``_identity``);
2. gives new dispatches to steps whose claim expired: their worker stopped, died, or
   lost the message (a broker restart takes what a worker had prefetched); they are sent
   again after a backoff, and a step lost too often fails with ``StepLostError``;
3. re-sends steps published but never claimed for ``durable_stall_timeout`` (a broker
   restart, a crash between commit and publish); copies share the dispatch id, so
   whichever arrives first runs and the others are dropped;
4. wakes active runs that have outcomes nobody delivered, or were never driven;
5. every :data:`RETENTION_EVERY` passes, deletes one batch of what has expired
   (:meth:`Sweeper.retention`): finished runs older than ``durable_result_expires``
   with their families and history, consumed signals left by continue-as-new, and the
   rows of workers gone for :data:`GONE_WORKERS_KEPT` that hold no claim.

Between passes it fires durable timers that are due, and sends the steps whose backoff
has passed, every ``durable_timer_interval``.

A warm shutdown stops the passes but not the heartbeats: while the pool drains, the
worker keeps proving it holds the steps it is still running (:meth:`Sweeper.drain`).

Many workers may sweep at once: each item is taken by one of them in a fenced update.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from celery import Celery

from .._codec import encode_error
from .._config import settings_for, store_for
from ..errors import DurableError, UnknownWorkflowError
from ..store import STUCK, PurgeMark, RunRecord, is_unreachable
from . import _identity
from ._claims import held_dispatches
from ._messages import publish_wake
from ._republish import resend, retry_run

__all__ = ["GONE_WORKERS_KEPT", "RETENTION_BATCH", "RETENTION_EVERY", "Sweeper"]

logger = logging.getLogger(__name__)

#: Passes between two retention batches of one sweeper (a minute at the default
#: ``durable_sweep_interval``): deleting is never urgent, and recovery comes first.
RETENTION_EVERY = 6
#: Top-level runs (with their families) one retention batch deletes at most.
RETENTION_BATCH = 200
#: Seconds after its last heartbeat at which a worker holding no claim is forgotten.
GONE_WORKERS_KEPT = 24 * 3600.0


class Sweeper:
    """Periodic recovery for one worker process; :meth:`sweep` is one pass."""

    def __init__(self, app: Celery, worker_id: str, hostname: str) -> None:
        self.app = app
        self.worker_id = worker_id
        self.hostname = hostname
        self.settings = settings_for(app)
        self._stop = threading.Event()
        self._draining = threading.Event()
        self._thread: threading.Thread | None = None
        # Since when this process has reached the store without a failure. After an
        # outage nobody could renew a lease, so expired-looking claims are only taken
        # once their holders have had a whole timeout to renew them again.
        self._reachable_since = time.monotonic()
        self.info = _identity.info(worker_id, hostname)
        self._predecessors_checked = False
        self._passes = 0
        # Where the next retention batches go on (see Store.purge_finished).
        self._purge_mark: PurgeMark | None = None
        self._signal_mark = 0

    @property
    def heartbeat_interval(self) -> float:
        """How often this worker renews its heartbeat and leases."""
        return min(self.settings.sweep_interval, self.settings.worker_timeout / 3)

    def heartbeat(self) -> int:
        """Record that this worker is alive and renew its claims; returns how many."""
        store = store_for(self.app)
        store.heartbeat(self.info)
        if not self._predecessors_checked:
            self.retire_predecessors()
        return store.renew_leases(self.worker_id, held_dispatches())

    def retire_predecessors(self) -> int:
        """Record as gone the older workers of this node name on this machine whose
        process is dead (this worker was restarted after a crash), so that their claims
        are released at once instead of after ``durable_worker_timeout``; returns how
        many. A live worker sharing the node name is left alone.
        """
        store = store_for(self.app)
        gone = [w.id for w in store.live_workers_named(self.info) if _identity.is_gone(w)]
        retired = store.retire_workers(gone)
        self._predecessors_checked = True
        if retired:
            logger.warning(
                "celery_durable: %d earlier worker(s) named %s on this machine are dead; "
                "their steps are released",
                retired,
                self.hostname,
            )
        return retired

    def sweep(self, leases_may_expire: bool | None = None) -> dict[str, int]:
        """One recovery pass; returns counts of what it re-sent.

        ``leases_may_expire``: release claims nobody renewed (default: once this process
        has reached the store for a whole ``durable_worker_timeout``).
        """
        store = store_for(self.app)
        self.heartbeat()
        if leases_may_expire is None:
            reachable_for = time.monotonic() - self._reachable_since
            leases_may_expire = reachable_for >= self.settings.worker_timeout
        policy = self.settings.loss_policy
        failed = store.release_expired_claims(
            self.settings.worker_timeout, policy, leases=leases_may_expire
        )
        self._wake(failed)
        stale = resend(self.app, store.stale_dispatches(self.settings.stall_timeout), copies=True)
        known = self._known_workflows()
        # Only runs whose wake this app can route: another app sharing the store has
        # its own workers, queues and maybe broker.
        runs = store.runs_to_wake(self.settings.stall_timeout, workflows=known)
        woken = self._wake([(run.id, run.workflow, run.options) for run in runs])
        # A run with work to do that no sweeper has woken for three stall periods has no
        # live worker that knows its workflow (it fails to import?): park it, with why.
        for run in store.runs_to_wake(3 * self.settings.stall_timeout, exclude=known):
            self._park_unknown(run)
        # ...and a worker that knows it again (fixed code deployed) takes it back.
        self.retry_stuck(only_unknown_to=known)
        if stale or woken or failed:
            logger.warning(
                "celery_durable sweeper: re-sent %d unclaimed steps, woke %d runs, failed "
                "%d steps lost too often",
                stale,
                woken,
                len(failed),
            )
        counts = {"stale": stale, "woken": woken, "lost": len(failed)}
        self._passes += 1
        if self._passes % RETENTION_EVERY == 0:
            counts["purged"] = self._retention_batch()
        return counts

    def retention(self) -> dict[str, int]:
        """Delete one batch of what has expired; returns how many of each went.

        One short transaction each: up to :data:`RETENTION_BATCH` finished top-level
        runs older than ``durable_result_expires`` (with their descendants, steps and
        signals), one window of signal ids for consumed signals whose step is gone, and
        the rows of workers gone for a day that hold no claim.
        """
        store = store_for(self.app)
        runs = 0
        expires = self.settings.result_expires
        if expires is not None:
            purged = store.purge_finished(expires, RETENTION_BATCH, after=self._purge_mark)
            self._purge_mark = purged.resume_after
            runs = purged.runs
        signals, self._signal_mark = store.purge_orphan_signals(self._signal_mark)
        workers = store.forget_workers(GONE_WORKERS_KEPT)
        return {"runs": runs, "signals": signals, "workers": workers}

    def _retention_batch(self) -> int:
        # Deleting must never stop recovery: a failed batch is logged and tried again
        # next time (an unreachable store is the loop's business).
        try:
            counts = self.retention()
        except Exception as exc:
            if is_unreachable(exc):
                raise
            logger.exception("celery_durable sweeper: deleting expired runs failed")
            return 0
        if any(counts.values()):
            logger.info(
                "celery_durable sweeper: deleted %(runs)d expired runs, %(signals)d consumed "
                "signals, %(workers)d rows of gone workers",
                counts,
            )
        return counts["runs"]

    def _wake(self, wakes: Sequence[tuple[str, str, Mapping[str, Any]]]) -> int:
        if wakes:
            with self.app.producer_or_acquire() as producer:
                for run_id, workflow, options in wakes:
                    publish_wake(self.app, workflow, run_id, options, producer=producer)
        return len(wakes)

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
        if store_for(self.app).park(run.id, run.turn, STUCK, error, run.incarnation):
            logger.error("%s; parked as STUCK", message)
            return True
        return False

    def retry_stuck(self, only_unknown_to: Collection[str] | None = None) -> int:
        """Wake STUCK runs (new code may have fixed them); returns how many.

        ``only_unknown_to``: just the runs parked because no worker knew their workflow,
        of the workflows named (the ones this worker knows).
        """
        count = 0
        # Filtered in SQL: stuck runs of other causes or workflows never hide these.
        for run in store_for(self.app).stuck_runs(unknown_to=only_unknown_to):
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

    def drain(self) -> None:
        """Stop recovering and firing timers, but keep the heartbeats and leases going
        (a warm shutdown: the pool is still finishing its steps)."""
        self._draining.set()

    def stop(self) -> None:
        """Stop the thread altogether (waits for a pass in progress)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def poll_due(self) -> int:
        """Fire the durable timers that are due and send the steps whose backoff after a
        lost worker has passed; returns how many.

        Only those of workflows this worker's app knows: another app sharing the store
        would send their messages to its own default queue, where nobody handles them.
        """
        store = store_for(self.app)
        known = self._known_workflows()
        fired = self._wake(store.fire_due_timers(workflows=known))
        return fired + resend(self.app, store.take_due_steps(workflows=known))

    def _loop(self) -> None:
        try:
            self.retry_stuck()
        except Exception:
            logger.exception("celery_durable sweeper: retrying stuck runs failed")
        next_sweep = next_heartbeat = 0.0
        outage = False
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                if self._draining.is_set():
                    if now >= next_heartbeat:
                        self.heartbeat()
                        next_heartbeat = now + self.heartbeat_interval
                else:
                    # Timers are checked often (their precision depends on it), the
                    # rest of the recovery every sweep interval.
                    self.poll_due()
                    if now >= next_sweep:
                        self.sweep()
                        next_sweep = now + self.settings.sweep_interval
                        next_heartbeat = now + self.heartbeat_interval
                    elif now >= next_heartbeat:
                        self.heartbeat()
                        next_heartbeat = now + self.heartbeat_interval
            except Exception as exc:
                # The database or broker may be down for a while; keep trying.
                if not is_unreachable(exc):
                    logger.exception("celery_durable sweeper pass failed; will try again")
                else:
                    if not outage:
                        logger.warning("celery_durable: the store is unreachable (%s)", exc)
                    outage = True
                    self._reachable_since = time.monotonic()
            else:
                if outage:
                    logger.warning("celery_durable: the store is reachable again")
                outage = False
            self._stop.wait(min(self.settings.timer_interval, self.heartbeat_interval))
