"""Encoding of values and errors for the store."""

from __future__ import annotations

import json
import sys

import pytest
from celery.utils.serialization import UnpickleableExceptionWrapper

from celery_durable._codec import Codec, decode_error, encode_error
from celery_durable.errors import ActivityError, WorkflowEncodeError


class NeedsTwoArguments(Exception):
    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code}: {reason}")


class Outer:
    class Nested(Exception):
        pass


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:
        return caught


def test_values_round_trip_through_the_serializer() -> None:
    codec = Codec("json")
    content_type, payload = codec.dumps({"a": [1, 2.5, None, "é"]}, "the value")
    assert content_type == "application/json"
    assert isinstance(payload, bytes)
    assert codec.loads(content_type, payload) == {"a": [1, 2.5, None, "é"]}


def test_a_value_the_serializer_cannot_take_names_what_it_was() -> None:
    with pytest.raises(WorkflowEncodeError, match="the arguments of workflow w\\[1\\]") as caught:
        Codec("json").dumps([object()], "the arguments of workflow w[1]")
    assert "'json' serializer" in str(caught.value)
    assert isinstance(caught.value, TypeError)


def test_error_info_is_json_and_round_trips_to_the_same_type() -> None:
    info = encode_error(raised(KeyError("sku-1")))
    assert json.loads(json.dumps(info)) == info
    assert (info["type"], info["module"], info["args"]) == ("KeyError", "builtins", ["sku-1"])
    assert "Traceback" in info["traceback"]

    error = decode_error(info)
    assert type(error) is KeyError
    assert error.args == ("sku-1",)
    if sys.version_info >= (3, 11):
        assert any("Raised remotely" in note for note in error.__notes__)


def test_nested_classes_are_found_by_qualified_name() -> None:
    error = decode_error(encode_error(Outer.Nested("deep")))
    assert type(error) is Outer.Nested


def test_arguments_that_are_not_json_become_the_message() -> None:
    info = encode_error(ValueError(object))
    assert info["args"] == [str(ValueError(object))]


def test_an_error_that_cannot_be_rebuilt_becomes_activity_error() -> None:
    error = decode_error(encode_error(raised(NeedsTwoArguments(7, "odd"))))
    assert isinstance(error, ActivityError)
    assert (error.exc_type, error.exc_module, error.exc_message) == (
        "NeedsTwoArguments",
        __name__,
        "7: odd",
    )
    assert "NeedsTwoArguments" in error.remote_traceback
    # Passing it on keeps describing the original, not the wrapper.
    assert encode_error(error)["type"] == "NeedsTwoArguments"


def test_a_type_from_a_module_not_imported_here_is_never_imported() -> None:
    info = {"type": "Boom", "module": "surely_not_imported_module", "message": "m", "args": ["m"]}
    error = decode_error(info)
    assert isinstance(error, ActivityError)
    assert "surely_not_imported_module" not in sys.modules


def test_a_non_exception_named_in_data_is_not_called() -> None:
    error = decode_error({"type": "system", "module": "os", "message": "m", "args": ["echo"]})
    assert isinstance(error, ActivityError)


def test_celerys_unpickleable_wrapper_is_described_as_the_original() -> None:
    wrapper = UnpickleableExceptionWrapper.from_exception(NeedsTwoArguments(7, "odd"))
    info = encode_error(raised(wrapper))
    assert (info["type"], info["module"], info["message"], info["args"]) == (
        "NeedsTwoArguments",
        __name__,
        "7: odd",
        ["7: odd"],
    )
    assert isinstance(decode_error(info), ActivityError)
