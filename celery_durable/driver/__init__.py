"""The driver layer: one wake message drives one run through the turns that are ready;
a start request (the driver task sent by name) creates the run first.

A turn loads the run and its new outcomes from the store, brings the workflow's
coroutine up to date (from the process's cache, or by replay), activates it, turns the
commands it issued into one fenced commit, and then publishes the messages that commit
implies. Parts:

* ``_driver`` — :class:`RunDriver`, the turn itself and what follows its commit;
* ``_start`` — creating runs, and telling a wake from a start request sent by name
  (:func:`on_driver_message`);
* ``_plan`` — :class:`TurnPlan`, one method per kind of command;
* ``_cache`` — suspended instances kept between turns;
* ``_local`` — driving the next turn in the process that keeps the run suspended,
  handed over on this machine without the broker;
* ``_ids`` — which workflow ids callers may choose, and child runs' ids.

Imports the runtime, the store, the worker layer (for publishing), the codec, settings
and Celery; never the canvas or public API modules (a test holds the rule).
"""

from __future__ import annotations

from ._cache import InstanceCache, cache
from ._driver import MAX_TURNS_IN_ONE_TASK, RunDriver
from ._ids import check_workflow_id, child_run_id
from ._local import LocalTurns, local_turns
from ._plan import TurnPlan
from ._start import create_run, driver_options, on_driver_message

__all__ = [
    "MAX_TURNS_IN_ONE_TASK",
    "InstanceCache",
    "LocalTurns",
    "RunDriver",
    "TurnPlan",
    "cache",
    "check_workflow_id",
    "child_run_id",
    "create_run",
    "driver_options",
    "local_turns",
    "on_driver_message",
]
