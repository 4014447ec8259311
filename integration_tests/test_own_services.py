"""The test infrastructure itself: private services that can be stopped and broken, and
the wall-clock skew shim.

Later tests rely on these guarantees (the same URL after a restart, what a restart keeps
and loses, a killed connection failing its next query, a skewed clock that still sleeps
in real time), so each one is checked here against the real servers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from typing import Any

import amqp
import psycopg
import pytest
import redis
import sqlalchemy

from .clockshift import build_shim, skewed_env
from .own_services import OwnPostgres, OwnRabbitMQ, OwnRedis, free_port, port_open
from .services import POSTGRES_URL, _libpq_url, require

pytestmark = pytest.mark.integration


# -- helpers -------------------------------------------------------------------------------


def test_free_port_is_bindable_and_outside_the_shared_services() -> None:
    ports = {free_port() for _ in range(20)}
    assert not ports & {5432, 6379, 5672}
    for port in ports:
        assert not port_open(port)


# -- PostgreSQL ----------------------------------------------------------------------------


def test_own_postgres_keeps_its_url_and_data_across_stop_and_start(
    own_postgres: OwnPostgres,
) -> None:
    url = own_postgres.url
    assert url == f"postgresql+psycopg://postgres@127.0.0.1:{own_postgres.port}/durable"
    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    try:
        with engine.begin() as conn:
            conn.execute(sqlalchemy.text("CREATE TABLE kept (x int)"))
            conn.execute(sqlalchemy.text("INSERT INTO kept VALUES (42)"))

        own_postgres.stop()
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(own_postgres.dsn, connect_timeout=2).close()

        own_postgres.start()
        assert own_postgres.url == url
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT x FROM kept")).scalar_one() == 42
    finally:
        engine.dispose()


def test_own_postgres_recovers_committed_data_after_a_crash(own_postgres: OwnPostgres) -> None:
    with psycopg.connect(own_postgres.dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE kept (x int)")
        conn.execute("INSERT INTO kept VALUES (1)")
    own_postgres.stop("immediate")  # no shutdown checkpoint: the start replays the WAL
    own_postgres.restart()
    with psycopg.connect(own_postgres.dsn) as conn:
        assert conn.execute("SELECT x FROM kept").fetchall() == [(1,)]


def test_terminate_connections_kills_an_open_connection(own_postgres: OwnPostgres) -> None:
    victim = psycopg.connect(own_postgres.dsn, autocommit=True)
    bystander = psycopg.connect(own_postgres.dsn_for("postgres"), autocommit=True)
    try:
        victim.execute("SELECT 1")
        assert own_postgres.terminate_connections() == 1
        with pytest.raises(psycopg.OperationalError):
            victim.execute("SELECT 1")
        # Only the test database's connections go; the server itself keeps running.
        assert bystander.execute("SELECT 1").fetchone() == (1,)
        with psycopg.connect(own_postgres.dsn) as fresh:
            assert fresh.execute("SELECT 1").fetchone() == (1,)
    finally:
        victim.close()
        bystander.close()


def test_own_postgres_close_removes_the_cluster() -> None:
    reason = OwnPostgres.unavailable()
    if reason is not None:
        pytest.skip(reason)  # the own_postgres tests above report it (and fail on CI)
    with OwnPostgres() as server:
        name, directory = server.name, server.directory
        assert name in subprocess.run(["pg_lsclusters"], capture_output=True, text=True).stdout
    assert name not in subprocess.run(["pg_lsclusters"], capture_output=True, text=True).stdout
    assert directory is not None and not directory.exists()
    assert not port_open(server.port)


# -- Redis ---------------------------------------------------------------------------------


def test_own_redis_restart_empty_loses_keys_and_serves_the_same_port(
    own_redis: OwnRedis,
) -> None:
    url, port = own_redis.url, own_redis.port
    client = redis.Redis.from_url(url, socket_timeout=5)
    try:
        client.set("key", "value")
        own_redis.stop()
        with pytest.raises(redis.ConnectionError):
            client.ping()

        own_redis.start()
        assert client.get("key") is None  # nothing was persisted

        client.set("key", "value")
        own_redis.restart_empty()
        assert (own_redis.url, own_redis.port) == (url, port)
        assert client.get("key") is None  # the same client reconnects by itself
        assert client.ping()
    finally:
        client.close()


def test_persistent_own_redis_keeps_keys_across_a_kill() -> None:
    reason = OwnRedis.unavailable()
    if reason is not None:
        pytest.skip(reason)  # the own_redis test above reports it (and fails on CI)
    with OwnRedis(persistent=True) as server:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        try:
            client.rpush("queue", "message")
            server.stop()  # SIGKILL: only what is in the append-only file survives
            server.start()
            assert client.lrange("queue", 0, -1) == [b"message"]
            server.restart_empty()
            assert client.exists("queue") == 0
        finally:
            client.close()


# -- RabbitMQ ------------------------------------------------------------------------------


def _queue_depth(server: OwnRabbitMQ, queue: str) -> int:
    conn = amqp.Connection(f"127.0.0.1:{server.port}", connect_timeout=5)
    conn.connect()
    try:
        declared = conn.channel().queue_declare(queue, passive=True)
        assert declared is not None
        _queue, message_count, _consumers = declared
        return int(message_count)
    finally:
        conn.close()


def test_own_rabbitmq_keeps_persistent_messages_across_restarts(
    own_rabbitmq: OwnRabbitMQ,
) -> None:
    url = own_rabbitmq.url
    assert url == f"amqp://guest:guest@127.0.0.1:{own_rabbitmq.port}//"
    conn = amqp.Connection(f"127.0.0.1:{own_rabbitmq.port}", connect_timeout=5)
    conn.connect()
    try:
        channel = conn.channel()
        channel.confirm_select()  # basic_publish returns once the broker has the message
        channel.queue_declare("kept", durable=True, auto_delete=False)
        channel.basic_publish(amqp.Message(b"body", delivery_mode=2), routing_key="kept")
    finally:
        conn.close()

    own_rabbitmq.restart()
    assert own_rabbitmq.url == url
    assert _queue_depth(own_rabbitmq, "kept") == 1

    own_rabbitmq.stop(kill=True)
    assert not port_open(own_rabbitmq.port)
    own_rabbitmq.start()
    assert _queue_depth(own_rabbitmq, "kept") == 1


# -- the wall-clock skew shim --------------------------------------------------------------

# Runs under the shim and prints its clocks and how long each timed wait took, as JSON.
_CLOCK_PROBE = textwrap.dedent(
    """
    import ctypes, json, queue, select, threading, time
    from datetime import datetime, timezone

    libc = ctypes.CDLL(None)  # the symbols as the process sees them, shim first
    libc.time.restype = ctypes.c_long

    class Pair(ctypes.Structure):  # struct timeval and struct timespec on x86-64/arm64
        _fields_ = [("sec", ctypes.c_long), ("frac", ctypes.c_long)]

    def c_gettimeofday():
        tv = Pair()
        assert libc.gettimeofday(ctypes.byref(tv), None) == 0
        return tv.sec + tv.frac / 1e6

    def c_timespec_get():
        ts = Pair()
        assert libc.timespec_get(ctypes.byref(ts), 1) == 1  # TIME_UTC
        return ts.sec + ts.frac / 1e9

    report = {
        "monotonic": time.monotonic(),
        "before": time.time(),
        "now_utc": datetime.now(timezone.utc).timestamp(),
        "now_local": datetime.now().timestamp(),
        "c_time": libc.time(None),
        "c_gettimeofday": c_gettimeofday(),
        "c_timespec_get": c_timespec_get(),
        "after": time.time(),
    }

    def timed(wait):
        start = time.monotonic()
        wait()
        return time.monotonic() - start

    def queue_get():
        try:
            queue.Queue().get(timeout=0.2)
        except queue.Empty:
            pass

    def condition_wait():
        condition = threading.Condition()
        with condition:
            condition.wait(0.2)

    held = threading.Lock()
    held.acquire()
    report["waits"] = {
        "time.sleep": timed(lambda: time.sleep(0.2)),
        "Event.wait": timed(lambda: threading.Event().wait(0.2)),
        "Condition.wait": timed(condition_wait),
        "Lock.acquire": timed(lambda: held.acquire(timeout=0.2)),
        "Queue.get": timed(queue_get),
        "select.select": timed(lambda: select.select([], [], [], 0.2)),
        "poll.poll": timed(lambda: select.poll().poll(200)),
    }
    print(json.dumps(report))
    """
)

# The shared database's clock, read by a process under the shim.
_DB_PROBE = textwrap.dedent(
    """
    import json, sys, time
    import psycopg

    with psycopg.connect(sys.argv[1], connect_timeout=5) as conn:
        before = time.time()
        (db_now,) = conn.execute("SELECT extract(epoch FROM now())").fetchone()
        after = time.time()
    print(json.dumps({"before": before, "db_now": float(db_now), "after": after}))
    """
)


def _run_python(code: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    """Run ``code`` in a new interpreter with ``env`` added; its JSON output."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,  # a wait that hangs under the shim fails the test instead of blocking it
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def test_build_shim_is_built_once() -> None:
    first = build_shim()
    mtime = first.stat().st_mtime_ns
    assert build_shim() == first and first.stat().st_mtime_ns == mtime


