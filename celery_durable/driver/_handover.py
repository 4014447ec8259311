"""The datagrams by which a recorder hands a run to the process on its machine that
keeps the run's coroutine (``_local``).

A plain hand-over names a workflow and a run: ``<workflow>\\n<run id>``. Nothing in it
is trusted; it only says which run to look at in the store. A hand-over may also carry
the outcome whose recording woke the run (an :class:`~..worker.OutcomeHint`), so that
the holder runs the turn without reading the run back. That outcome goes into the
workflow's code, so it is used only from a process of the same user (the kernel names
the sender's uid, ``SO_PASSCRED``); from anyone else the datagram is a plain hand-over.
Anything malformed is dropped.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import tempfile

from ..worker import OutcomeHint

__all__ = [
    "CREDENTIALS",
    "DATAGRAM",
    "HINT_MAX_BYTES",
    "PREFIX",
    "VOUCHED",
    "address",
    "hand_over",
    "read_hand_over",
]

PREFIX = "celery-durable"

#: The largest datagram read; a hint whose outcome would not fit is not sent.
DATAGRAM = 64 * 1024
HINT_MAX_BYTES = 48 * 1024

_HINT = b"\x01"
_UCRED = struct.Struct("3i")
#: Whether the kernel names a datagram's sender here (Linux).
VOUCHED = sys.platform.startswith("linux") and hasattr(socket, "SO_PASSCRED")
#: The ancillary buffer for the sender's credentials.
CREDENTIALS = socket.CMSG_SPACE(_UCRED.size) if VOUCHED else 0


def address(holder: str) -> str | bytes:
    """The socket address a holder id listens on."""
    name = holder.partition("@")[0]
    if sys.platform.startswith("linux"):
        return b"\0" + name.encode()  # abstract: vanishes with the process
    return os.path.join(tempfile.gettempdir(), name.replace("/", "-") + ".sock")


def hand_over(workflow: str, run_id: str, hint: OutcomeHint | None) -> bytes:
    """The datagram handing ``run_id`` over, with ``hint`` when it fits."""
    plain = f"{workflow}\n{run_id}".encode()
    if hint is None or not VOUCHED:
        return plain
    payload = hint.result[1] if hint.result is not None else b""
    if len(payload) > HINT_MAX_BYTES:
        return plain
    head = {
        "w": workflow,
        "r": run_id,
        "s": hint.seq,
        "n": hint.name,
        "e": hint.events,
        "t": hint.result[0] if hint.result is not None else None,
        "x": hint.error,
    }
    try:
        return _HINT + json.dumps(head).encode() + b"\n" + payload
    except (TypeError, ValueError):  # an error's details JSON cannot carry
        return plain


def read_hand_over(
    data: bytes, ancillary: list[tuple[int, int, bytes]]
) -> tuple[str, str, OutcomeHint | None] | None:
    """``(workflow, run id, hint)`` of a received datagram; None if it is malformed.

    The hint is kept only if the kernel names a sender of this process's user.
    """
    if data[:1] != _HINT:
        workflow, _, run_id = data.decode("utf-8", "replace").partition("\n")
        return (workflow, run_id, None) if workflow and run_id else None
    head_line, _, payload = data[1:].partition(b"\n")
    try:
        head = json.loads(head_line)
        workflow, run_id = str(head["w"]), str(head["r"])
        kind, error = head["t"], head["x"]
        if (kind is None) == (error is None) or not isinstance(error, (dict, type(None))):
            return None
        hint = OutcomeHint(
            int(head["s"]),
            str(head["n"]),
            int(head["e"]),
            result=(str(kind), payload) if kind is not None else None,
            error=error,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
    if not (workflow and run_id):
        return None
    return workflow, run_id, hint if _sender_uid(ancillary) == os.geteuid() else None


def _sender_uid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == getattr(socket, "SCM_CREDENTIALS", -1):
            _pid, uid, _gid = _UCRED.unpack(data[: _UCRED.size])
            return int(uid)
    return None
