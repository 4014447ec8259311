"""``@durable_workflow``: turning an ``async def`` into a workflow and its driver task."""

from __future__ import annotations

import inspect
import uuid
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar, overload

from celery import Celery, Task, current_app

# _get_active_apps is private in Celery (so celery-types lacks it), but it is the only way
# to reach the apps finalized before the decorator ran.
from celery._state import (  # type: ignore[attr-defined]
    _get_active_apps,
    connect_on_app_finalize,
)
from celery.canvas import Signature
from celery.utils.imports import gen_task_name

from .driver import check_workflow_id, create_run, driver_options, on_driver_message
from .errors import UnknownWorkflowError, WorkflowArgumentsError
from .worker import DRIVER_OPTION_KEYS, publish_wake

if TYPE_CHECKING:
    from .client import WorkflowHandle

__all__ = ["DurableWorkflow", "durable_workflow", "registry", "start_workflow"]

P = ParamSpec("P")
R = TypeVar("R")

#: Every workflow defined in this process, by name.
registry: dict[str, DurableWorkflow[Any, Any]] = {}


class DriverTask(Task[Any, Any]):
    """Base of every workflow's Celery task: starting it starts a run; running it drives one.

    ``apply_async`` (and so ``delay`` and signatures) starts the run in the calling
    process. A process without the workflow's code can only send the task by name
    (``app.send_task``, Celery beat); the worker then starts the run from that message
    (see ``driver._start``).
    """

    durable: DurableWorkflow[Any, Any]
    # A turn is short and safe to repeat; Celery's own retry machinery is not used.
    max_retries = 0

    def apply_async(  # type: ignore[override]
        self,
        args: Any = None,
        kwargs: Any = None,
        task_id: str | None = None,
        **options: Any,
    ) -> WorkflowHandle[Any]:
        # Reached through signatures: checkout.s(...).delay() starts a run like .delay().
        workflow_id = options.pop("workflow_id", None)
        if workflow_id is None:
            workflow_id = task_id
        return start_workflow(
            self.app, self.durable, args or (), kwargs or {}, workflow_id=workflow_id, **options
        )


