"""The worker layer: where Celery's worker side meets the store.

* ``_claims`` — signal handlers that claim a step's message at receipt and record its
  outcome where it ran;
* ``_bootstep`` — the worker bootstep that registers the worker and runs its sweeper;
* ``_sweeper`` — the periodic recovery of what the broker lost, durable timers, and
  retention (deleting what has expired);
* ``_messages`` — the two kinds of message (step and wake) and their headers;
* ``_republish`` — turning stored dispatches back into messages (recovery, retry);
* ``_identity`` — this process's identity in the store;
* ``_wakes`` — where a recorded outcome's wake goes: a driver in this process (which
  the driver layer installs), or the broker.

It may import the store, the codec and settings, and Celery; never the driver, canvas or
public API modules (a test holds the rule). :func:`connect` runs when celery_durable is
imported.
"""

from __future__ import annotations

from celery import signals

from ._bootstep import (
    DurableWorkerStep,
    on_process_init,
    on_process_shutdown,
    on_worker_init,
    on_worker_shutdown,
)
from ._claims import on_task_failure, on_task_received, on_task_revoked, on_task_success
from ._identity import worker_id
from ._messages import (
    DRIVER_OPTION_KEYS,
    batched,
    is_wake,
    publish_step,
    publish_wake,
    step_headers,
)
from ._republish import publish_resumed, resend, retry_run
from ._sweeper import GONE_WORKERS_KEPT, Sweeper
from ._wakes import OutcomeHint, install_local_driver, runs_tasks, wake

__all__ = [
    "DRIVER_OPTION_KEYS",
    "GONE_WORKERS_KEPT",
    "DurableWorkerStep",
    "OutcomeHint",
    "Sweeper",
    "batched",
    "connect",
    "install_local_driver",
    "is_wake",
    "publish_resumed",
    "publish_step",
    "publish_wake",
    "resend",
    "retry_run",
    "runs_tasks",
    "step_headers",
    "wake",
    "worker_id",
]

_connected = False


def connect() -> None:
    """Connect the signal handlers and the bootstep (idempotent)."""
    global _connected
    if _connected:
        return
    _connected = True
    signals.task_received.connect(on_task_received, weak=False)
    signals.task_success.connect(on_task_success, weak=False)
    signals.task_failure.connect(on_task_failure, weak=False)
    signals.task_revoked.connect(on_task_revoked, weak=False)
    signals.worker_shutdown.connect(on_worker_shutdown, weak=False)
    signals.worker_init.connect(on_worker_init, weak=False)
    signals.worker_process_init.connect(on_process_init, weak=False)
    signals.worker_process_shutdown.connect(on_process_shutdown, weak=False)
