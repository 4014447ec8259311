"""Durable workflows for Celery.

Write an ``async def`` beside your tasks, decorate it with :func:`durable_workflow`, and
``await`` your tasks' signatures inside it. Each await is a durable step: the workflow
survives worker kills, broker restarts and deploys, with SQL as the source of truth.
"""

from . import workflow
from ._definition import DurableWorkflow, durable_workflow
from .canvas._await import install as _install_await
from .client import StepInfo, WorkflowHandle
from .errors import (
    ActivityError,
    ActivityTimeoutError,
    ContentDisallowedError,
    DurableError,
    HistoryWriteError,
    NonDeterminismError,
    NotInWorkflowError,
    SignalError,
    StepLostError,
    StoreUnavailableError,
    UnknownWorkflowError,
    WorkflowArgumentsError,
    WorkflowAwaitError,
    WorkflowCancelledError,
    WorkflowEncodeError,
    WorkflowFailedError,
    WorkflowIdError,
    WorkflowNotFoundError,
    WorkflowTerminatedError,
    WorkflowTimeoutError,
)
from .runtime import WorkflowInfo
from .worker import connect as _connect_worker
from .workflow import RetryPolicy

__all__ = [
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

__version__ = "0.1.0"

_install_await()
_connect_worker()
