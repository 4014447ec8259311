"""``celery_durable.flower.install``: routes before Flower's 404, once; ``/task/<id>`` and
``/metrics`` in front of Flower's own; the tab in the bar."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flower import urls
from tornado.web import URLSpec

import celery_durable.flower as durable_flower


@pytest.fixture
def pristine() -> Iterator[None]:
    handlers, settings = list(urls.handlers), dict(urls.settings)
    yield
    urls.handlers[:] = handlers
    urls.settings.clear()
    urls.settings.update(settings)


def _pattern(handler: Any) -> str:
    # A URLSpec anchors its pattern with "$"; a plain tuple keeps it as written.
    return str(handler.regex.pattern if isinstance(handler, URLSpec) else handler[0]).rstrip("$")


def test_install_adds_the_routes_before_the_catch_all_once(pristine: None) -> None:
    before = len(urls.handlers)
    durable_flower.install()
    durable_flower.install()
    patterns = [_pattern(h) for h in urls.handlers]
    assert len(patterns) == before + len(durable_flower.handlers()) + 2
    assert patterns[-1] == ".*"
    assert patterns.index("/workflows") < patterns.index("/workflows/(.+)")
    assert patterns.index("/api/durable/runs/(.+)/(signal|cancel|terminate|retry)") < (
        patterns.index("/api/durable/runs/(.+)")
    )


def test_task_pages_and_metrics_go_through_ours_first(pristine: None) -> None:
    durable_flower.install()
    for pattern, ours in (("/task/(.+)", "TaskOrRunView"), ("/metrics", "MetricsView")):
        routes = [h for h in urls.handlers if _pattern(h) == pattern]
        assert len(routes) == 2, pattern
        first, flowers = (r.handler_class if isinstance(r, URLSpec) else r[1] for r in routes)
        assert first.__name__ == ours and issubclass(first, flowers)
    # Flower's templates still link to Flower's route by name: reverse_url("task", ...).
    named = [h for h in urls.handlers if getattr(h, "name", None) == "task"]
    assert len(named) == 1


def test_the_navigation_bar_gets_a_workflows_tab(pristine: None) -> None:
    durable_flower.install()
    loader = urls.settings["template_loader"]
    navbar = loader.load("navbar.html").code
    assert navbar.count("durable-workflows") == 1
    assert navbar.index("reverse_url('broker')") < navbar.index("durable-workflows")
    assert "durable_run.html" in str(loader.load("durable_run.html").name)
