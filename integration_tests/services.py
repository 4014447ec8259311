"""The real services the integration tests use: brokers and stores, one clean set per test.

Addresses come from the environment, with the development machine's defaults:

| variable | default |
|---|---|
| ``DURABLE_IT_REDIS_URL`` | ``redis://127.0.0.1:6379/11`` (a database of its own) |
| ``DURABLE_IT_AMQP_URL`` | ``amqp://guest:guest@127.0.0.1:5672//`` |
| ``DURABLE_IT_POSTGRES_URL`` | ``postgresql+psycopg://postgres@127.0.0.1:5432/test`` |

A service that cannot be reached skips the tests that need it, or fails them when
``CI=true``: on CI a missing service is a broken pipeline, not a reason to pass.
"""

from __future__ import annotations

import json
import os
import uuid
from typing import NoReturn
from urllib.parse import quote

import psycopg
import pytest
import redis
from kombu import Connection
from sqlalchemy.engine import make_url

REDIS_URL = os.environ.get("DURABLE_IT_REDIS_URL", "redis://127.0.0.1:6379/11")
AMQP_URL = os.environ.get("DURABLE_IT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES_URL = os.environ.get(
    "DURABLE_IT_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

_reachable: dict[str, str | None] = {}


def skip_or_fail(message: str) -> NoReturn:
    """Skip the current test for ``message``, or fail it when ``CI=true``."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


def _unavailable(service: str, reason: str) -> NoReturn:
    skip_or_fail(f"{service} is not reachable ({reason}); start it or set its DURABLE_IT_* URL")


def _check(service: str) -> str | None:
    """Why ``service`` is unreachable, or None when it answers."""
    try:
        if service == "redis":
            with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2) as client:
                client.ping()
        elif service == "rabbitmq":
            with Connection(AMQP_URL, connect_timeout=2) as conn:
                conn.ensure_connection(max_retries=1)
        elif service == "postgres":
            with psycopg.connect(_libpq_url(POSTGRES_URL), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        else:  # pragma: no cover
            raise ValueError(service)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def require(service: str) -> None:
    """Skip (or on CI fail) the current test unless ``service`` answers."""
    if service not in _reachable:
        _reachable[service] = _check(service)
    reason = _reachable[service]
    if reason is not None:
        _unavailable(service, reason)


def _libpq_url(sqlalchemy_url: str) -> str:
    return (
        make_url(sqlalchemy_url).set(drivername="postgresql").render_as_string(hide_password=False)
    )


# -- brokers -------------------------------------------------------------------------------


class Broker:
    """One broker, with the per-test queues the tests create on it."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.url = url or (REDIS_URL if kind == "redis" else AMQP_URL)
        self._queues: set[str] = set()

    def new_queue(self, prefix: str = "it") -> str:
        """A queue name no other test uses (deleted by :meth:`cleanup`)."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self._queues.add(name)
        return name

    def adopt(self, queue: str) -> str:
        """Have :meth:`cleanup` delete ``queue`` too."""
        self._queues.add(queue)
        return queue

    def queue_length(self, queue: str) -> int:
        """How many messages wait in ``queue`` (not counting ones delivered to workers)."""
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            try:
                return int(client.llen(queue))
            finally:
                client.close()
        with Connection(self.url) as conn:
            try:
                return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
            except Exception:
                return 0  # not declared yet

    def purge(self, queue: str) -> None:
        """Throw away every message waiting in ``queue``, as a broker crash would."""
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            try:
                client.delete(queue)
            finally:
                client.close()
        else:
            with Connection(self.url) as conn:
                conn.default_channel.queue_purge(queue)

    def cleanup(self) -> None:
        """Delete this test's queues, and the messages killed workers left unacknowledged."""
        if self.kind == "redis":
            client = redis.Redis.from_url(self.url)
            try:
                for queue in self._queues:
                    keys = list(client.scan_iter(match=f"*{queue}*"))
                    if keys:
                        client.delete(*keys)
                # kombu keeps each delivered message here until it is acknowledged; a
                # worker restoring them an hour later would recreate the queues.
                for tag, entry in client.hscan_iter("unacked"):
                    _message, _exchange, routing_key = json.loads(entry)
                    if routing_key in self._queues:
                        client.hdel("unacked", tag)
                        client.zrem("unacked_index", tag)
            finally:
                client.close()
            return
        with Connection(self.url) as conn:
            for queue in self._queues:
                try:
                    conn.default_channel.queue_delete(queue)
                except Exception:
                    conn.close()  # a missing queue closes the channel; start afresh
                    conn.connect()


# -- stores --------------------------------------------------------------------------------


class StoreDatabase:
    """An empty workflow store: a new SQLite file, or a new PostgreSQL schema."""

    def __init__(self, kind: str, directory: str, url: str | None = None) -> None:
        self.kind = kind
        if url is not None:
            # A database of the test's own (a private server): nothing to create or drop.
            self.url, self.schema, self.kind = url, "", "own"
            return
        if kind == "sqlite":
            self.url = f"sqlite:///{directory}/durable.sqlite3"
            self.schema = ""
            return
        self.schema = f"it_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(_libpq_url(POSTGRES_URL), autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{self.schema}"')
        # Every connection of this URL (test process and workers) sees only the new
        # schema, so the durable_* tables are created fresh inside it.
        self.url = f"{POSTGRES_URL}?options={quote(f'-csearch_path={self.schema}')}"

    def cleanup(self) -> None:
        """Drop the schema (SQLite files go with ``tmp_path``)."""
        if self.kind == "postgres":
            with psycopg.connect(_libpq_url(POSTGRES_URL), autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE')
