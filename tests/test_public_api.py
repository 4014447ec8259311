"""The public surface: exactly these names, each documented."""

from __future__ import annotations

import inspect
import pickle
from types import ModuleType
from typing import Any

import pytest

import celery_durable
from celery_durable import client, errors, testing, workflow

EXPORTS = [
    "ActivityError",
    "ActivityTimeoutError",
    "ContentDisallowedError",
    "DurableError",
    "DurableWorkflow",
    "HistoryWriteError",
    "NonDeterminismError",
    "NotInWorkflowError",
    "RetryPolicy",
    "SignalError",
    "StepInfo",
    "StepLostError",
    "StoreUnavailableError",
    "UnknownWorkflowError",
    "WorkflowArgumentsError",
    "WorkflowAwaitError",
    "WorkflowCancelledError",
    "WorkflowEncodeError",
    "WorkflowFailedError",
    "WorkflowHandle",
    "WorkflowIdError",
    "WorkflowInfo",
    "WorkflowNotFoundError",
    "WorkflowTerminatedError",
    "WorkflowTimeoutError",
    "durable_workflow",
    "workflow",
]

PUBLIC_MODULES = [celery_durable, workflow, client, errors, testing]


def test_exports_are_pinned() -> None:
    assert celery_durable.__all__ == EXPORTS


def test_every_export_exists() -> None:
    for name in celery_durable.__all__:
        assert hasattr(celery_durable, name), name


def test_workflow_helpers_are_pinned() -> None:
    assert workflow.__all__ == [
        "RetryPolicy",
        "continue_as_new",
        "execute",
        "info",
        "now",
        "patched",
        "random",
        "set_status",
        "sleep",
        "step",
        "uuid4",
        "wait_for_signal",
    ]


def _public(module: ModuleType) -> list[tuple[str, Any]]:
    return [(f"{module.__name__}.{name}", getattr(module, name)) for name in module.__all__]


def _members(cls: type) -> list[tuple[str, Any]]:
    found = []
    for name, member in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(member, property):
            member = member.fget
        if inspect.isfunction(member):
            found.append((f"{cls.__qualname__}.{name}", member))
    return found


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_public_modules_and_names_have_docstrings(module: ModuleType) -> None:
    assert inspect.getdoc(module), module.__name__
    undocumented = []
    for qualname, obj in _public(module):
        if isinstance(obj, ModuleType):
            continue
        own_doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else obj.__doc__
        if not own_doc or not own_doc.strip():
            undocumented.append(qualname)
        if isinstance(obj, type):
            undocumented += [name for name, fn in _members(obj) if not (fn.__doc__ or "").strip()]
    assert undocumented == []


def test_errors_form_one_tree() -> None:
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.DurableError), name


@pytest.mark.parametrize(
    "error",
    [
        errors.NonDeterminismError("workflow w[r]: step 2 changed"),
        errors.ActivityError("KeyError", "builtins", "'k'", "Traceback..."),
        errors.WorkflowNotFoundError("no workflow run with id 'x'"),
        errors.StoreUnavailableError("cannot reach the workflow store"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_survive_pickling(error: errors.DurableError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert vars(copy) == vars(error)


def test_activity_error_reads_like_the_original() -> None:
    error = errors.ActivityError("PaymentDeclined", "shop.tasks", "card expired", "tb")
    assert str(error) == "shop.tasks.PaymentDeclined: card expired"
    assert (error.exc_type, error.exc_module, error.remote_traceback) == (
        "PaymentDeclined",
        "shop.tasks",
        "tb",
    )