@pytest.mark.parametrize("offset", [-3600.0, 3600.0, -1.25])
def test_skewed_process_reads_a_shifted_wall_clock_and_waits_in_real_time(
    offset: float,
) -> None:
    env = skewed_env(offset)
    parent_before, parent_mono = time.time(), time.monotonic()
    report = _run_python(_CLOCK_PROBE, env)
    parent_after, parent_mono_after = time.time(), time.monotonic()

    # Every wall-clock read the child made falls between the parent's two reads, shifted.
    # (time() truncates to whole seconds.)
    low, high = parent_before + offset - 0.01, parent_after + offset + 0.01
    for name in ("before", "now_utc", "now_local", "c_gettimeofday", "c_timespec_get", "after"):
        assert low <= report[name] <= high, (name, report[name] - parent_before)
    assert int(low) - 1 <= report["c_time"] <= high

    # The monotonic clock is the machine's, untouched.
    assert parent_mono <= report["monotonic"] <= parent_mono_after

    for wait, seconds in report["waits"].items():
        assert 0.15 <= seconds < 2.0, (wait, seconds)


def test_skewed_process_sees_the_database_clock_unshifted() -> None:
    require("postgres")
    report = _run_python(_DB_PROBE, skewed_env(-3600), _libpq_url(POSTGRES_URL))
    # The process is an hour behind; the database's clock (same machine) is the real one.
    skew = report["before"] - report["db_now"]
    assert -3601 < skew < -3599, skew
    assert report["before"] - 1 <= report["db_now"] - 3600 <= report["after"] + 1
