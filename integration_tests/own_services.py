"""Private PostgreSQL, Redis and RabbitMQ instances that one test may stop, restart and break.

The machine's shared services (PostgreSQL on 5432, Redis on 6379, RabbitMQ on 5672) serve
every test and are never stopped. A test that needs its store or broker to go away (a
database restart, a broker that loses everything) starts its own instance here, on a spare
port, and it is removed when the test ends, also when the test fails::

    with OwnPostgres() as pg:          # or the ``own_postgres`` fixture
        engine = create_engine(pg.url)
        pg.restart()                   # same URL afterwards; the data is kept

Each class is a context manager; ``close()`` is safe to call twice and after a failure.

What the machine needs (Debian package names; ``.ci/run`` installs what is missing):

* :class:`OwnPostgres`: ``postgresql-common`` (``pg_createcluster``, ``pg_dropcluster``,
  ``pg_lsclusters``) and a server package such as ``postgresql-15``; the process must run
  as root (clusters are registered under ``/etc/postgresql``; the server itself runs as
  ``postgres`` through ``runuser``) or as the ``postgres`` user.
* :class:`OwnRedis`: ``redis-server``.
* :class:`OwnRabbitMQ`: ``rabbitmq-server`` (which brings ``erlang``'s ``epmd``); any user.

Without them a test using the fixture skips, or fails when ``CI=true``.

Why it is done this way:

* PostgreSQL: ``initdb`` runs once per test process into a template directory with
  ``--no-sync``, ``fsync = off`` and small buffers; each cluster is a copy of it that
  ``pg_createcluster`` registers (so ``pg_lsclusters`` shows it and ``pg_dropcluster``
  removes it). Copying and registering takes about 0.7 s, against 1.3-1.8 s for
  ``pg_createcluster`` running ``initdb`` itself; with the start and the ``CREATE
  DATABASE`` a new cluster is ready in 1.2-1.6 s.
  ``fsync = off`` loses data only if the machine itself crashes; a server crash
  (``stop("immediate")``) still recovers every commit from the WAL as in production
  (``synchronous_commit`` is left on for that reason). The server is
  started and stopped with the cluster's own ``pg_ctl``, exactly as ``pg_ctlcluster``
  does, because ``pg_ctlcluster start`` sleeps at least 2 s (0.5 s before its first check,
  then three ``psql`` probes 0.5 s apart) while ``pg_ctl -w`` returns in about 0.1 s.
* Redis keeps nothing on disk by default (``--save "" --appendonly no``), so every start
  is empty, like a broker whose disk is lost; ``OwnRedis(persistent=True)`` writes an
  append-only file with ``fsync`` on every write, so a restart keeps every message.
* RabbitMQ: a second node with its own node name, ports, data and log directories, its
  own ``epmd`` (Erlang's port mapper) on a spare port and its own Erlang cookie, so it can
  neither reach nor be reached by the shared node. The machine's ``rabbitmq-env.conf``
  and ``rabbitmq.conf`` are not read (they name the shared node and port 5672). The
  server script under ``/usr/lib/rabbitmq/bin`` is run directly: the ``/usr/sbin``
  wrapper switches to the ``rabbitmq`` user, which could not write our directories.
  Booting takes 5-11 s (on a 2-CPU machine), so use it only where the broker must go
  away; the shared broker serves every other test.

Every process started here carries ``DURABLE_IT_OWNER=<pid of the test process>`` in its
environment and runs in a directory named after that pid; the first instance a test
process creates kills the processes, drops the clusters and removes the directories of
test processes that died (SIGKILL, a lost CI runner) without cleaning up.
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal

import amqp
import psycopg
import redis

#: Marks the processes this module starts, with the pid of the test process that owns them.
OWNER_VARIABLE = "DURABLE_IT_OWNER"
#: Prefix of the temporary directories (followed by the owner's pid).
DIR_PREFIX = "durable-it-"
#: Prefix of PostgreSQL cluster names (followed by the owner's pid).
CLUSTER_PREFIX = "durable_it_"

_counter = itertools.count(1)
_swept = False


# -- ports and waiting ---------------------------------------------------------------------


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(exclude: Collection[int] = ()) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (and not one of ``exclude``).

    It is taken below the kernel's ephemeral range, so that while a private service is
    stopped its port is not handed to some client's outgoing connection, which would make
    the restart fail with "address in use".
    """
    high = min(_ephemeral_low(), 65536) - 1
    rng = random.Random()
    for _ in range(200):
        port = rng.randint(20000, max(high, 20001))
        if port not in exclude and _bindable(port):
            return port
    # Everything tried was taken: let the kernel choose (ephemeral, but free).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    interval: float = 0.05,
    abort: Callable[[], str | None] | None = None,
) -> None:
    """Poll ``condition`` until it is true; TimeoutError after ``timeout`` seconds.

    ``abort`` is asked before each poll; a message from it (say, "the server exited")
    raises RuntimeError at once instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    while True:
        if abort is not None:
            reason = abort()
            if reason is not None:
                raise RuntimeError(f"gave up waiting for {what}: {reason}")
        if condition():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


# -- processes -----------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """True while any thread of process ``pid`` is not a zombie.

    The main thread alone is not enough: in a multithreaded process it can be a zombie
    while other threads are still exiting and hold its files, listening sockets included.
    """
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in threads:
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rfind(")") + 2 :].split()[0] not in ("Z", "X"):
            return True
    return False


def _parents() -> dict[int, int]:
    """Every process's parent, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat[stat.rfind(")") + 2 :].split()[1])
    return parents


