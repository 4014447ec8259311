"""The Workflows tab in Flower: a real ``celery durable flower`` process, a real worker.

Each test starts Flower with ``celery -A integration_tests.wfapp durable flower`` on a
free port against the test's broker and store, runs workflows on a worker, and checks
the pages and the JSON API over HTTP: lists, filters and paging, the run page, every
action's effect in the store, Flower's basic auth and OAuth sessions, ``--url_prefix``,
404s and escaping; Flower's own task list and ``/metrics`` for runs of a worker started
with ``-E``; and the script that makes the README's screenshots.
"""

from __future__ import annotations

import base64
import contextlib
import http.cookiejar
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tornado.web

from . import wfapp
from .cluster import Cluster
from .services import REDIS_URL, require
from .worker_process import REPO_ROOT

pytestmark = pytest.mark.integration

AUTH = "admin:s3cret"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Flower:
    """A ``celery durable flower`` process and an HTTP client (cookies kept) for it."""

    def __init__(
        self,
        cluster: Cluster,
        log: Path,
        *options: str,
        prefix: str = "",
        command: tuple[str, ...] = ("durable", "flower"),
        env: dict[str, str] | None = None,
    ) -> None:
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}{prefix}"
        self.auth = AUTH
        env = {**os.environ, **cluster.env, **(env or {}), "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        self.log = log
        self._out = log.open("wb")
        argv = [sys.executable, "-m", "celery", "-A", "integration_tests.wfapp", *command]
        self.process = subprocess.Popen(
            [*argv, f"--port={self.port}", "--address=127.0.0.1", *options],
            cwd=REPO_ROOT,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.cookies = http.cookiejar.CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.cookies))
        self.staying = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(self.cookies), _NoRedirect
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                self.request("GET", "/healthcheck")
                return
            except (OSError, urllib.error.URLError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    raise AssertionError(
                        f"Flower did not start:\n{log.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.3)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        auth: str | None = "default",
        follow: bool = True,
    ) -> tuple[int, str]:
        """``(status, body text)``; error statuses are returned, not raised. Without
        ``follow``, a redirect is answered with its status and ``Location`` as the text."""
        request = urllib.request.Request(self.base + path, data=body, method=method)
        credentials = self.auth if auth == "default" else auth
        if credentials:
            token = base64.b64encode(credentials.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        for name, value in (headers or {}).items():
            request.add_header(name, value)
        try:
            with (self.opener if follow else self.staying).open(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            if not follow and 300 <= exc.code < 400:
                return exc.code, exc.headers.get("Location", "")
            return exc.code, exc.read().decode()

    def log_in(self, email: str, cookie_secret: str) -> None:
        """Hold the session cookie Flower's OAuth login sets after the provider said yes."""
        value = tornado.web.create_signed_value(cookie_secret, "user", email).decode()
        cookie = http.cookiejar.Cookie(
            version=0,
            name="user",
            value=value,
            port=None,
            port_specified=False,
            domain="127.0.0.1",
            domain_specified=False,
            domain_initial_dot=False,
            path="/",
            path_specified=True,
            secure=False,
            expires=None,
            discard=True,
            comment=None,
            comment_url=None,
            rest={},
        )
        self.cookies.set_cookie(cookie)

    def page(self, path: str) -> str:
        status, text = self.request("GET", path)
        assert status == 200, (status, text[-2000:])
        return text

    def api(self, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
        body = None if payload is None else json.dumps(payload).encode()
        status, text = self.request(method, "/api/durable" + path, body)
        return status, json.loads(text)

    def submit(self, run_id: str, action: str, **fields: str) -> tuple[int, str]:
        """Press one of the run page's buttons: the form with Flower's XSRF token."""
        page = self.page(run_path(run_id))
        token = re.search(r'name="_xsrf" value="([^"]+)"', page)
        assert token, "the run page has no action forms"
        form = urllib.parse.urlencode({"_xsrf": token.group(1), **fields}).encode()
        return self.request("POST", f"{run_path(run_id)}/{action}", form)

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        self._out.close()


def run_path(run_id: str) -> str:
    # Tornado's reverse_url keeps a child id's "/": the route's path regex takes it whole.
    return "/workflows/" + urllib.parse.quote(run_id, safe="/")


@pytest.fixture
def flower(cluster: Cluster, tmp_path: Path) -> Iterator[Flower]:
    server = Flower(cluster, tmp_path / "flower.log", f"--basic_auth={AUTH}")
    try:
        yield server
    finally:
        server.close()


def wait_status(cluster: Cluster, run_id: str, *statuses: str, timeout: float = 90) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = cluster.store.get_status(run_id)
        if status in statuses or time.monotonic() > deadline:
            assert status in statuses, (run_id, status, cluster.log_tails())
            return str(status)
        time.sleep(0.2)


def test_the_workflows_tab_lists_filters_pages_and_shows_each_run(
    cluster: Cluster, flower: Flower
) -> None:
    cluster.worker()
    done = [wfapp.sequential.apply_async((2,), app=cluster.client) for _ in range(3)]
    hostile = "<script>alert(1)</script>" + "y" * 300
    failed = wfapp.declined_checkout.apply_async((hostile,), app=cluster.client)
    parent = wfapp.family.apply_async((1,), app=cluster.client)
    for handle in done:
        assert handle.get(timeout=90) == wfapp.step_value(0) + 4
    wait_status(cluster, failed.id, "FAILURE")
    deadline = time.monotonic() + 60
    while len(cluster.store.list_runs(limit=10)) < 7 and time.monotonic() < deadline:
        time.sleep(0.2)

    listing = flower.page("/workflows")
    assert ">Workflows</a>" in listing  # the tab in Flower's navigation bar
    assert listing.count("data-run-id=") == 7
    rows = re.findall(r'data-run-id="([^"]+)"', listing)
    created = [cluster.store.require_run(r).created_at for r in rows]
    assert created == sorted(created, reverse=True)  # newest first
    assert re.search(r'data-status="SUCCESS"[^>]*>SUCCESS\s*<span[^>]*>3<', listing)
    assert "<script>alert" not in listing

    assert flower.page("/workflows?status=FAILURE").count("data-run-id=") == 1
    by_name = flower.page("/workflows?workflow=integration_tests.wfapp.family")
    assert by_name.count("data-run-id=") == 3
    found = flower.page("/workflows?search=" + urllib.parse.quote(parent.id + "/"))
    assert found.count("data-run-id=") == 2  # the two children
    first = flower.page("/workflows?limit=2")
    assert first.count("data-run-id=") == 2 and 'rel="next"' in first
    last = flower.page("/workflows?limit=2&offset=6")
    assert last.count("data-run-id=") == 1 and 'rel="prev"' in last

    page = flower.page(run_path(failed.id))
    assert "FAILURE" in page and "Traceback" in page
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "whole value" in page and "y" * 300 in page  # cut, and shown whole on demand
    activities = [s for s in cluster.store.history(failed.id) if s.kind == "activity"]
    assert len(activities) == 2
    for step in activities:
        assert f'href="/task/{step.dispatch_id}"' in page

    family_page = flower.page(run_path(parent.id))
    children = [s.child_id for s in cluster.store.history(parent.id) if s.child_id]
    assert len(children) == 2
    for child in children:
        assert f'href="{run_path(child)}"' in family_page
        child_page = flower.page(run_path(child))
        assert f'id="run-parent" href="{run_path(parent.id)}"' in child_page

    status, text = flower.request("GET", run_path("no-such-run"))
    assert status == 404 and "no workflow run with id" in text

    status, listed = flower.api("GET", "/runs?status=SUCCESS&limit=2")
    assert status == 200 and listed["total"] == 3 and len(listed["runs"]) == 2
    assert listed["counts"]["SUCCESS"] == 3 and listed["counts"]["FAILURE"] == 1
    status, detail = flower.api("GET", "/runs/" + urllib.parse.quote(failed.id, safe=""))
    assert status == 200 and detail["input"]["args"] == [hostile]
    assert [s["seq"] for s in detail["steps"]] == sorted(s["seq"] for s in detail["steps"])
    assert detail["error"]["traceback"]
    status, missing = flower.api("GET", "/runs/no-such-run")
    assert status == 404 and "no workflow run" in missing["error"]


def _flower_tasks(flower: Flower, run_id: str) -> dict[str, dict[str, Any]]:
    """The tasks Flower's events show for ``run_id`` (its root), by task id."""
    status, text = flower.request("GET", "/api/tasks?limit=1000")
    assert status == 200, text
    return {k: v for k, v in json.loads(text).items() if v.get("root_id") == run_id}


def test_flowers_own_task_list_and_metrics_know_the_runs(cluster: Cluster, flower: Flower) -> None:
    cluster.worker(args=["-E"])  # task events, which Flower's task list is made of
    run = wfapp.sequential.apply_async((2,), app=cluster.client, workflow_id="order-o-1")
    parent = wfapp.family.apply_async((1,), app=cluster.client, workflow_id="family-f-1")
    assert run.get(timeout=90) == wfapp.step_value(0) + wfapp.step_value(1)
    wait_status(cluster, parent.id, "RUNNING")
    steps = {s.dispatch_id for s in cluster.store.history(run.id) if s.kind == "activity"}

    deadline = time.monotonic() + 30
    while not steps <= set(tasks := _flower_tasks(flower, run.id)):
        assert time.monotonic() < deadline, (steps, tasks)
        time.sleep(0.3)
    wakes = {k: v for k, v in tasks.items() if k not in steps}
    assert wakes, tasks  # the driver tasks: the start's wake and one per outcome
    for task_id, task in tasks.items():
        assert task["parent_id"] == run.id, task
        if task_id in steps:
            assert task["name"] == wfapp.record.name and task["args"].startswith("(")
        else:
            assert task["name"] == wfapp.sequential.name and task["args"] == "run=order-o-1"

    # Flower's own search finds the driver tasks by the run's id (and only them: a wake's
    # events may still be arriving, so found is read after the search).
    query = {"draw": 1, "start": 0, "length": 100, "search[value]": "run=order-o-1"}
    query.update({"order[0][column]": 0, "order[0][dir]": "asc", "columns[0][data]": "name"})
    status, text = flower.request("GET", "/tasks/datatable?" + urllib.parse.urlencode(query))
    found = {t["uuid"] for t in json.loads(text)["data"]}
    assert status == 200 and set(wakes) <= found
    tasks = _flower_tasks(flower, run.id)
    assert all(tasks[t]["name"] == wfapp.sequential.name for t in found), (found, tasks)

    # A step's task page links to its run as root and parent; following them opens the run.
    step_page = flower.page(f"/task/{next(iter(steps))}")
    assert step_page.count('href="/task/order-o-1"') == 2
    redirect = flower.request("GET", "/task/order-o-1", follow=False)
    assert redirect == (302, "/workflows/order-o-1")
    assert '<h2 id="run-id">order-o-1</h2>' in flower.page("/task/order-o-1")
    child = next(s.child_id for s in cluster.store.history(parent.id) if s.child_id)
    assert f'<h2 id="run-id">{child}</h2>' in flower.page(f"/task/{child}")
    status, text = flower.request("GET", f"/task/{next(iter(wakes))}")
    assert status == 200 and "run=order-o-1" in text  # any other id: Flower's own page

    # The family's three runs wait for their signal (the census caches: ask once, then).
    deadline = time.monotonic() + 60
    while cluster.store.census().open_steps.get(("signal", "SCHEDULED")) != 3:
        assert time.monotonic() < deadline, cluster.store.census()
        time.sleep(0.2)
    status, metrics = flower.request("GET", "/metrics", auth=None)  # open, as Flower's
    assert status == 200 and "flower_events_total" in metrics
    sequential = f'status="SUCCESS",workflow="{wfapp.sequential.name}"'
    assert f"celery_durable_runs{{{sequential}}} 1.0" in metrics
    running = f'status="RUNNING",workflow="{wfapp.family.name}"'
    assert f"celery_durable_runs{{{running}}} 3.0" in metrics  # the parent, two children
    assert 'celery_durable_steps_open{kind="signal",state="SCHEDULED"} 3.0' in metrics
    assert "celery_durable_runs_stuck 0.0" in metrics
    assert "celery_durable_metrics_errors_total 0.0" in metrics
    assert "order-o-1" not in metrics and "family-f-1" not in metrics


def test_actions_from_the_page_and_the_api_act_on_the_store(
    cluster: Cluster, flower: Flower
) -> None:
    cluster.worker()
    signalled = wfapp.family.apply_async((0,), app=cluster.client)
    cancelled = wfapp.family.apply_async((0,), app=cluster.client)
    terminated = wfapp.family.apply_async((0,), app=cluster.client)
    by_api = wfapp.family.apply_async((1,), app=cluster.client)
    for handle in (signalled, cancelled, terminated, by_api):
        wait_status(cluster, handle.id, "RUNNING")

    status, text = flower.submit(signalled.id, "signal", name="go", payload='{"ok": true}')
    assert status == 200 and "signal &#x27;go&#x27; sent" in text
    assert signalled.get(timeout=90) == "not cancelled"
    status, text = flower.submit(signalled.id, "signal", name="go", payload="{not json")
    assert status == 409 and "the payload must be JSON" in text

    status, text = flower.submit(cancelled.id, "cancel")
    assert status == 200 and "cancellation requested" in text
    wait_status(cluster, cancelled.id, "CANCELLED")
    status, text = flower.submit(cancelled.id, "cancel")
    assert status == 409 and "alert-danger" in text  # the CLI's error for a finished run

    status, text = flower.submit(terminated.id, "terminate", reason="from <b>Flower</b>")
    assert status == 200 and "terminated" in text
    assert cluster.store.get_status(terminated.id) == "TERMINATED"
    error = cluster.store.require_run(terminated.id).error or {}
    assert "from <b>Flower</b>" in str(error.get("message"))
    assert "from <b>Flower</b>" not in flower.page(run_path(terminated.id))

    status, text = flower.submit(signalled.id, "retry")
    assert status == 409 and "alert-danger" in text

    # Without the page's token a form post is refused (no cross-site form posts).
    status, _ = flower.request("POST", f"{run_path(cancelled.id)}/cancel", b"")
    assert status == 403
    # A cross-site request is refused as Flower refuses its own.
    status, _ = flower.request(
        "POST",
        "/api/durable/runs/" + by_api.id + "/cancel",
        b"{}",
        headers={"Sec-Fetch-Site": "cross-site"},
    )
    assert status == 403
    status, _ = flower.request(
        "POST",
        "/api/durable/runs/" + by_api.id + "/cancel",
        b"{}",
        headers={"Origin": "http://evil.example"},
    )
    assert status == 403
    assert cluster.store.get_status(by_api.id) == "RUNNING"

    quoted = urllib.parse.quote(by_api.id, safe="")
    status, body = flower.api("POST", f"/runs/{quoted}/signal", {"name": "go", "payload": 1})
    assert status == 200 and "sent" in body["message"]
    children = [s.child_id for s in cluster.store.history(by_api.id) if s.child_id]
    for child in children:
        quoted_child = urllib.parse.quote(str(child), safe="")
        status, body = flower.api("POST", f"/runs/{quoted_child}/signal", {"name": "go"})
        assert status == 200, body
    wait_status(cluster, by_api.id, "SUCCESS")
    status, body = flower.api("POST", f"/runs/{quoted}/cancel", {})
    assert status == 409 and body["error"]
    status, body = flower.api("POST", f"/runs/{quoted}/terminate", {"reason": "late"})
    assert status == 409 and body["error"]
    status, _ = flower.request("POST", f"/api/durable/runs/{quoted}/nonsense", b"{}")
    assert status == 405  # not an action: the path names a run, which takes GET only


def _has_read_only() -> bool:
    """Flower 2.1 and later have ``--read_only``; 2.0 ignores the option."""
    import flower.options  # noqa: F401  (defines Flower's options)
    from tornado.options import options

    return "read_only" in options


def test_basic_auth_url_prefix_and_read_only(cluster: Cluster, tmp_path: Path) -> None:
    run = wfapp.sequential.apply_async((1,), app=cluster.client)  # stays PENDING: no worker
    read_only = _has_read_only()
    server = Flower(
        cluster,
        tmp_path / "flower-prefix.log",
        f"--basic_auth={AUTH}",
        "--url_prefix=flower",
        *(["--read_only"] if read_only else []),
        prefix="/flower",
    )
    try:
        status, _ = server.request("GET", "/workflows", auth="admin:wrong")
        assert status == 401
        status, _ = server.request("GET", "/api/durable/runs", auth=None)
        assert status == 401
        listing = server.page("/workflows")
        assert f'href="/flower{run_path(run.id)}"' in listing
        page = server.page(run_path(run.id))
        assert "PENDING" in page
        redirect = server.request("GET", f"/task/{run.id}", follow=False)
        assert redirect == (302, f"/flower{run_path(run.id)}")
        status, metrics = server.request("GET", "/metrics", auth=None)
        assert status == 200 and "celery_durable_runs{" in metrics
        if read_only:
            assert 'id="durable-actions"' not in page
            status, body = server.request("POST", f"/api/durable/runs/{run.id}/cancel", b"{}")
            assert status == 403 and "Read only" in body
            assert cluster.store.get_status(run.id) == "PENDING"
        status, _ = server.request("GET", "/workflows", auth=None)
        assert status == 401
    finally:
        server.close()


def test_a_plain_celery_flower_gets_the_tab_from_one_line_of_flowerconfig(
    cluster: Cluster, tmp_path: Path
) -> None:
    run = wfapp.sequential.apply_async((1,), app=cluster.client)
    config = tmp_path / "flowerconfig.py"
    config.write_text("import celery_durable.flower; celery_durable.flower.install()\n")
    server = Flower(
        cluster,
        tmp_path / "flower-plain.log",
        f"--basic_auth={AUTH}",
        f"--conf={config}",
        command=("flower",),
    )
    try:
        assert f'href="{run_path(run.id)}"' in server.page("/workflows")
        status, body = server.api("GET", f"/runs/{run.id}")
        assert status == 200 and body["status"] == "PENDING"
        assert ">Workers</" in server.page("/workers")  # Flower's own pages are unchanged
    finally:
        server.close()


def test_a_store_that_cannot_be_reached_is_an_error_on_the_page(
    cluster: Cluster, tmp_path: Path
) -> None:
    nowhere = "postgresql+psycopg://durable:s3cret@127.0.0.1:1/nowhere"
    server = Flower(
        cluster,
        tmp_path / "flower-away.log",
        f"--basic_auth={AUTH}",
        env={"DURABLE_IT_STORE": nowhere},
    )
    try:
        status, text = server.request("GET", "/workflows")
        assert status == 503 and 'id="durable-error"' in text and "s3cret" not in text
        status, text = server.request("GET", run_path("order-1"))
        assert status == 503 and "the store cannot be reached" in text
        status, body = server.api("GET", "/runs")
        assert status == 503 and body["error"]
        assert ">Workers</" in server.page("/workers")  # Flower itself carries on
        status, metrics = server.request("GET", "/metrics")
        assert status == 200 and "flower_events_total" in metrics
        assert "celery_durable_metrics_errors_total 1.0" in metrics
        assert "celery_durable_runs" not in metrics and "s3cret" not in metrics
    finally:
        server.close()


def test_with_oauth_the_tab_needs_a_session_as_flowers_own_pages_do(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Flower's GitHub login cannot reach GitHub here. Without a session, each page and
    API call of the tab gets the refusal Flower's own counterpart gets; with the session
    cookie Flower's login sets, the tab works, and its posts need the XSRF token."""
    run = wfapp.sequential.apply_async((1,), app=cluster.client)  # stays PENDING: no worker
    secret = "a-cookie-secret-for-the-test"
    server = Flower(
        cluster,
        tmp_path / "flower-oauth.log",
        "--auth=ann@example.com",
        "--auth_provider=flower.views.auth.GithubLoginHandler",
        "--oauth2_key=key",
        "--oauth2_secret=secret",
        "--oauth2_redirect_uri=http://127.0.0.1/login",
        f"--cookie_secret={secret}",
    )
    server.auth = None
    try:
        # (ours, Flower's own of the same kind)
        pairs = [
            (("GET", "/workflows"), ("GET", "/workers")),
            (("GET", run_path(run.id)), ("GET", "/worker/w1")),
            (("GET", f"/task/{run.id}"), ("GET", "/task/t-1")),
            (("GET", "/api/durable/runs"), ("GET", "/api/workers")),
            (("GET", f"/api/durable/runs/{run.id}"), ("GET", "/api/task/info/t-1")),
            (("POST", f"/api/durable/runs/{run.id}/cancel"), ("POST", "/api/task/revoke/t-1")),
            (("POST", f"{run_path(run.id)}/cancel"), ("POST", "/api/worker/shutdown/w1")),
        ]
        for (method, ours), (flowers_method, flowers) in pairs:
            body = b"{}" if method == "POST" else None
            status, where = server.request(method, ours, body, follow=False)
            expected, _ = server.request(flowers_method, flowers, body, follow=False)
            assert status == expected and status in (302, 403), (ours, status, expected)
            if status == 302:
                assert where.startswith("/login?next="), where
        assert cluster.store.require_run(run.id).cancel_requested is False

        server.log_in("ann@example.com", secret)
        assert f'href="{run_path(run.id)}"' in server.page("/workflows")
        status, body = server.api("GET", f"/runs/{run.id}")
        assert status == 200 and body["status"] == "PENDING"
        status, _ = server.request("POST", f"/api/durable/runs/{run.id}/cancel", b"{}")
        assert status == 403  # a cookie session posts only with the XSRF token
        status, text = server.submit(run.id, "cancel")  # the page's form carries it
        assert status == 200 and "cancellation requested" in text
        assert cluster.store.require_run(run.id).cancel_requested is True
    finally:
        server.close()


CHROMIUM = "/usr/bin/chromium"


def _need_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            raise AssertionError(f"{CHROMIUM} is missing (.ci/run installs it)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install -y chromium")


def test_the_pages_in_a_browser(cluster: Cluster, flower: Flower, tmp_path: Path) -> None:
    """Debian's chromium, driven by Playwright: the tab, a run, the Signal button."""
    _need_chromium()
    from playwright.sync_api import sync_playwright

    cluster.worker()
    waiting = wfapp.family.apply_async((0,), app=cluster.client)
    wait_status(cluster, waiting.id, "RUNNING")
    user, password = AUTH.split(":")
    with sync_playwright() as driver:
        browser = driver.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"], timeout=60_000
        )
        try:
            context = browser.new_context(http_credentials={"username": user, "password": password})
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(flower.base + "/workers")
            page.get_by_role("link", name="Workflows").click()
            page.wait_for_url("**/workflows")
            page.locator(f'tr[data-run-id="{waiting.id}"] a').click()
            page.wait_for_selector("#run-status")
            assert page.inner_text("#run-status").startswith("RUNNING")
            page.screenshot(path=str(tmp_path / "run-page.png"), full_page=True)
            page.fill('input[name="name"]', "go")
            page.fill('textarea[name="payload"]', '{"from": "browser"}')
            page.get_by_role("button", name="Signal").click()
            page.wait_for_selector("#durable-message")
            assert "signal 'go' sent" in page.inner_text("#durable-message")
        finally:
            browser.close()
    assert waiting.get(timeout=90) == "not cancelled"


def test_the_readme_screenshots_script(tmp_path: Path) -> None:
    """``examples/flower_screenshots.py`` makes the README's images: here it runs whole."""
    _need_chromium()
    require("redis")
    env = {**os.environ, "SHOTS_BROKER": REDIS_URL, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "examples.flower_screenshots", str(tmp_path)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    readme = (REPO_ROOT / "README.md").read_text()
    for name in ("flower_workflows.png", "flower_run.png"):
        image = (tmp_path / name).read_bytes()
        assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 20_000
        assert int.from_bytes(image[16:20], "big") == 1400  # the page's width
        assert (REPO_ROOT / "examples" / name).is_file() and f"examples/{name}" in readme
