"""Tornado handlers of the Workflows tab and the ``/api/durable`` JSON API.

They subclass Flower's own ``BaseHandler`` / ``BaseApiHandler``, so Flower's
authentication (``--basic_auth``, ``--auth``), its cross-site checks and its
``--url_prefix`` apply to them as to Flower's pages. Two of them take the place of
Flower's own routes and defer to Flower's handlers: ``/task/<id>`` (a run id opens the
run's page) and ``/metrics`` (with the workflow series).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar
from urllib.parse import urlparse

import tornado.web
from flower.api import BaseApiHandler
from flower.views import BaseHandler
from flower.views.monitor import Metrics
from flower.views.tasks import TaskView
from tornado import web
from tornado.ioloop import IOLoop

from ..errors import DurableError, StoreUnavailableError, WorkflowNotFoundError
from ._metrics import metrics_for
from ._present import ACTIONS, STATUSES, act, is_run, run_detail, run_page, short, timeline

__all__ = [
    "MetricsView",
    "RunActionApi",
    "RunActionView",
    "RunApi",
    "RunListApi",
    "RunView",
    "RunsView",
    "TaskOrRunView",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Seconds ``/task/<id>`` waits for the store to say whether the id is a run's.
RUN_LOOKUP_LIMIT = 2.0


def _read_only(handler: tornado.web.RequestHandler) -> bool:
    # ``--read_only`` exists from Flower 2.1 on; older versions have no such mode.
    return bool(getattr(handler.application.options, "read_only", False))  # type: ignore[attr-defined]


def _when(iso: str | None) -> str:
    """An ISO time of the API as the pages show it: to the second, in the server's zone."""
    return "-" if not iso else iso[:19].replace("T", " ")


def _refuse_cross_site(handler: tornado.web.RequestHandler) -> None:
    """403 for a request another site's page made, as Flower 2.1+ refuses its own.

    Flower 2.0 has no such check; a browser's cached basic-auth credentials would
    otherwise let any page post actions. Clients such as curl send neither header.
    """
    site = handler.request.headers.get("Sec-Fetch-Site")
    origin = handler.request.headers.get("Origin")
    if site and site not in ("same-origin", "none"):
        raise web.HTTPError(403, "Cross-site request forbidden")
    if not site and origin and urlparse(origin).netloc != handler.request.host:
        raise web.HTTPError(403, "Cross-origin request forbidden")