def _tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Erlang's helpers start sessions of their own, so a
    process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _kill_all(pids: Sequence[int], timeout: float = 30.0) -> None:
    """SIGKILL ``pids`` and wait until none is alive."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not any(_alive(p) for p in pids), timeout, f"processes {pids} to die")


def _stop_process(
    proc: subprocess.Popen[bytes] | None, sig: signal.Signals, timeout: float
) -> None:
    """Send ``sig`` to ``proc`` and wait for it and every descendant it had to end; what is
    left after ``timeout`` seconds is SIGKILLed."""
    if proc is None or proc.poll() is not None:
        return
    tree = _tree(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    # What has not ended after ``timeout`` is killed below.
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    _kill_all([p for p in tree if _alive(p)])
    proc.wait(timeout=timeout)


def _owner_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, OWNER_VARIABLE: str(os.getpid()), **(extra or {})}


def _run(command: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``command``; its output, or RuntimeError with the output when it fails."""
    result = subprocess.run(
        list(command),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env if env is not None else _owner_env(),
        # A server the command leaves behind must not get the terminal's Ctrl-C.
        start_new_session=True,
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result.stdout


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _new_dir(kind: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{os.getpid()}-{kind}-"))


def _owner_of(value: str) -> int | None:
    match = re.match(r"(\d+)", value)
    return int(match.group(1)) if match else None


def _process_owner(pid: int) -> int | None:
    """The test process that started ``pid`` here, or None if it is none of ours.

    Known from the marker in its environment or, for servers that overwrite their
    environment with their process title (redis-server), from its working directory.
    """
    marker = f"{OWNER_VARIABLE}=".encode()
    with contextlib.suppress(OSError):
        for item in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if item.startswith(marker):
                return _owner_of(item[len(marker) :].decode(errors="replace"))
    try:
        cwd = Path(os.readlink(f"/proc/{pid}/cwd").removesuffix(" (deleted)"))
    except OSError:
        return None
    prefix = str(Path(tempfile.gettempdir()) / DIR_PREFIX)
    if not str(cwd).startswith(prefix):
        return None
    return _owner_of(str(cwd)[len(prefix) :])


def sweep_orphans() -> None:
    """Remove what test processes that died without cleaning up left behind: processes
    marked with their pid, PostgreSQL clusters and temporary directories named after it.

    Runs once per test process, before its first private service starts.
    """
    global _swept
    if _swept:
        return
    _swept = True
    me = os.getpid()
    orphans = [
        pid
        for pid in (int(e) for e in os.listdir("/proc") if e.isdigit())
        if pid != me and (owner := _process_owner(pid)) not in (None, me) and not _alive(owner)
    ]
    if orphans:
        _kill_all(orphans)
    if shutil.which("pg_lsclusters") and shutil.which("pg_dropcluster"):
        for version, name in _clusters():
            owner = _owner_of(name.removeprefix(CLUSTER_PREFIX))
            if name.startswith(CLUSTER_PREFIX) and owner not in (None, me) and not _alive(owner):
                with contextlib.suppress(Exception):
                    _run(["pg_dropcluster", "--stop", version, name], timeout=60)
    for path in Path(tempfile.gettempdir()).glob(f"{DIR_PREFIX}*"):
        owner = _owner_of(path.name.removeprefix(DIR_PREFIX))
        if owner not in (None, me) and not _alive(owner):
            shutil.rmtree(path, ignore_errors=True)


# -- PostgreSQL ----------------------------------------------------------------------------


def _clusters() -> list[tuple[str, str]]:
    """(version, name) of every cluster postgresql-common knows."""
    out = _run(["pg_lsclusters", "--no-header"], timeout=30)
    return [(line.split()[0], line.split()[1]) for line in out.splitlines() if line.strip()]


def postgres_version() -> str | None:
    """The newest PostgreSQL server installed under /usr/lib/postgresql, e.g. "15"."""
    root = Path("/usr/lib/postgresql")
    versions = [p.name for p in root.glob("*") if (p / "bin" / "initdb").exists()]
    numeric = [v for v in versions if re.fullmatch(r"\d+(\.\d+)?", v)]
    return max(numeric, key=lambda v: tuple(int(x) for x in v.split("."))) if numeric else None


def _postgres_uid() -> int | None:
    try:
        return pwd.getpwnam("postgres").pw_uid
    except KeyError:
        return None


# Written into the template's postgresql.auto.conf, which every copy reads last.
_FAST_SETTINGS = """\
# celery_durable integration tests: a throwaway cluster, fast rather than safe against
# an operating-system crash. A PostgreSQL crash still keeps every commit: each one writes
# its WAL to the kernel before it returns (synchronous_commit stays on; turned off, an
# immediate stop loses the last commits, which would break the crash tests).
listen_addresses = '127.0.0.1'
fsync = off
full_page_writes = off
shared_buffers = 16MB
max_connections = 100
"""

_templates: dict[str, Path] = {}


class OwnPostgres:
    """A PostgreSQL cluster of its own on a spare port, with an empty database in it.

    ``url`` (SQLAlchemy) and ``dsn`` (libpq/psycopg) stay the same across
    :meth:`stop`, :meth:`start` and :meth:`restart`, and the data is kept.
    """

    def __init__(self, database: str = "durable") -> None:
        self.database = database
        self.version = postgres_version() or ""
        self.port = free_port()
        self.name = f"{CLUSTER_PREFIX}{os.getpid()}_{next(_counter)}"
        self.directory: Path | None = None
        self.running = False
        self._created = False

    @staticmethod
    def unavailable() -> str | None:
        """Why private clusters cannot be made on this machine, or None."""
        for tool in ("pg_createcluster", "pg_dropcluster", "pg_lsclusters"):
            if shutil.which(tool) is None:
                return f"{tool} is missing (Debian package postgresql-common)"
        if postgres_version() is None:
            return "no PostgreSQL server under /usr/lib/postgresql (package postgresql-15)"
        uid = _postgres_uid()
        if uid is None:
            return "there is no postgres user"
        if os.geteuid() not in (0, uid):
            return "private PostgreSQL clusters need root or the postgres user"
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            return "runuser is missing (package util-linux)"
        return None

    # -- addresses

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the test database."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def dsn(self) -> str:
        """libpq URL of the test database (for ``psycopg.connect``)."""
        return self.dsn_for(self.database)

    def dsn_for(self, database: str) -> str:
        """libpq URL of another database of this cluster."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        assert self.directory is not None, "the cluster was not created"
        return self.directory / "postgresql.log"

    # -- life cycle

    def __enter__(self) -> OwnPostgres:
        try:
            self.create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def create(self, timeout: float = 60.0) -> None:
        """Create the cluster, start it and create the database."""
        reason = self.unavailable()
        if reason is not None:
            raise RuntimeError(reason)
        sweep_orphans()
        template = self._template(timeout)
        self.directory = _new_dir("pg")
        data = self.directory / "data"
        # cp -a keeps the postgres owner and the 0700 mode the server insists on.
        _run(["cp", "-a", str(template), str(data)], timeout=timeout)
        self._chown_to_postgres(self.directory)
        self._created = True
        _run(
            [
                "pg_createcluster",
                self.version,
                self.name,
                "--datadir",
                str(data),
                "--port",
                str(self.port),
                "--logfile",
                str(self.log_path),
                # Never started at boot or by "pg_ctlcluster ... all".
                "--start-conf",
                "manual",
            ],
            timeout=timeout,
        )
        self.start(timeout)
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True, connect_timeout=5) as c:
            c.execute(f'CREATE DATABASE "{self.database}"')

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until it accepts connections."""
        assert self._created and self.directory is not None, "call create() first"
        if self.running:
            return
        self._pg_ctl(
            "start",
            "-w",
            "-t",
            str(int(timeout)),
            "-l",
            str(self.log_path),
            "-o",
            f"-c config_file=/etc/postgresql/{self.version}/{self.name}/postgresql.conf",
            timeout=timeout + 10,
        )
        self.running = True
        wait_until(self._accepts, timeout, f"PostgreSQL on port {self.port} to accept")

    def stop(
        self, mode: Literal["smart", "fast", "immediate"] = "fast", timeout: float = 60.0
    ) -> None:
        """Stop the server. "fast" rolls back open transactions and disconnects clients;
        "immediate" is a crash (no checkpoint; the next start recovers from the WAL)."""
        if not self.running:
            return
        self._pg_ctl("stop", "-w", "-m", mode, "-t", str(int(timeout)), timeout=timeout + 10)
        self.running = False

    def restart(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop and start again on the same port."""
        self.stop(mode)
        self.start()

    def terminate_connections(self, database: str | None = None) -> int:
        """Kill every client connection to ``database`` (default: the test database), as
        a failover or an administrator would; returns how many were killed."""
        with psycopg.connect(self.dsn_for("postgres"), autocommit=True, connect_timeout=5) as c:
            # With a timeout (PostgreSQL 14+), pg_terminate_backend waits until the
            # backend has exited, so the next query on a killed connection fails for sure.
            wait = ", 10000" if c.info.server_version >= 140000 else ""
            row = c.execute(
                f"SELECT count(*) FILTER (WHERE pg_terminate_backend(pid{wait}))"
                " FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()"
                " AND backend_type = 'client backend'",
                (database or self.database,),
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        """Stop the server and remove the cluster and its files (safe to call twice)."""
        try:
            if self.running:
                with contextlib.suppress(Exception):
                    self.stop("immediate")
            if self._created:
                self._created = False
                # --stop also ends a server that a failed pg_ctl left running.
                _run(["pg_dropcluster", "--stop", self.version, self.name], timeout=60)
        finally:
            self.running = False
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)

    # -- helpers

    def _accepts(self) -> bool:
        try:
            with psycopg.connect(self.dsn_for("postgres"), connect_timeout=2) as conn:
                conn.execute("SELECT 1")
        except psycopg.OperationalError:
            return False
        return True

    def _pg_ctl(self, *args: str, timeout: float) -> None:
        assert self.directory is not None
        pg_ctl = f"/usr/lib/postgresql/{self.version}/bin/pg_ctl"
        try:
            _run(
                self._as_postgres([pg_ctl, *args, "-s", "-D", str(self.directory / "data")]),
                timeout,
            )
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n--- {self.log_path} ---\n{_tail(self.log_path)}") from None

    @staticmethod
    def _as_postgres(command: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *command]
        return command

    @staticmethod
    def _chown_to_postgres(path: Path) -> None:
        uid = _postgres_uid()
        if os.geteuid() == 0 and uid is not None:
            os.chown(path, uid, -1)

    def _template(self, timeout: float) -> Path:
        """An initialised data directory to copy, made once per test process."""
        template = _templates.get(self.version)
        if template is not None and template.exists():
            return template
        parent = _new_dir("pg-template")
        self._chown_to_postgres(parent)
        template = parent / "data"
        initdb = f"/usr/lib/postgresql/{self.version}/bin/initdb"
        _run(
            self._as_postgres(
                [
                    initdb,
                    "--pgdata",
                    str(template),
                    "--username",
                    "postgres",
                    "--auth",
                    "trust",
                    "--encoding",
                    "UTF8",
                    # C is always there; a named locale may not be generated.
                    "--locale",
                    "C",
                    "--no-sync",
                    "--no-instructions",
                ]
            ),
            timeout,
        )
        (template / "postgresql.auto.conf").write_text(_FAST_SETTINGS)
        self._chown_to_postgres(template / "postgresql.auto.conf")
        if not _templates:
            atexit.register(remove_templates)
        _templates[self.version] = template
        return template


def remove_templates() -> None:
    """Delete the template data directories this test process made."""
    for template in _templates.values():
        shutil.rmtree(template.parent, ignore_errors=True)
    _templates.clear()


# -- Redis ---------------------------------------------------------------------------------


class OwnRedis:
    """A ``redis-server`` of its own on a spare port.

    By default nothing is written to disk, so every :meth:`start` is empty. With
    ``persistent=True`` every write is in an append-only file synced before the reply,
    and :meth:`stop` then :meth:`start` keeps all data (use :meth:`restart_empty` to lose
    it anyway).
    """

    def __init__(self, persistent: bool = False) -> None:
        self.persistent = persistent
        self.port = free_port()
        self.directory = _new_dir("redis")
        self._proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def unavailable() -> str | None:
        """Why a private Redis cannot be started here, or None."""
        if shutil.which("redis-server") is None:
            return "redis-server is missing (Debian package redis-server)"
        return None

    @property
    def url(self) -> str:
        """Redis URL (database 0)."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> OwnRedis:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def command(self) -> list[str]:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        return [
            str(shutil.which("redis-server") or "redis-server"),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            *persistence,
            "--daemonize",
            "no",
            "--dir",
            str(self.directory),
        ]

    def start(self, timeout: float = 30.0) -> None:
        """Start the server (again, on the same port) and wait until it answers PING."""
        if self.running:
            return
        sweep_orphans()
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.directory,
                env=_owner_env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(
            self._answers,
            timeout,
            f"redis-server on port {self.port} to answer",
            abort=self._exited,
        )

    def stop(self) -> None:
        """SIGKILL the server, as a crash would (what was not persisted is gone)."""
        _stop_process(self._proc, signal.SIGKILL, timeout=30)

    def restart_empty(self) -> None:
        """Stop and start again on the same port with no data at all."""
        self.stop()
        for leftover in ("appendonlydir", "appendonly.aof", "dump.rdb"):
            path = self.directory / leftover
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        self.start()

    def close(self) -> None:
        """Stop the server and remove its directory (safe to call twice)."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _answers(self) -> bool:
        try:
            with redis.Redis(port=self.port, socket_connect_timeout=1, socket_timeout=1) as c:
                return bool(c.ping())
        except redis.RedisError:
            return False

    def _exited(self) -> str | None:
        if self._proc is not None and self._proc.poll() is not None:
            return f"redis-server exited with {self._proc.returncode}:\n{_tail(self.log_path)}"
        return None


# -- RabbitMQ ------------------------------------------------------------------------------

_RABBITMQ_SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")


class OwnRabbitMQ:
    """A RabbitMQ node of its own (``durable-it-<pid>-<n>@localhost``) on spare ports.

    Durable queues and persistent messages survive :meth:`restart`, as on a real broker;
    ``restart(kill=True)`` is a crash (SIGKILL) rather than a clean shutdown.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.dist_port = free_port(exclude={self.port})
        self.epmd_port = free_port(exclude={self.port, self.dist_port})
        self.nodename = f"durable-it-{os.getpid()}-{next(_counter)}@localhost"
        self.directory = _new_dir("rabbitmq")
        self._server: subprocess.Popen[bytes] | None = None
        self._epmd: subprocess.Popen[bytes] | None = None
        self._write_config()

    @staticmethod
    def unavailable() -> str | None:
        """Why a private RabbitMQ node cannot be started here, or None."""
        if not _RABBITMQ_SERVER.exists():
            return f"{_RABBITMQ_SERVER} is missing (Debian package rabbitmq-server)"
        if shutil.which("epmd") is None:
            return "epmd is missing (Debian package erlang-base)"
        return None

    @property
    def url(self) -> str:
        """AMQP URL of the default vhost (user guest, allowed from 127.0.0.1)."""
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    @property
    def log_path(self) -> Path:
        """The node's main log."""
        return self.directory / "log" / f"{self.nodename}.log"

    @property
    def running(self) -> bool:
        return self._server is not None and self._server.poll() is None

    def __enter__(self) -> OwnRabbitMQ:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _write_config(self) -> None:
        for sub in ("home", "mnesia", "log"):
            (self.directory / sub).mkdir()
        # Empty on purpose: instead of the machine's file, which names the shared node.
        (self.directory / "rabbitmq-env.conf").write_text("")
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            # Never block publishers because a CI disk is nearly full.
            "disk_free_limit.absolute = 1MB\n"
            "log.console = false\n"
        )
        # No plugins: the management plugin alone adds seconds to every boot.
        (self.directory / "enabled_plugins").write_text("[].\n")

    def environment(self) -> dict[str, str]:
        """The node's environment (also what ``rabbitmqctl -n`` would need to reach it)."""
        d = self.directory
        # Nothing of a caller's RabbitMQ or Erlang settings may point us at the shared node.
        base = {k: v for k, v in _owner_env().items() if not k.startswith(("RABBITMQ_", "ERL_"))}
        return {
            **base,
            "HOME": str(d / "home"),  # the Erlang cookie is created here
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_PLUGINS_EXPAND_DIR": str(d / "plugins-expand"),
            "RABBITMQ_NODENAME": self.nodename,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 60.0) -> None:
        """Start the node (again, same name, ports and data) and wait until it takes AMQP
        connections."""
        if self.running:
            return
        sweep_orphans()
        env = self.environment()
        if self._epmd is None or self._epmd.poll() is not None:
            # Our own port mapper in the foreground, so that it is ours to end; otherwise
            # the node would start a daemon one that outlives it.
            with (self.directory / "epmd.log").open("ab") as log:
                self._epmd = subprocess.Popen(
                    [str(shutil.which("epmd")), "-port", str(self.epmd_port)],
                    cwd=self.directory,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            wait_until(lambda: port_open(self.epmd_port), 10, f"epmd on {self.epmd_port}")
        with (self.directory / "server.log").open("ab") as log:
            self._server = subprocess.Popen(
                [str(_RABBITMQ_SERVER)],
                cwd=self.directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_until(
            self._accepts,
            timeout,
            f"RabbitMQ node {self.nodename} to accept AMQP connections",
            interval=0.2,
            abort=self._exited,
        )

    def stop(self, kill: bool = False, timeout: float = 60.0) -> None:
        """Stop the node: a clean shutdown, or with ``kill=True`` SIGKILL (a crash)."""
        _stop_process(self._server, signal.SIGKILL if kill else signal.SIGTERM, timeout)
        # Belt and braces: the next start needs the port, and a client must see it closed.
        wait_until(lambda: not port_open(self.port), timeout, f"port {self.port} to close")

    def restart(self, kill: bool = False) -> None:
        """Stop and start again with the same name, port and data."""
        self.stop(kill=kill)
        self.start()

    def close(self) -> None:
        """Kill the node and its epmd and remove its files (safe to call twice)."""
        try:
            self.stop(kill=True)
            _stop_process(self._epmd, signal.SIGKILL, timeout=30)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _accepts(self) -> bool:
        # py-amqp, not kombu: kombu's connect() sleeps 2 s before retrying a refused port.
        conn = amqp.Connection(f"127.0.0.1:{self.port}", connect_timeout=1)
        try:
            conn.connect()
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                conn.close()
        return True

    def _exited(self) -> str | None:
        if self._server is not None and self._server.poll() is not None:
            return (
                f"rabbitmq-server exited with {self._server.returncode}:\n"
                f"{_tail(self.directory / 'server.log')}\n{_tail(self.log_path)}"
            )
        return None
