"""A client process that terminates a run and stops dead right after the store's commit.

Run as ``python -m integration_tests.terminator RUN_ID REASON`` with a test's
``DURABLE_IT_*`` environment. :meth:`WorkflowHandle.terminate` runs as usual, except that
the moment ``Store.terminate`` has committed, the process blocks (``wfapp.pause_once``
at point ``after-terminate`` of the run) until the test kills it: whatever the client
would do after the commit (revoking tasks, waking the parent) never happens.
"""

from __future__ import annotations

import sys
from typing import Any

from celery_durable import WorkflowHandle
from celery_durable.store import Store

from . import wfapp


def main(run_id: str, reason: str) -> None:
    commit = Store.terminate

    def terminate_then_stop(self: Store, *args: Any, **kwargs: Any) -> Any:
        ended = commit(self, *args, **kwargs)
        wfapp.pause_once(run_id, "after-terminate")
        return ended

    Store.terminate = terminate_then_stop  # type: ignore[method-assign]
    WorkflowHandle(run_id, app=wfapp.app).terminate(reason)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
