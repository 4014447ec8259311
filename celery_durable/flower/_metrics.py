"""Workflow series on Flower's ``/metrics``: a Prometheus collector that reads the store.

Flower serves ``prometheus_client``'s default registry at ``/metrics``.
:class:`WorkflowMetrics` is registered there and reports a :class:`~celery_durable.store.Census`
of the store, with no label that names a run. A scrape never waits on the store for
long: the census is kept for :data:`MAX_AGE` seconds, a new one is read in a thread of
its own and waited for at most :data:`TIME_LIMIT` seconds (PostgreSQL cancels it then
too), and one read at a time is made however many scrapes come. When the store cannot
answer in time, the scrape has no workflow series and
``celery_durable_metrics_errors_total`` goes up; Flower's own series are unaffected.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from celery import Celery
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .._config import store_for
from ..store import FINISHED, Census

__all__ = ["MAX_AGE", "SERIES", "TIME_LIMIT", "WorkflowMetrics", "metrics_for"]

logger = logging.getLogger(__name__)

#: Seconds a census is served before the next scrape reads a new one.
MAX_AGE = 10.0
#: Seconds a scrape waits for a census at most.
TIME_LIMIT = 2.0
#: The most (workflow, status) pairs reported.
GROUPS = 1000

#: Every series, with its type, labels and help text (the README lists the same).
SERIES: dict[str, tuple[str, tuple[str, ...], str]] = {
    "celery_durable_runs": (
        "gauge",
        ("workflow", "status"),
        "Workflow runs in the store by workflow and status; finished runs count until "
        "they expire (durable_result_expires).",
    ),
    "celery_durable_runs_last_finished_timestamp_seconds": (
        "gauge",
        ("workflow", "status"),
        "When the latest run of the workflow that is kept in the store finished with "
        "this status (UNIX time).",
    ),
    "celery_durable_runs_stuck": (
        "gauge",
        (),
        "Runs parked STUCK (no worker knows the workflow, non-determinism, an unreadable "
        "input): they need a deploy or a retry.",
    ),
    "celery_durable_steps_open": (
        "gauge",
        ("kind", "state"),
        "Steps not finished: task steps waiting for (SCHEDULED) or held by (CLAIMED) a "
        "worker, open timers, signal waits and child runs.",
    ),
    "celery_durable_steps_redelivered": (
        "gauge",
        ("cause",),
        "Open task steps that were sent again: their worker was lost (worker_lost) or "
        "their message was never taken (message_lost).",
    ),
    "celery_durable_outcomes_waiting": (
        "gauge",
        (),
        "Step outcomes recorded and not yet delivered to a turn of their run.",
    ),
    "celery_durable_outcomes_waiting_age_seconds": (
        "gauge",
        (),
        "How long the oldest undelivered outcome has waited for its run's next turn.",
    ),
    "celery_durable_timers_overdue_seconds": (
        "gauge",
        (),
        "How far past its deadline the most overdue open timer is (0: none).",
    ),
    "celery_durable_metrics_read_seconds": (
        "gauge",
        (),
        "How long the last census of the store took to read.",
    ),
    "celery_durable_metrics_errors": (
        "counter",
        (),
        "Scrapes that got no workflow series: the store failed or did not answer in time.",
    ),
}


def _family(name: str) -> GaugeMetricFamily | CounterMetricFamily:
    kind, labels, text = SERIES[name]
    if kind == "counter":
        return CounterMetricFamily(name, text, labels=labels)
    return GaugeMetricFamily(name, text, labels=labels)


class WorkflowMetrics:
    """A ``prometheus_client`` collector of the runs in ``app``'s store.

    :meth:`refresh` (blocking, thread-safe) brings the census up to date; :meth:`collect`
    only reports what the last one found, so it never waits on the store.

    Args:
        app: the Celery app whose ``durable_database_url`` is read.
        max_age: seconds a census is reused.
        time_limit: seconds :meth:`refresh` waits for a new census.
    """

    def __init__(
        self, app: Celery, max_age: float = MAX_AGE, time_limit: float = TIME_LIMIT
    ) -> None:
        self.app = app
        self.max_age = max_age
        self.time_limit = time_limit
        self.errors = 0
        self._census: Census | None = None
        self._taken = float("-inf")
        self._read_seconds: float | None = None
        self._pending: Future[Census] | None = None
        self._lock = threading.Lock()

    def refresh(self) -> None:
        """Read a new census unless the last one is recent; wait ``time_limit`` at most."""
        with self._lock:
            if time.monotonic() - self._taken < self.max_age:
                return
            if self._pending is None:
                self._pending = self._start_read()
            pending = self._pending
        try:
            pending.result(timeout=self.time_limit)
        except FutureTimeout:
            self._failed(f"the store did not answer within {self.time_limit:g} s")
        except Exception as exc:
            self._failed(str(exc))

    def _start_read(self) -> Future[Census]:
        # A daemon thread of its own, not a pool's: a read hung on an unreachable server
        # neither takes a thread Flower needs nor holds up its exit.
        future: Future[Census] = Future()

        def read() -> None:
            started = time.monotonic()
            try:
                census = store_for(self.app).census(GROUPS, self.time_limit)
            except BaseException as exc:
                with self._lock:
                    self._pending = None
                future.set_exception(exc)
                return
            with self._lock:
                self._census, self._taken = census, time.monotonic()
                self._read_seconds = self._taken - started
                self._pending = None
            future.set_result(census)

        threading.Thread(target=read, name="durable-metrics", daemon=True).start()
        return future

    def _failed(self, reason: str) -> None:
        with self._lock:
            self.errors += 1
            self._census, self._taken = None, float("-inf")
        logger.warning("no workflow metrics in this scrape: %s", reason)

    def describe(self) -> Iterator[Metric]:
        """The series this collector may report (for the registry's duplicate check)."""
        for name in SERIES:
            yield _family(name)

    def collect(self) -> Iterator[Metric]:
        """The series of the last census, and the error counter (no I/O)."""
        with self._lock:
            census, errors, read_seconds = self._census, self.errors, self._read_seconds
        families = {name: _family(name) for name in SERIES}
        families["celery_durable_metrics_errors"].add_metric([], errors)
        yield families["celery_durable_metrics_errors"]
        if census is None:
            return
        if read_seconds is not None:
            families["celery_durable_metrics_read_seconds"].add_metric([], read_seconds)
        stuck = 0
        for group in census.runs:
            labels = [group.workflow, group.status]
            families["celery_durable_runs"].add_metric(labels, group.count)
            if group.status in FINISHED and group.last_finished_at is not None:
                last = families["celery_durable_runs_last_finished_timestamp_seconds"]
                last.add_metric(labels, group.last_finished_at)
            if group.status == "STUCK":
                stuck += group.count
        families["celery_durable_runs_stuck"].add_metric([], stuck)
        for (kind, state), count in sorted(census.open_steps.items()):
            families["celery_durable_steps_open"].add_metric([kind, state], count)
        redelivered = families["celery_durable_steps_redelivered"]
        redelivered.add_metric(["worker_lost"], census.redelivered_lost_worker)
        redelivered.add_metric(["message_lost"], census.redelivered_lost_message)
        families["celery_durable_outcomes_waiting"].add_metric([], census.outcomes_waiting)
        families["celery_durable_outcomes_waiting_age_seconds"].add_metric(
            [], census.oldest_outcome_age
        )
        families["celery_durable_timers_overdue_seconds"].add_metric([], census.most_overdue_timer)
        for name, family in families.items():
            if name != "celery_durable_metrics_errors":
                yield family


_registered: dict[str, WorkflowMetrics] = {}
_registered_lock = threading.Lock()


def metrics_for(app: Celery) -> WorkflowMetrics:
    """The collector of ``app``, registered in ``prometheus_client``'s default registry
    (the one Flower serves); one per process, replaced if another app asks."""
    with _registered_lock:
        current = _registered.get("collector")
        if current is not None and current.app is app:
            return current
        if current is not None:
            REGISTRY.unregister(current)
        collector = WorkflowMetrics(app)
        REGISTRY.register(collector)
        _registered["collector"] = collector
        return collector
