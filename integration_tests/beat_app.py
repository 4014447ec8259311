"""The app of a ``celery beat`` process that schedules a workflow it knows only by name.

    celery -A integration_tests.beat_app beat --schedule DIR/beat-schedule

It never imports the workflow's module, so beat sends the driver task by name
(``app.send_task``) with the entry's arguments, and a worker starts one run per tick.
Broker and queue come from ``DURABLE_IT_BROKER`` and ``DURABLE_IT_QUEUE``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from celery import Celery, signals

#: The workflow beat starts: ``integration_tests.wfapp.sequential(2)``, by name only.
WORKFLOW = "integration_tests.wfapp.sequential"
ENTRY = "sequential-every-second"
#: The line beat logs at start, saying whether the workflow's code is in this process.
CODE_LINE = "beat_app: workflow code imported: "

app = Celery("beat_app", broker=os.environ.get("DURABLE_IT_BROKER", "memory://"))
app.conf.update(
    task_default_queue=os.environ.get("DURABLE_IT_QUEUE", "celery"),
    beat_schedule={ENTRY: {"task": WORKFLOW, "schedule": 1.0, "args": (2,)}},
    broker_connection_retry_on_startup=True,
)


@signals.beat_init.connect
def _say_what_is_imported(**_: Any) -> None:
    imported = "integration_tests.wfapp" in sys.modules or WORKFLOW in app.tasks
    logging.getLogger(__name__).warning("%s%s", CODE_LINE, imported)
