"""Where the wake for a recorded outcome goes.

A worker process that records a step's outcome usually has the workflow's code too, and
often is (or shares a machine with) the process keeping the run's coroutine suspended.
Driving the next turn there costs no broker message and no replay. The driver layer,
which knows how, installs a :data:`LocalDriver` here (``driver._local``); this module
only decides whether to ask it, and otherwise sends the wake to the broker.

Only processes that run tasks (a prefork child, a threads or solo pool's worker) drive
turns locally: the main process of a prefork worker, which runs the consumer, never does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from celery import Celery

from ..store import ErrorInfo
from ._messages import publish_wake

__all__ = [
    "LocalDriver",
    "OutcomeHint",
    "drain_local_driver",
    "install_local_driver",
    "runs_tasks",
    "set_runs_tasks",
    "wake",
]

logger = logging.getLogger(__name__)


class OutcomeHint(NamedTuple):
    """The outcome whose recording woke a run, as its recorder knows it.

    When it is the only event the run's last turn did not see (``events`` is one more
    than what that turn saw), the process keeping the run's coroutine can run the next
    turn from what its own last commit left, without reading the run back.
    """

    seq: int
    name: str
    #: The run's event count with this outcome's event.
    events: int
    result: tuple[str, bytes] | None = None
    error: ErrorInfo | None = None


#: ``(app, workflow, run id, driver options, holder, hint) -> taken``: drive the run's
#: next turn in this process or hand it to its holder on this machine; False if it
#: cannot.
LocalDriver = Callable[
    [Celery, str, str, Mapping[str, Any], "str | None", "OutcomeHint | None"], bool
]

_local_driver: LocalDriver | None = None
_drain: Callable[[float], None] | None = None
_runs_tasks = False


def install_local_driver(driver: LocalDriver, drain: Callable[[float], None]) -> None:
    """Let recorders in this process hand wakes to ``driver`` (the driver layer's);
    ``drain(timeout)`` finishes the turns it has taken, before the process exits."""
    global _local_driver, _drain
    _local_driver, _drain = driver, drain


def drain_local_driver(timeout: float) -> None:
    """Take no more local turns and finish those taken (at most ``timeout`` seconds)."""
    if _drain is not None:
        _drain(timeout)


def set_runs_tasks(value: bool) -> None:
    """Say whether this process runs tasks (and so may drive turns)."""
    global _runs_tasks
    _runs_tasks = value


def runs_tasks() -> bool:
    """Whether this process runs tasks: set by the bootstep and in each pool child."""
    return _runs_tasks


def wake(
    app: Celery,
    workflow: str,
    run_id: str,
    options: Mapping[str, Any],
    holder: str | None = None,
    hint: OutcomeHint | None = None,
) -> None:
    """Have the run's next turn driven: here or by its holder if that can be done
    without the broker, else by whichever worker takes the wake message.

    A wake that goes nowhere is not lost: the run's event stays counted and unseen in
    the store, and the sweeper wakes it after ``durable_stall_timeout``.
    """
    if _local_driver is not None and _runs_tasks and not app.conf.task_always_eager:
        try:
            if _local_driver(app, workflow, run_id, options, holder, hint):
                return
        except Exception:
            logger.exception("workflow %s[%s]: could not drive it here", workflow, run_id)
    publish_wake(app, workflow, run_id, options)
