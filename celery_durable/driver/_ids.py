"""Workflow ids: which ids a caller may choose, and the ids of child runs.

A run's id is the primary key of its row, so it must fit the column
(:data:`~celery_durable.store.MAX_RUN_ID_LENGTH` characters). A child run's id is made
from its parent's: ``<parent id>/<seq>``. The separator ``/`` is reserved for them, so
no id a caller chooses can ever be a child's (a user run named ``p-1/1`` would take the
id of run ``p-1``'s first child, and the parent would be refused its child). A parent
whose id leaves no room for the suffix gives its children a shortened id that keeps a
hash of the whole parent id, so children of different parents still never share one.
"""

from __future__ import annotations

import hashlib

from ..errors import WorkflowIdError
from ..store import MAX_RUN_ID_LENGTH

__all__ = ["CHILD_SEPARATOR", "check_workflow_id", "child_run_id"]

#: Separates a child run's id from its parent's; ids callers choose may not contain it.
CHILD_SEPARATOR = "/"

#: Hex digits of the parent id's SHA-256 kept in a shortened child id.
_DIGEST = 32
#: Room left after the kept prefix: the digest, its mark, the separator and a seq.
_SUFFIX = 64


def check_workflow_id(workflow_id: object, workflow: str) -> str:
    """Return ``workflow_id`` if the store can keep it as the id of a new run.

    Raises:
        WorkflowIdError: it is not a string, is empty, is longer than the column, or
            contains the separator reserved for child runs.
    """
    label = f"workflow {workflow}"
    if not isinstance(workflow_id, str):
        raise WorkflowIdError(
            f"{label}: a workflow id must be a string, got {workflow_id!r} "
            f"({type(workflow_id).__name__}); pass workflow_id=str(...)"
        )
    if not workflow_id:
        raise WorkflowIdError(
            f"{label}: the workflow id is empty; pass a non-empty workflow_id, or none "
            "for a generated one"
        )
    if len(workflow_id) > MAX_RUN_ID_LENGTH:
        raise WorkflowIdError(
            f"{label}[{workflow_id[:40]}…]: the workflow id has {len(workflow_id)} "
            f"characters, more than the {MAX_RUN_ID_LENGTH} the store keeps; use a "
            "shorter id (a hash of a long key, for example)"
        )
    if CHILD_SEPARATOR in workflow_id:
        raise WorkflowIdError(
            f"{label}[{workflow_id}]: a workflow id may not contain "
            f"{CHILD_SEPARATOR!r}, which only child runs' ids use "
            f"(<parent id>{CHILD_SEPARATOR}<step>); use another separator such as ':' or '-'"
        )
    return workflow_id


def child_run_id(parent_id: str, seq: int) -> str:
    """The id of the child run that step ``seq`` of run ``parent_id`` starts.

    ``<parent id>/<seq>`` when it fits the column; otherwise the parent id's first
    characters, ``#`` and a hash of the whole parent id, then ``/<seq>``.
    """
    plain = f"{parent_id}{CHILD_SEPARATOR}{seq}"
    if len(plain) <= MAX_RUN_ID_LENGTH:
        return plain
    digest = hashlib.sha256(parent_id.encode("utf-8")).hexdigest()[:_DIGEST]
    prefix = parent_id[: MAX_RUN_ID_LENGTH - _SUFFIX]
    return f"{prefix}#{digest}{CHILD_SEPARATOR}{seq}"
