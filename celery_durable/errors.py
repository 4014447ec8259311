"""The exceptions celery_durable raises, one tree under :class:`DurableError`.

Every message names the workflow run (and the step, where there is one) and says what
to do about it. Errors keep their arguments in ``args`` so they pickle and cross
process boundaries intact.
"""

from __future__ import annotations

__all__ = [
    "ActivityError",
    "ActivityTimeoutError",
    "ContentDisallowedError",
    "DurableError",
    "HistoryWriteError",
    "NonDeterminismError",
    "NotInWorkflowError",
    "SignalError",
    "StepLostError",
    "StoreUnavailableError",
    "UnknownWorkflowError",
    "WorkflowArgumentsError",
    "WorkflowAwaitError",
    "WorkflowCancelledError",
    "WorkflowEncodeError",
    "WorkflowFailedError",
    "WorkflowIdError",
    "WorkflowNotFoundError",
    "WorkflowTerminatedError",
    "WorkflowTimeoutError",
]


class DurableError(Exception):
    """Base class of every error raised by celery_durable."""


class NotInWorkflowError(DurableError, RuntimeError):
    """A workflow-only helper was used outside a running workflow."""


class WorkflowArgumentsError(DurableError, TypeError):
    """A run's arguments do not fit its workflow function's signature."""


class WorkflowAwaitError(DurableError, TypeError):
    """A workflow awaited something that is not a durable operation."""


class WorkflowEncodeError(DurableError, TypeError):
    """Arguments or a result could not be encoded by the configured serializer."""


class WorkflowIdError(DurableError, ValueError):
    """A workflow id the store cannot keep: not a string, empty, too long, or containing
    the ``/`` that only child runs' ids use."""


class ContentDisallowedError(DurableError):
    """A stored value's content type is not one the app accepts (``accept_content``, or
    ``result_accept_content`` for results), so it was not decoded: decoding a pickle, for
    one, runs code. A driver parks the run as ``STUCK`` with this error."""


class UnknownWorkflowError(DurableError, LookupError):
    """No workflow of that name is registered in this process."""


class WorkflowNotFoundError(DurableError, LookupError):
    """No run with that workflow id exists in the store."""


class StoreUnavailableError(DurableError, ConnectionError):
    """The workflow store (database) could not be reached."""


class WorkflowTimeoutError(DurableError, TimeoutError):
    """Waiting for a workflow's result took longer than the timeout given."""


class NonDeterminismError(DurableError):
    """Replaying a run scheduled something different from what its history recorded.

    The run is parked as ``STUCK`` with its history intact; deploy code that schedules
    the same steps in the same order (or version the change) and retry it.
    """


class ActivityError(DurableError):
    """An activity failed with an exception that cannot be rebuilt in this process.

    Attributes:
        exc_type: qualified name of the original exception type.
        exc_module: module the original exception type lives in.
        exc_message: ``str()`` of the original exception.
        remote_traceback: the traceback text captured where it was raised.
    """

    def __init__(
        self, exc_type: str, exc_module: str, exc_message: str, remote_traceback: str = ""
    ) -> None:
        super().__init__(exc_type, exc_module, exc_message, remote_traceback)
        self.exc_type = exc_type
        self.exc_module = exc_module
        self.exc_message = exc_message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        return f"{self.exc_module}.{self.exc_type}: {self.exc_message}"


class WorkflowFailedError(DurableError):
    """A workflow failed with an exception that cannot be rebuilt in this process."""


class ActivityTimeoutError(DurableError, TimeoutError):
    """An activity run through ``workflow.execute`` exceeded one of its timeouts."""


class WorkflowCancelledError(DurableError):
    """The run was cancelled (``handle.cancel()``) and ended without a result."""


class WorkflowTerminatedError(DurableError):
    """The run was terminated (``handle.terminate(reason)``) without running its code."""


class SignalError(DurableError):
    """A signal could not be delivered: the run is finished or does not exist."""


class HistoryWriteError(DurableError):
    """The store refused to record a turn (a constraint or a value it cannot hold).

    Retrying the same turn would fail the same way, so the run is parked as ``STUCK``.
    """


class StepLostError(DurableError):
    """A step's worker was lost more times than ``durable_max_redeliveries`` allows.

    Raised at the step's ``await``: the task probably kills the process running it (an
    ``os._exit``, a segfault, the OOM killer). The workflow may catch it; otherwise the
    run fails with its history kept, and ``retry()`` runs the step again.
    """
