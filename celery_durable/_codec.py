"""Encoding of workflow inputs, results and errors for the store.

Values go through kombu's serializers (the app's ``task_serializer``, JSON by default),
exactly as Celery encodes task arguments, so whatever a task can take a workflow can
take. Exceptions are stored as plain data (type, module, arguments, traceback) and rebuilt
the way Celery's result backends rebuild them: only from exception classes already
imported in this process, never by importing a module named in stored data.
"""

from __future__ import annotations

import json
import sys
import traceback
from dataclasses import dataclass
from typing import Any

from celery.utils.serialization import UnpickleableExceptionWrapper
from kombu.exceptions import DecodeError, EncodeError
from kombu.serialization import dumps, loads

from .errors import ActivityError, WorkflowEncodeError
from .store import ErrorInfo

__all__ = ["Codec", "ErrorInfo", "decode_error", "encode_error"]


@dataclass(frozen=True)
class Codec:
    """Turns Python values into ``(content_type, bytes)`` and back with one serializer."""

    serializer: str = "json"

    def dumps(self, value: Any, what: str) -> tuple[str, bytes]:
        """Encode ``value``; ``what`` describes it for the error message.

        Raises:
            WorkflowEncodeError: the serializer cannot encode the value.
        """
        try:
            content_type, encoding, encoded = dumps(value, serializer=self.serializer)
        except (EncodeError, TypeError, ValueError) as exc:
            raise WorkflowEncodeError(
                f"{what} cannot be encoded with the {self.serializer!r} serializer: {exc}. "
                "Pass values the serializer understands (for JSON: dicts, lists, strings, "
                "numbers, booleans and None), or change the app's task_serializer."
            ) from exc
        # Text serializers (JSON) give str, binary ones (pickle, msgpack) bytes.
        payload: str | bytes = encoded
        if isinstance(payload, str):
            payload = payload.encode(encoding or "utf-8")
        return content_type, payload

    def loads(self, content_type: str, payload: bytes) -> Any:
        """Decode what :meth:`dumps` produced (under any serializer of the same name)."""
        try:
            return loads(payload, content_type, "utf-8", accept={content_type})
        except DecodeError:
            # Binary serializers (pickle, msgpack) are stored as raw bytes.
            return loads(payload, content_type, "binary", accept={content_type})


def encode_error(exc: BaseException) -> ErrorInfo:
    """Describe ``exc`` as JSON-able data, keeping its traceback as text."""
    if isinstance(exc, ActivityError):
        # Re-raised from a step: keep describing the original, not the wrapper.
        return {
            "type": exc.exc_type,
            "module": exc.exc_module,
            "message": exc.exc_message,
            "args": [exc.exc_message],
            "traceback": exc.remote_traceback,
        }
    if isinstance(exc, UnpickleableExceptionWrapper):
        # Celery swaps an exception it cannot pickle for this wrapper before the
        # task_failure signal sees it; describe the original, not the wrapper.
        return {
            "type": exc.exc_cls_name,
            "module": exc.exc_module,
            "message": str(Exception(*(exc.exc_args or ()))),
            "args": _jsonable_args(exc.exc_args or (), str(exc)),
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
        }
    exc_type = type(exc)
    return {
        "type": exc_type.__qualname__,
        "module": exc_type.__module__,
        "message": str(exc),
        "args": _jsonable_args(exc.args, str(exc)),
        "traceback": "".join(traceback.format_exception(exc_type, exc, exc.__traceback__)),
    }


def _jsonable_args(args: Any, fallback: str) -> list[Any]:
    try:
        json.dumps(list(args))
    except (TypeError, ValueError):
        return [fallback]
    return list(args)


def decode_error(info: ErrorInfo) -> BaseException:
    """Rebuild the exception :func:`encode_error` described.

    Returns the original exception type where it is importable here and can be built
    from its arguments, otherwise an :class:`ActivityError` carrying type, message and
    traceback.
    """
    module = str(info.get("module", ""))
    qualname = str(info.get("type", "Exception"))
    message = str(info.get("message", ""))
    remote_tb = str(info.get("traceback", ""))
    cls: Any = sys.modules.get(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
        try:
            exc = cls(*info.get("args", [message]))
        except Exception:
            pass
        else:
            if remote_tb and hasattr(exc, "add_note"):
                exc.add_note(f"Raised remotely:\n{remote_tb.rstrip()}")
            return exc
    return ActivityError(qualname, module, message, remote_tb)
