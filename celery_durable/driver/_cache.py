"""Suspended workflow instances kept in memory between turns, so that the usual turn
(the same process that ran the previous one) skips replaying history.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from ..runtime import WorkflowInstance
from ..store import RunRecord

__all__ = ["InstanceCache", "cache"]


class InstanceCache:
    """Suspended workflow instances of this process, least recently used evicted first.

    An instance is found again by run id, incarnation and turn: continue-as-new starts
    the run over at turn 0 under the same id, so a turn number alone could hand a later
    incarnation the coroutine of an earlier one (still cached by another process).
    """

    def __init__(self) -> None:
        self._items: OrderedDict[str, tuple[int, WorkflowInstance, RunRecord | None]] = (
            OrderedDict()
        )
        self._lock = threading.Lock()

    def take(self, run_id: str, turn: int, incarnation: int = 0) -> WorkflowInstance | None:
        """Remove and return the instance of ``run_id`` if it is exactly at ``turn`` of
        ``incarnation``."""
        with self._lock:
            item = self._items.pop(run_id, None)
        if item is not None and item[0] == incarnation and item[1].turn == turn:
            return item[1]
        if item is not None:
            item[1].close()  # out of date: another process moved the run on
        return None

    def committed(self, run_id: str) -> RunRecord | None:
        """The run's row as this process's last commit of it left it (with nothing left
        undelivered), if the instance kept is that commit's."""
        with self._lock:
            item = self._items.get(run_id)
        if item is None or item[2] is None or item[1].turn != item[2].turn:
            return None
        return item[2]

    def put(
        self,
        run_id: str,
        instance: WorkflowInstance,
        capacity: int,
        incarnation: int = 0,
        committed: RunRecord | None = None,
    ) -> None:
        """Keep ``instance`` (of ``incarnation``) for the next turn of ``run_id``;
        ``committed``: the run's row as the commit of the instance's last turn left it,
        when that left nothing undelivered (see :meth:`committed`)."""
        if capacity <= 0:
            instance.close()
            return
        evicted = []
        with self._lock:
            self._items[run_id] = (incarnation, instance, committed)
            self._items.move_to_end(run_id)
            while len(self._items) > capacity:
                evicted.append(self._items.popitem(last=False)[1][1])
        for old in evicted:
            old.close()

    def clear(self) -> None:
        """Forget every instance."""
        with self._lock:
            items = list(self._items.values())
            self._items.clear()
        for _, instance, _ in items:
            instance.close()

    def __len__(self) -> int:
        return len(self._items)


#: The cache of this process; a forked child starts with the parent's copy, which stays
#: correct because instances are only reused at the exact turn the store reports.
cache = InstanceCache()