async def _blocking(call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a store call off the IO loop: Flower keeps serving meanwhile."""
    return await IOLoop.current().run_in_executor(None, partial(call, *args, **kwargs))


async def _flowers_own(shown: Any) -> None:
    """Finish a call of Flower's own handler method, sync or async by version."""
    if inspect.isawaitable(shown):
        await shown


def _int(handler: tornado.web.RequestHandler, name: str, default: int) -> int:
    raw = handler.get_query_argument(name, str(default))
    try:
        return int(raw)
    except ValueError as exc:
        raise web.HTTPError(400, f"{name} must be a whole number, not {raw!r}") from exc


def _filters(handler: tornado.web.RequestHandler) -> dict[str, Any]:
    def text(name: str) -> str | None:
        return handler.get_query_argument(name, "").strip() or None

    return {
        "status": text("status"),
        "workflow": text("workflow"),
        "search": text("search"),
        "offset": _int(handler, "offset", 0),
        "limit": _int(handler, "limit", 50),
    }


class _Page(BaseHandler):  # type: ignore[misc]
    """A Workflows page: Flower's layout, the store's data."""

    def check_xsrf_cookie(self) -> None:
        # Stricter than Flower's own (which checks the token only with OAuth): our forms
        # always carry the token, so it is checked with any authentication or none.
        _refuse_cross_site(self)
        tornado.web.RequestHandler.check_xsrf_cookie(self)

    def show_error(self, status: int, message: str) -> None:
        """Flower's error page with ``message`` (escaped by the template)."""
        self.set_status(status)
        self.render("404.html", message=message)


class RunsView(_Page):
    """``/workflows``: runs newest first, counts per status, filters and paging."""

    @web.authenticated
    async def get(self) -> None:
        filters = _filters(self)
        try:
            page = await _blocking(run_page, self.application.capp, **filters)
            error = None
        except StoreUnavailableError as exc:
            self.set_status(503)
            page, error = {"runs": [], "counts": {}, "total": 0, **filters}, str(exc)
        self.render(
            "durable_runs.html",
            page=page,
            filters=filters,
            statuses=sorted(set(STATUSES) | set(page["counts"])),
            error=error,
            when=_when,
        )


class RunView(_Page):
    """``/workflows/<id>``: one run, its steps, and the action buttons."""

    @web.authenticated
    async def get(self, run_id: str) -> None:
        await self.show(run_id)

    async def show(self, run_id: str, message: str | None = None, failed: bool = False) -> None:
        """Render the run's page, with the outcome of an action if there was one."""
        try:
            run = await _blocking(run_detail, self.application.capp, run_id)
        except WorkflowNotFoundError as exc:
            self.show_error(404, str(exc))
            return
        except StoreUnavailableError as exc:
            self.show_error(503, f"the store cannot be reached: {exc}")
            return
        self.render(
            "durable_run.html",
            run=run,
            short=short,
            json_text=lambda v: json.dumps(v, indent=2, default=str),
            message=message,
            failed=failed,
            read_only=_read_only(self),
            when=_when,
            timeline=timeline,
        )


class RunActionView(RunView):
    """``POST /workflows/<id>/<action>``: the form buttons of the run page."""

    @web.authenticated
    async def post(self, run_id: str, action: str) -> None:
        if not self.settings.get("xsrf_cookies"):
            # Flower 2.0 does not turn on Tornado's check; the form carries the token.
            self.check_xsrf_cookie()
        if _read_only(self):
            raise web.HTTPError(403, "Read only mode is enabled")
        fields: dict[str, Any] = {
            "name": self.get_body_argument("name", ""),
            "reason": self.get_body_argument("reason", ""),
        }
        message, failed = "", False
        try:
            raw = self.get_body_argument("payload", "") or "null"
            try:
                fields["payload"] = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the payload must be JSON: {exc}") from exc
            message = await _blocking(act, self.application.capp, run_id, action, fields)
        except (DurableError, ValueError) as exc:
            message, failed = str(exc), True
            self.set_status(404 if isinstance(exc, WorkflowNotFoundError) else 409)
        await self.show(run_id, message, failed)


class TaskOrRunView(TaskView):  # type: ignore[misc]
    """Flower's ``/task/<id>``, except that the id of a run redirects to the run's page.

    A run's id is the Celery ``root_id`` and ``parent_id`` of its messages, so Flower's
    root and parent links lead here. Any other id, and any id while the store does not
    answer within :data:`RUN_LOOKUP_LIMIT`, gets Flower's own task page.
    """

    @web.authenticated
    async def get(self, task_id: str) -> None:
        try:
            run = await asyncio.wait_for(
                _blocking(is_run, self.application.capp, task_id), RUN_LOOKUP_LIMIT
            )
        except Exception as exc:
            logger.debug("/task/%s: the store did not say if it is a run: %s", task_id, exc)
            run = False
        if run:
            self.redirect(self.reverse_url("durable-run", task_id))
            return
        await _flowers_own(TaskView.get(self, task_id))


class MetricsView(Metrics):  # type: ignore[misc]
    """Flower's ``/metrics`` with the workflow series (see ``_metrics``); like Flower's
    own, it needs no login."""

    async def get(self) -> None:
        # Off the IO loop: the refresh may wait (briefly) for the store.
        await _blocking(metrics_for(self.application.capp).refresh)
        await _flowers_own(Metrics.get(self))


class _Api(BaseApiHandler):  # type: ignore[misc]
    """JSON in and out; errors are ``{"error": ...}`` with the CLI's wording."""

    def fail(self, status: int, message: str) -> None:
        """Answer with an error."""
        self.set_status(status)
        self.finish({"error": message})

    async def guarded(self, call: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Answer with what ``call`` returns, or the error it raises."""
        try:
            self.finish(await _blocking(call, self.application.capp, *args, **kwargs))
        except WorkflowNotFoundError as exc:
            self.fail(404, str(exc))
        except StoreUnavailableError as exc:
            self.fail(503, str(exc))
        except (DurableError, ValueError) as exc:
            self.fail(409, str(exc))


class RunListApi(_Api):
    """``GET /api/durable/runs``: a page of runs, same filters as the tab."""

    @web.authenticated
    async def get(self) -> None:
        await self.guarded(run_page, **_filters(self))


class RunApi(_Api):
    """``GET /api/durable/runs/<id>``: one run with its steps."""

    @web.authenticated
    async def get(self, run_id: str) -> None:
        await self.guarded(run_detail, run_id)


class RunActionApi(_Api):
    """``POST /api/durable/runs/<id>/{signal,cancel,terminate,retry}`` with a JSON body."""

    @web.authenticated
    async def post(self, run_id: str, action: str) -> None:
        _refuse_cross_site(self)
        session = self.application.options.auth and not self.request.headers.get("Authorization")
        if session and not self.settings.get("xsrf_cookies"):
            # Flower 2.1+ wants the XSRF token from an OAuth cookie session (a client with
            # a token of its own needs none); Flower 2.0 checks nothing, this API does.
            tornado.web.RequestHandler.check_xsrf_cookie(self)
        if _read_only(self):
            raise web.HTTPError(403, "Read only mode is enabled")
        try:
            body = json.loads(self.request.body or b"{}")
        except json.JSONDecodeError as exc:
            self.fail(400, f"the body must be JSON: {exc}")
            return
        if not isinstance(body, dict):
            self.fail(400, "the body must be a JSON object")
            return

        def do(app: Any) -> dict[str, str]:
            return {"message": act(app, run_id, action, body)}

        await self.guarded(do)


ACTION_PATTERN = "(" + "|".join(ACTIONS) + ")"
