"""Encoding of workflow inputs, results and errors for the store.

Values go through kombu's serializers (the app's ``task_serializer``, JSON by default),
exactly as Celery encodes task arguments, so whatever a task can take a workflow can
take. Exceptions are stored as plain data (type, module, arguments, traceback) and rebuilt
the way Celery's result backends rebuild them: only from exception classes already
imported in this process, never by importing a module named in stored data, and only
as :class:`Exception` subclasses.

Decoding trusts the app's settings, never the content type stored beside a payload: a
row saying ``application/x-python-serialize`` is unpickled only where the app accepts
pickle (``accept_content``, or ``result_accept_content`` for a run's result), since
unpickling runs code. JSON, which decodes to data only, is always accepted: the library
writes its own markers (a timer's empty input) in it.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from celery.utils.serialization import UnpickleableExceptionWrapper
from kombu.exceptions import DecodeError, EncodeError
from kombu.serialization import (  # type: ignore[attr-defined]
    dumps,
    loads,
    prepare_accept_content,
    registry,
)

from .errors import ActivityError, ContentDisallowedError, WorkflowEncodeError
from .store import ErrorInfo

__all__ = ["Codec", "ErrorInfo", "accepted_types", "decode_error", "encode_error"]

#: Always accepted: JSON decodes to data only, and the library writes markers in it.
_JSON = "application/json"

#: Exceptions that steer Python itself; a stored error never becomes one of them.
_CONTROL_FLOW = (StopIteration, StopAsyncIteration)


def accepted_types(names: Iterable[str] | None, serializer: str = "json") -> frozenset[str]:
    """The content types a setting like ``accept_content`` names (serializer names or
    content types), plus JSON; ``None``: the serializer's own."""
    if names is None:
        names = [serializer]
    return frozenset(prepare_accept_content(list(names)) or ()) | {_JSON}


@dataclass(frozen=True)
class Codec:
    """Turns Python values into ``(content_type, bytes)`` and back with one serializer.

    Args:
        serializer: the kombu serializer that encodes (the app's ``task_serializer``).
        accept: the content types decoded for inputs, step outcomes and signals (from
            ``accept_content``); anything else is refused, never decoded.
        result_accept: the content types decoded for a run's result (from
            ``result_accept_content``, falling back to ``accept_content``).
        accept_setting, result_setting: how errors name the settings.
    """

    serializer: str = "json"
    accept: frozenset[str] = field(default_factory=lambda: accepted_types(None))
    result_accept: frozenset[str] = field(default_factory=lambda: accepted_types(None))
    accept_setting: str = "accept_content"
    result_setting: str = "result_accept_content"

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

    def loads(
        self, content_type: str, payload: bytes, what: str = "a stored value", result: bool = False
    ) -> Any:
        """Decode what :meth:`dumps` produced, if the app accepts its content type.

        ``what`` names the value (and its run) for the error; ``result``: it is a run's
        result, checked against ``result_accept_content``.

        Raises:
            ContentDisallowedError: the app does not accept ``content_type``; nothing
                was decoded.
        """
        accept, setting = (
            (self.result_accept, self.result_setting)
            if result
            else (self.accept, self.accept_setting)
        )
        if content_type not in accept:
            name = registry.type_to_name.get(content_type, content_type)
            raise ContentDisallowedError(
                f"{what} is stored as {content_type!r} ({name}), which app.conf.{setting} "
                f"does not accept ({', '.join(sorted(accept))}); it was not decoded, since "
                f"decoding it could run code. If this app wrote it, add {name!r} to "
                f"app.conf.{setting}; otherwise terminate the run."
            )
        try:
            return loads(payload, content_type, "utf-8", accept=accept)
        except DecodeError:
            # Binary serializers (pickle, msgpack) are stored as raw bytes.
            return loads(payload, content_type, "binary", accept=accept)


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

    Returns the original exception type where it is already imported here, is an
    :class:`Exception` (never ``SystemExit``, ``KeyboardInterrupt``, ``GeneratorExit``,
    ``asyncio.CancelledError`` or the library's own control flow, all BaseExceptions,
    nor ``StopIteration``) and can be built from its arguments; otherwise an
    :class:`ActivityError` carrying type, message and traceback.
    """
    module = str(info.get("module", ""))
    qualname = str(info.get("type", "Exception"))
    message = str(info.get("message", ""))
    remote_tb = str(info.get("traceback", ""))
    cls: Any = sys.modules.get(module)
    for part in qualname.split("."):
        cls = getattr(cls, part, None)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, _CONTROL_FLOW):
        try:
            exc = cls(*info.get("args", [message]))
        except Exception:
            pass
        else:
            if remote_tb and hasattr(exc, "add_note"):
                exc.add_note(f"Raised remotely:\n{remote_tb.rstrip()}")
            return exc
    return ActivityError(qualname, module, message, remote_tb)
