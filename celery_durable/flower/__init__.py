"""A **Workflows** tab and a ``/api/durable`` JSON API inside Flower.

Flower has no plugin API: :func:`install` adds handlers to the list Flower builds its
``tornado.web.Application`` from (``flower.urls.handlers``) and a template loader that
finds these pages' templates next to Flower's, before the application is created. It is
what ``celery -A proj durable flower`` calls; an existing ``celery flower`` deployment
calls it from ``flowerconfig.py``, which Flower executes before starting::

    import celery_durable.flower; celery_durable.flower.install()

Two of Flower's own routes get a handler in front of them that defers to Flower's:
``/task/<id>`` sends a run's id (the Celery ``root_id`` of the run's messages) to the
run's page, and ``/metrics`` adds the workflow series of ``_metrics``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from flower import urls
from tornado.template import BaseLoader, Loader, Template
from tornado.web import url

from ._handlers import (
    ACTION_PATTERN,
    MetricsView,
    RunActionApi,
    RunActionView,
    RunApi,
    RunListApi,
    RunsView,
    RunView,
    TaskOrRunView,
)

__all__ = ["handlers", "install"]

_OWN = Path(__file__).parent / "templates"
_TAB = (
    '        <li class="nav-item">\n'
    "          <a class=\"nav-link{% if active_tab == 'workflows' %} active{% end %}\"\n"
    "            href=\"{{ reverse_url('durable-workflows') }}\">Workflows</a>\n"
    "        </li>\n"
)


class DurableLoader(Loader):
    """Flower's templates, plus ours, plus a Workflows tab in Flower's navigation bar."""

    def _create_template(self, name: str) -> Template:
        own = _OWN / name
        if own.is_file():
            return Template(own.read_text(), name=name, loader=self)
        template = super()._create_template(name)
        if name == "navbar.html":
            text = (Path(self.root) / name).read_text()
            # After Flower's last tab, Broker (2.0 and 2.2 both end their tabs with it);
            # a navigation bar that looks different stays as it is (/workflows works).
            at = text.find("reverse_url('broker')")
            end = text.find("</li>", at) if at >= 0 else -1
            if end >= 0:
                end += len("</li>")
                return Template(text[:end] + "\n" + _TAB + text[end:], name=name, loader=self)
        return template


def handlers() -> list[Any]:
    """The Tornado routes of the Workflows tab and the JSON API (ids may contain ``/``)."""
    return [
        url(r"/workflows", RunsView, name="durable-workflows"),
        url(rf"/workflows/(.+)/{ACTION_PATTERN}", RunActionView),
        url(r"/workflows/(.+)", RunView, name="durable-run"),
        (r"/api/durable/runs", RunListApi),
        (rf"/api/durable/runs/(.+)/{ACTION_PATTERN}", RunActionApi),
        (r"/api/durable/runs/(.+)", RunApi),
    ]


#: Routes of Flower's that ours take the place of (ours come first and defer to Flower's).
_IN_PLACE_OF = {r"/task/(.+)": TaskOrRunView, r"/metrics": MetricsView}


def _pattern(route: Any) -> str:
    # A URLSpec anchors its pattern with "$"; a plain tuple keeps it as written.
    pattern = route.regex.pattern if hasattr(route, "regex") else route[0]
    return str(pattern).removesuffix("$")


def install() -> None:
    """Add the Workflows tab to the Flower application about to be created; idempotent.

    Also puts ``/task/<run id>`` (to the run's page) and ``/metrics`` (with workflow
    series) in front of Flower's own routes of those paths, when Flower has them.
    """
    if any(getattr(h, "name", None) == "durable-workflows" for h in urls.handlers):
        return
    # Before Flower's catch-all 404 route, which is last.
    at = len(urls.handlers) - 1 if urls.handlers else 0
    urls.handlers[at:at] = handlers()
    for pattern, handler in _IN_PLACE_OF.items():
        flowers = [i for i, route in enumerate(urls.handlers) if _pattern(route) == pattern]
        if flowers:
            urls.handlers.insert(flowers[0], (pattern, handler))
    loader: BaseLoader = DurableLoader(os.fspath(urls.settings["template_path"]))
    urls.settings["template_loader"] = loader
