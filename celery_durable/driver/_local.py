"""Driving a run's next turn where it is cheapest: in the process that keeps the run's
coroutine suspended, without a broker message.

A step's outcome is recorded in the worker process that ran the step. Sending a wake
through the broker then costs a message, a trip through the worker's consumer and pool,
and, on a prefork worker, usually a replay of the whole history: the wake lands on any
child, rarely the one that keeps the run's coroutine. Instead:

* each process that drives a turn commits, with the turn, its own *holder id* (an id no
  other process has, naming the machine) and keeps listening on a Unix datagram socket
  named after it;
* the recorder that sets a run's wake flag learns the holder from that same statement:
  a holder on this machine is handed the run by one datagram; with no holder, or one
  that is gone, the recorder's own process drives the run (if it has the workflow and
  consumes its queue), and holds it from then on;
* turns taken this way run on a few threads of the receiving process (never in the
  pool's own task slot, so a step's time limits never interrupt a turn), and one run
  is driven by one thread at a time: a wake for a run being driven makes that thread
  look once more instead of starting a second turn (which would replay and race).

Nothing here is needed for correctness. A datagram, a thread or a whole process lost
leaves the run's wake flag set in the store, and the sweeper wakes it within
``durable_stall_timeout``, as it does for a lost wake message; duplicate turns are
fenced in the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import struct
import threading
import uuid
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery

from .._config import store_for
from ..worker import OutcomeHint, install_local_driver, publish_wake, runs_tasks
from ..worker._identity import machine
from ._driver import RunDriver
from ._handover import CREDENTIALS, DATAGRAM, PREFIX, VOUCHED, address, hand_over, read_hand_over

__all__ = ["LocalTurns", "local_turns"]

logger = logging.getLogger(__name__)

Workflow = Callable[..., Coroutine[Any, Any, Any]]

#: Microseconds a hand-over waits for room in its holder's socket queue.
HAND_OVER_WAIT_US = 50_000

#: Threads per process that drive handed-over turns: enough to overlap one turn's
#: database round trips with another's work, few enough not to crowd the pool.
TURN_THREADS = 4


def workflow_code(app: Celery, workflow: str) -> Workflow | None:
    """The ``async def`` of ``workflow`` if this process has it (its driver task)."""
    durable = getattr(app.tasks.get(workflow), "durable", None)
    fn = getattr(durable, "fn", None)
    return fn if callable(fn) else None


def consumes_driver_queue(app: Celery, workflow: str, options: Mapping[str, Any]) -> bool:
    """Whether this worker takes the run's wake messages (the queue they are routed to).

    A deployment that routes workflows to some workers only keeps their turns there.
    """
    try:
        route = app.amqp.router.route(dict(options), workflow)
        queue = route.get("queue")
        name = getattr(queue, "name", queue)
        return name in app.amqp.queues.consume_from
    except Exception:  # an unusual router: be conservative
        return False


class LocalTurns:
    """This process's local driving: its holder id, its socket and its turn threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._id: str | None = None
        self._socket: socket.socket | None = None
        self._sender: socket.socket | None = None
        self._threads: ThreadPoolExecutor | None = None
        self._app: Celery | None = None
        self._closed = False
        # Runs being driven here, each with whether a wake came in meanwhile.
        self._driving: dict[str, bool] = {}

    def after_fork(self) -> None:
        """In a forked child: the parent's socket, threads and id are not its own (and a
        lock another thread held at the fork would stay held)."""
        self.__init__()  # type: ignore[misc]

    # -- identity and socket ------------------------------------------------------------

    def holder_id(self, app: Celery) -> str | None:
        """The id this process commits with its turns, listening for handed-over runs;
        None if it cannot listen (no Unix sockets, no machine identity)."""
        with self._lock:
            if self._id is None and not self._closed:
                self._listen(app)
            return self._id

    def _listen(self, app: Celery) -> None:
        where = machine()
        if where is None or not hasattr(socket, "AF_UNIX"):
            self._closed = True  # cannot tell machines apart: hand nothing over
            return
        holder = f"{PREFIX}/{uuid.uuid4().hex}@{where}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            if VOUCHED:
                # The kernel names each datagram's sender: a hint is used only from a
                # process of this user.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            sock.bind(address(holder))
        except OSError:
            sock.close()
            logger.warning("celery_durable: cannot listen for local turns", exc_info=True)
            self._closed = True
            return
        self._socket, self._id, self._app = sock, holder, app
        self._sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        # A holder's queue holds few datagrams (net.unix.max_dgram_qlen, 10 by default)
        # and its listener empties it quickly: wait that little rather than drive the
        # run here, which would replay it; a holder that is gone refuses at once.
        # (A kernel timeout on a blocking socket: Python's own timeout would poll the
        # sender's socket, which is always writable, and spin.)
        self._sender.setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", 0, HAND_OVER_WAIT_US)
        )
        self._threads = ThreadPoolExecutor(TURN_THREADS, thread_name_prefix="durable-turn")
        listener = threading.Thread(
            target=self._receive, args=(sock,), name="durable-turns", daemon=True
        )
        listener.start()

    def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                data, ancillary, _flags, _sender = sock.recvmsg(DATAGRAM, CREDENTIALS)
            except OSError:
                return  # closed by drain()
            app = self._app
            handed = read_hand_over(data, ancillary)
            if app is None or handed is None:
                continue
            workflow, run_id, hint = handed
            fn = workflow_code(app, workflow)
            if fn is None or not self._submit(app, workflow, fn, run_id, hint):
                _wake_by_broker(app, workflow, run_id)

    # -- taking wakes ---------------------------------------------------------------------

    def __call__(
        self,
        app: Celery,
        workflow: str,
        run_id: str,
        options: Mapping[str, Any],
        holder: str | None,
        hint: OutcomeHint | None = None,
    ) -> bool:
        """Drive the run's next turn here or hand it to its holder; False if neither.

        ``hint``: the outcome whose recording woke the run, passed on to the holder.
        """
        mine = self.holder_id(app)
        if (
            holder is not None
            and holder != mine
            and self._hand_over(holder, workflow, run_id, hint)
        ):
            return True
        fn = workflow_code(app, workflow)
        if mine is None or fn is None or not consumes_driver_queue(app, workflow, options):
            return False
        # A hint is good only to the process whose commit it follows: this one, if it
        # is the holder.
        return self._submit(app, workflow, fn, run_id, hint if holder == mine else None)

    def _hand_over(self, holder: str, workflow: str, run_id: str, hint: OutcomeHint | None) -> bool:
        sender = self._sender
        if sender is None or not holder.endswith(f"@{machine()}"):
            return False
        try:
            sender.sendto(hand_over(workflow, run_id, hint), address(holder))
        except OSError:
            return False  # gone (refused, no such socket) or swamped: drive it here
        return True

    def _submit(
        self,
        app: Celery,
        workflow: str,
        fn: Workflow,
        run_id: str,
        hint: OutcomeHint | None = None,
    ) -> bool:
        with self._lock:
            threads = self._threads
            if threads is None or self._closed:
                return False
        if not self._mark(run_id):
            return True  # the thread driving it looks once more (and reads)
        try:
            threads.submit(self._drive, app, workflow, fn, run_id, hint)
        except RuntimeError:  # shut down meanwhile
            with self._lock:
                self._driving.pop(run_id, None)
            return False
        return True

    def _drive(
        self, app: Celery, workflow: str, fn: Workflow, run_id: str, hint: OutcomeHint | None
    ) -> None:
        try:
            self._turns(app, workflow, fn, run_id, self._id, hint)
        except Exception:
            # The store may be away, or the turn failed in a way a worker should retry:
            # a wake message lets any worker try; failing that, the sweeper will.
            logger.exception("workflow %s[%s]: local turn failed; sending a wake", workflow, run_id)
            _wake_by_broker(app, workflow, run_id)

    def drive_here(self, app: Celery, workflow: str, fn: Workflow, run_id: str) -> str | None:
        """Drive the run in the calling thread (a wake message's task), as its holder.

        If a turn thread is driving it right now, that thread looks once more instead.
        """
        holder = self.holder_id(app) if runs_tasks() else None
        if not self._mark(run_id):
            return None
        return self._turns(app, workflow, fn, run_id, holder)

    def _mark(self, run_id: str) -> bool:
        """Mark the run as driven in this process; False if it is already (its driver
        is told to look once more)."""
        with self._lock:
            if run_id in self._driving:
                self._driving[run_id] = True
                return False
            self._driving[run_id] = False
            return True

    def _turns(
        self,
        app: Celery,
        workflow: str,
        fn: Workflow,
        run_id: str,
        holder: str | None,
        hint: OutcomeHint | None = None,
    ) -> str | None:
        """Drive a run marked by :meth:`_mark` until no wake came in meanwhile."""
        try:
            while True:
                driver = RunDriver(app, workflow, fn, run_id, holder=holder, hint=hint)
                hint = None  # a later look reads what came meanwhile
                status = driver.drive()
                with self._lock:
                    # Unmarked under the lock that a wake takes to ask for more: none
                    # falls between this look and the unmarking.
                    again = self._driving[run_id]
                    if not again or driver.absorbed:
                        del self._driving[run_id]
                    else:
                        self._driving[run_id] = False
                if not again:
                    return status
                if driver.absorbed:
                    driver.wake_later(status)  # a fan-in: let its outcomes gather
                    return status
        except BaseException:
            with self._lock:
                self._driving.pop(run_id, None)
            raise

    def drain(self, timeout: float) -> None:
        """Stop listening and wait (at most ``timeout`` s) for the turns taken."""
        with self._lock:
            if self._pid != os.getpid():
                return
            self._closed = True
            # No longer a holder: turns committed from now on name no process.
            self._id = None
            sock, threads, sender = self._socket, self._threads, self._sender
            self._socket = self._sender = None
        if sender is not None:
            sender.close()
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        if threads is None:
            return
        done = threading.Event()

        def wait() -> None:
            threads.shutdown(wait=True)
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        if not done.wait(timeout):
            logger.warning("celery_durable: local turns still running at exit")
            return
        # A worker started again in this process (an embedded one, in tests) listens anew.
        with self._lock:
            self._reset()


def _wake_by_broker(app: Celery, workflow: str, run_id: str) -> None:
    """Send the run's wake to the broker, routed as the run's own (best effort)."""
    try:
        run = store_for(app).get_run(run_id)
        if run is not None:
            publish_wake(app, workflow, run_id, run.options)
    except Exception:
        logger.warning("workflow %s[%s]: no wake sent; the sweeper will", workflow, run_id)


#: This process's local driving; installed in the worker layer on import.
local_turns = LocalTurns()
install_local_driver(local_turns, local_turns.drain)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=local_turns.after_fork)
