"""This worker process's identity in the store: what its claims and heartbeats name."""

from __future__ import annotations

import os
import uuid

__all__ = ["adopt", "hostname", "registered", "worker_id"]

# Set by the bootstep when the worker starts; a process that claims steps without it
# (a worker started without the bootstep) gets an id at its first claim.
_identity: dict[str, str] = {}


def adopt(node_name: str) -> str:
    """Take a new id for this process, as the worker called ``node_name``; returns it."""
    _identity["id"] = f"{node_name}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    _identity["hostname"] = node_name
    return _identity["id"]


def worker_id() -> str:
    """The id under which this worker claims steps."""
    if "id" not in _identity:
        adopt(os.uname().nodename)
    return _identity["id"]


def hostname() -> str | None:
    """The node name this process registered under, if the bootstep ran."""
    return _identity.get("hostname")


def registered() -> bool:
    """Whether this process has an identity yet."""
    return "id" in _identity
