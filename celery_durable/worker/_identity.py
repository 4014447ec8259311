"""This worker process's identity in the store: what its claims and heartbeats name,
and how a worker tells that another one on its machine is gone.

Node names repeat: replicas started with one ``-n`` share it (Celery only warns), and a
restarted worker takes its predecessor's. So a worker is known by an id no other process
ever has, and a worker starting up gives up on an older one of its node name only when it
can see that the older one's process is dead: same kernel boot and pid namespace, and no
live process with its pid and start time. Anywhere else (another host, another container
with its own pid namespace, a platform without ``/proc``) the older worker's claims are
released only when it stops renewing them (``durable_worker_timeout``).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from ..store import WorkerInfo

__all__ = ["adopt", "hostname", "info", "is_gone", "machine", "registered", "worker_id"]

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


def info(worker: str, node_name: str) -> WorkerInfo:
    """What the store records about this process, registered as ``worker``."""
    pid = os.getpid()
    return WorkerInfo(worker, node_name, pid, machine(), process_start(pid))


def machine() -> str | None:
    """This kernel boot and pid namespace, or None where they cannot be read.

    Two processes with the same value see the same pids; anything else (another host,
    a container with its own pid namespace, a reboot) is another machine here.
    """
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot and namespace else None


def process_start(pid: int) -> str | None:
    """When the process ``pid`` of this machine started (clock ticks since boot), or
    None if it cannot be read (no such process, no ``/proc``)."""
    stat = _stat(pid)
    return None if stat is None else stat[19]  # field 22 of stat: starttime


def is_gone(other: WorkerInfo) -> bool:
    """Whether the worker ``other`` is certainly dead: it ran on this machine, and no
    process with its pid and start time is alive. False whenever that cannot be told."""
    here = machine()
    if here is None or other.machine != here or other.process_start is None:
        return False
    stat = _stat(other.pid)
    if stat is None:
        # Unreadable is not dead: /proc mounted with hidepid hides other users' processes.
        try:
            os.kill(other.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False  # it exists, as another user
        return False
    # A zombie is dead; a process with the pid but another start time is a new one.
    return stat[0] in ("Z", "X") or stat[19] != other.process_start


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` from the state on (field 3), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after it.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields if len(fields) >= 20 else None
