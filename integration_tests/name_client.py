"""A client that knows workflows only by name: it sends their driver tasks with
``app.send_task`` and has neither the workflow module nor celery_durable imported, like
a service in another repository.

    python -m integration_tests.name_client '[{"name": ..., "args": [...], "task_id": ...}]'

Broker and queue come from ``DURABLE_IT_BROKER`` and ``DURABLE_IT_QUEUE``. Prints the
task id of each message sent, one a line.
"""

from __future__ import annotations

import json
import os
import sys

from celery import Celery

#: Modules that would let this process start runs itself; none may be imported here.
FORBIDDEN = ("integration_tests.wfapp", "celery_durable")


def main(argv: list[str]) -> int:
    """Send each message described in ``argv[1]`` (a JSON list); 0 on success."""
    app = Celery("name-client", broker=os.environ["DURABLE_IT_BROKER"], set_as_current=False)
    app.conf.task_default_queue = os.environ["DURABLE_IT_QUEUE"]
    for send in json.loads(argv[1]):
        result = app.send_task(
            send["name"],
            args=send.get("args"),
            kwargs=send.get("kwargs"),
            task_id=send.get("task_id"),
        )
        print(result.id, flush=True)
    app.close()
    imported = [name for name in FORBIDDEN if name in sys.modules]
    if imported:
        print(f"the client imported {imported}, so it did not send by name only", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
