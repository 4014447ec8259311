"""Celery's canvas, made durable.

* Inside a workflow, ``await`` any signature or canvas (``chain``, ``group``, ``chord``,
  ``chunks``, ``starmap``, nested to any depth): each task runs as a durable step and the
  await returns what the canvas's ``AsyncResult.get()`` would.
* From outside, :func:`durable` runs an existing canvas as one durable workflow run::

      from celery_durable.canvas import durable

      handle = durable(chord(group(fetch.s(u) for u in urls), merge.s())).apply_async()
      handle.get(timeout=60)

Parts: ``_shapes`` (Celery's own rules for reading a canvas), ``_walk`` (a canvas run as
workflow code on the deterministic loop), ``_await`` (what makes a signature awaitable),
``_durable`` (the built-in workflow that runs a canvas from outside), ``_errbacks``.

Imports the runtime, the decorator and handles of the public API, the codec and Celery's
canvas; nothing imports it but the package's ``__init__`` (a test holds the rule).
"""

from . import _errbacks  # noqa: F401 - defines the built-in task a failed chord needs
from ._await import install
from ._durable import CANVAS_WORKFLOW, DurableCanvas, durable

__all__ = ["CANVAS_WORKFLOW", "DurableCanvas", "durable", "install"]
