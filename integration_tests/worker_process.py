"""A real ``celery worker`` in a subprocess that a test can start, kill and restart.

Each worker runs in a session of its own, so that :meth:`WorkerProcess.kill` can SIGKILL
the whole process group at once (the main process and every prefork child), which is what
a machine losing power or the OOM killer taking the container does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
APP_MODULE = "integration_tests.wfapp"


def _group_alive(pgid: int) -> bool:
    """True while any process of group ``pgid`` is alive (zombies don't count)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path("/proc", pid, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces, so split after it.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


class WorkerProcess:
    """One worker node (``name@host``); restarting it reuses the node name, as a
    supervisor (systemd, Kubernetes) restarting a crashed worker would."""

    def __init__(
        self,
        nodename: str,
        env: Mapping[str, str],
        log_dir: Path,
        pool: str,
        concurrency: int,
        queues: Sequence[str],
        include: Sequence[str] = (),
        label: str | None = None,
        args: Sequence[str] = (),
    ) -> None:
        """``label`` names the worker's log files (default: the node name's first part;
        two workers sharing a node name need labels of their own); ``args`` are more
        ``celery worker`` options (``-E``)."""
        self.nodename = nodename
        self.label = label or nodename.split("@")[0]
        self.env = dict(env)
        self.log_dir = log_dir
        self.pool = pool
        self.concurrency = concurrency
        self.queues = list(queues)
        self.include = list(include)
        self.args = list(args)
        self.logs: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The worker's main process id."""
        assert self._proc is not None, "the worker is not running"
        return self._proc.pid

    def command(self) -> list[str]:
        command = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            APP_MODULE,
            "worker",
            "--hostname",
            self.nodename,
            "--pool",
            self.pool,
            "--concurrency",
            str(self.concurrency),
            "--queues",
            ",".join(self.queues),
            "--loglevel",
            "INFO",
            "--without-heartbeat",
            "--without-mingle",
            "--without-gossip",
        ]
        if self.include:
            command += ["--include", ",".join(self.include)]
        command += self.args
        if self.pool == "prefork":
            # Hand a task to a child only when it is idle, so a child blocked on purpose
            # never sits on other tasks.
            command += ["--optimization", "fair"]
        return command

    def start(self, wait_ready: bool = True, timeout: float = 60.0) -> WorkerProcess:
        """Start the worker (again); by default wait until it consumes."""
        assert self._proc is None or self._proc.poll() is not None, "already running"
        log = self.log_dir / f"{self.label}-{len(self.logs) + 1}.log"
        self.logs.append(log)
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p
        )
        with log.open("wb") as out:
            self._proc = subprocess.Popen(
                self.command(),
                cwd=REPO_ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for the worker's "ready" log line."""
        deadline = time.monotonic() + timeout
        needle = f"{self.nodename} ready.".encode()
        while time.monotonic() < deadline:
            if needle in self.logs[-1].read_bytes():
                return
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"worker {self.nodename} exited with {self._proc.returncode} before it "
                    f"was ready; see {self.logs[-1]}"
                )
            time.sleep(0.05)
        raise TimeoutError(f"worker {self.nodename} was not ready within {timeout} s")

    def kill(self) -> None:
        """SIGKILL the worker's whole process group and wait until every member is gone."""
        if self._proc is None or self._proc.poll() is not None:
            return
        pgid = self._proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        self._proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of worker {self.nodename} survived SIGKILL")
            time.sleep(0.02)

    def terminate(self, timeout: float = 120.0) -> int:
        """SIGTERM the main process (a warm shutdown, as a deploy or ``celery multi
        restart`` sends) and wait for the whole worker to exit; returns its exit code."""
        assert self._proc is not None and self._proc.poll() is None, "the worker is not running"
        pgid = self._proc.pid
        self._proc.send_signal(signal.SIGTERM)
        code = self._proc.wait(timeout=timeout)
        deadline = time.monotonic() + 30
        while _group_alive(pgid):
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of worker {self.nodename} outlived its exit")
            time.sleep(0.02)
        return code

    @property
    def running(self) -> bool:
        """Whether the worker's main process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def restart(self) -> WorkerProcess:
        """Start the worker again under the same node name."""
        return self.start()

    def child_pids(self) -> list[int]:
        """The prefork children of the main process."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        try:
            return [int(p) for p in children.read_text().split()]
        except OSError:
            return []

    def log_tail(self, lines: int = 150) -> str:
        """The end of every log this worker wrote, for a failure report."""
        parts = []
        for log in self.logs:
            try:
                text = log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            parts.append(f"==> {log} <==\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)