class DurableWorkflow(Generic[P, R]):
    """A workflow: an ``async def`` whose awaits are durable steps. Made by
    :func:`durable_workflow`; start runs with :meth:`delay` or :meth:`apply_async`."""

    def __init__(
        self,
        fn: Callable[P, Coroutine[Any, Any, R]],
        name: str | None = None,
        **options: Any,
    ) -> None:
        if not inspect.iscoroutinefunction(fn):
            raise TypeError(
                f"@durable_workflow needs an `async def`, but {fn.__qualname__} is a plain "
                "function. Write `async def " + fn.__name__ + "(...)` and await your tasks' "
                "signatures inside it (`await task.s(...)`)."
            )
        self.fn = fn
        self._name = name
        self.options = options
        self.__doc__ = fn.__doc__
        self.__wrapped__ = fn
        connect_on_app_finalize(self._install)
        for app in list(_get_active_apps()):
            if app.finalized:
                self._install(app)

    # -- registration ---------------------------------------------------------------------

    @property
    def name(self) -> str:
        """The Celery task name of this workflow's driver (stable across processes)."""
        if self._name is None:
            self._name = gen_task_name(current_app, self.fn.__name__, self.fn.__module__)
        return self._name

    def _install(self, app: Celery) -> Task[Any, Any]:
        name = self._name or gen_task_name(app, self.fn.__name__, self.fn.__module__)
        self._name = name
        registry[name] = self
        if name in app.tasks:
            return app.tasks[name]
        durable = self

        # Positional-only, so that a start request's keyword argument named "task" is the
        # workflow's. A wake carries the run id as its one argument; any other message is
        # a start request from a sender that knows only the name (see driver._start).
        def run(task: DriverTask, /, *args: Any, **kwargs: Any) -> str | None:
            return on_driver_message(
                task.app, task.name, durable.fn, task.request, args, kwargs, durable.options
            )

        run.__name__ = self.fn.__name__
        run.__qualname__ = self.fn.__qualname__
        run.__module__ = self.fn.__module__
        run.__doc__ = self.fn.__doc__
        # Routing (queue, routing_key...) is kept with each run and applied to every wake
        # message; as task attributes Celery deprecates them.
        task_options = {
            k: v
            for k, v in self.options.items()
            if k != "workflow_id" and k not in DRIVER_OPTION_KEYS
        }
        make_task: Callable[[Callable[..., str | None]], DriverTask] = app.task(
            name=name, bind=True, base=DriverTask, shared=False, lazy=False, **task_options
        )
        task = make_task(run)
        task.durable = self
        return task

    def task_for(self, app: Celery | None = None) -> Task[Any, Any]:
        """This workflow's driver task on ``app`` (the current app by default)."""
        app = app or current_app
        name = self._name or gen_task_name(app, self.fn.__name__, self.fn.__module__)
        return app.tasks[name] if name in app.tasks else self._install(app)

    # -- starting runs ---------------------------------------------------------------------

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> WorkflowHandle[R]:
        """Start a run with these arguments; returns its handle at once."""
        return start_workflow(current_app, self, args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        workflow_id: str | None = None,
        app: Celery | None = None,
        **options: Any,
    ) -> WorkflowHandle[R]:
        """Start a run, like ``Task.apply_async``.

        Args:
            args: positional arguments of the workflow.
            kwargs: keyword arguments of the workflow.
            workflow_id: the run's id. Starting again with an id that exists returns the
                existing run instead of starting a second one.
            app: the Celery app (default: the current app).
            **options: routing of the driver (``queue``, ``routing_key``, ``priority``).
        """
        return start_workflow(
            app or current_app, self, args or (), kwargs or {}, workflow_id=workflow_id, **options
        )

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature of this workflow (``.delay()`` on it starts a run)."""
        return Signature(self.name, args, kwargs, app=current_app)

    def signature(
        self,
        args: tuple[Any, ...] | None = None,
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Signature:
        """Like ``Task.signature``."""
        return Signature(self.name, args or (), kwargs or {}, options=options, app=current_app)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(
            f"{self.name} is a durable workflow and is not called directly: start a run with "
            f"{self.fn.__name__}.delay(...) or .apply_async(...); in a unit test, run the "
            f"plain coroutine with {self.fn.__name__}.fn(...)"
        )

    def __repr__(self) -> str:
        return f"<durable workflow {self.name}>"


@overload
def durable_workflow(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> DurableWorkflow[P, R]: ...


@overload
def durable_workflow(
    *, name: str | None = None, queue: str | None = None, **options: Any
) -> Callable[[Callable[P, Coroutine[Any, Any, R]]], DurableWorkflow[P, R]]: ...


def durable_workflow(
    fn: Callable[P, Coroutine[Any, Any, R]] | None = None,
    *,
    name: str | None = None,
    queue: str | None = None,
    **options: Any,
) -> Any:
    """Declare a durable workflow, on every Celery app, the way ``@shared_task`` does.

    Works bare (``@durable_workflow``) and with options
    (``@durable_workflow(name="shop.checkout", queue="workflows")``). Options other than
    ``name`` are Celery task options of the driver task (``queue``, ``routing_key``...).

    Example::

        @durable_workflow
        async def checkout(order_id: str) -> str:
            return await charge.s(order_id, 1999)

        handle = checkout.delay("o-1")
        handle.get(timeout=30)

    Raises:
        TypeError: the decorated function is not an ``async def``.
    """
    if queue is not None:
        options["queue"] = queue

    def wrap(f: Callable[P, Coroutine[Any, Any, R]]) -> DurableWorkflow[P, R]:
        return DurableWorkflow(f, name=name, **options)

    if fn is None:
        return wrap
    if not callable(fn):
        raise TypeError(f"@durable_workflow takes a function or keyword options, got {fn!r}")
    return wrap(fn)


def start_workflow(
    app: Celery,
    definition: DurableWorkflow[Any, Any],
    args: Any,
    kwargs: Any,
    workflow_id: str | None = None,
    **options: Any,
) -> WorkflowHandle[Any]:
    """Create a run of ``definition`` (unless ``workflow_id`` exists) and wake it.

    Raises:
        WorkflowIdError: ``workflow_id`` is one the store cannot keep (not a string,
            empty, longer than 255 characters, or containing ``/``).
        WorkflowArgumentsError: the arguments do not fit the workflow function.
        WorkflowEncodeError: the serializer cannot encode them.
        DurableError: ``workflow_id`` belongs to a run of another workflow.
    """
    from .client import WorkflowHandle, bound_app

    # The handle reads the run through this very app, whichever thread uses it later.
    app = bound_app(app)
    name = definition.task_for(app).name
    if workflow_id is not None:
        check_workflow_id(workflow_id, name)
    label = f"workflow {name}[{workflow_id or 'new'}]"
    try:
        inspect.signature(definition.fn).bind(*args, **kwargs)
    except TypeError as exc:
        raise WorkflowArgumentsError(
            f"{label}: the arguments do not match {definition.fn.__name__}: {exc}"
        ) from None
    run_id = str(uuid.uuid4()) if workflow_id is None else workflow_id
    options = driver_options({**definition.options, **options})
    if create_run(app, name, run_id, args, kwargs, options):
        publish_wake(app, name, run_id, options)
    return WorkflowHandle(run_id, app=app)


def start_by_name(
    app: Celery, name: str, args: Any = (), kwargs: Any = None, workflow_id: str | None = None
) -> WorkflowHandle[Any]:
    """Start a run of the workflow registered as ``name`` in this process."""
    task = app.tasks.get(name)  # finalizes the app, which registers its workflows
    definition = getattr(task, "durable", None) or registry.get(name)
    if definition is None:
        known = ", ".join(sorted(registry)) or "none"
        raise UnknownWorkflowError(
            f"no workflow named {name!r} is registered in this process (known: {known}); "
            "import the module that defines it, or check the name"
        )
    return start_workflow(app, definition, args, kwargs or {}, workflow_id=workflow_id)
