"""What Celery makes of a canvas, as plain functions over signatures (no runtime, no I/O).

Celery decides a canvas's meaning in several places: ``chain.prepare_steps`` splices
nested chains, unrolls one-member groups, drops empty groups and turns a group followed
by anything into a chord; ``group._prepared`` flattens nested groups; ``chord.run`` moves
the chord's options and callbacks onto its body; the result backends decide which
errbacks a failed chord calls. The walk (``_walk``) runs a canvas on the workflow's
loop; this module holds those rules, each next to the Celery code it mirrors, so that a
canvas awaited in a workflow means exactly what it means to Celery.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from celery.canvas import (
    Signature,
    _chain,
    chord,
    chunks,
    group,
    maybe_signature,
    xstarmap,
)
from celery.utils.functional import chunks as _chunk_items
from celery.utils.functional import maybe_list

__all__ = [
    "PER_MESSAGE_OPTIONS",
    "add_body_callbacks",
    "as_signature",
    "chain_steps",
    "chord_error_calls",
    "chunks_group",
    "copy_canvas",
    "group_members",
    "is_chunks",
    "link_errback",
    "merge_call",
    "merge_options",
    "to_data",
    "yields_group",
]

#: Options that describe one message, not the step: the driver gives each dispatch its
#: own id, and Celery's chord/chain bookkeeping has no place in a durable run.
PER_MESSAGE_OPTIONS = frozenset(
    {
        "task_id",
        "parent_id",
        "root_id",
        "reply_to",
        "chord",
        "chain",
        "group_id",
        "group_index",
        "producer",
        "publisher",
        "connection",
        "add_to_parent",
    }
)

# Options Signature._merge never lets a caller override (celery.canvas.Signature).
_IMMUTABLE_OPTIONS = frozenset({"group_id", "stamped_headers"})


# Keys of a canvas signature's kwargs that hold signatures or lazy lists, not user values.
_CANVAS_TYPES = frozenset({"chain", "group", "chord"})
_CANVAS_TASKS = frozenset({"celery.chunks", "celery.map", "celery.starmap"})


def _sequence(value: Any) -> list[Any]:
    if isinstance(value, dict):  # a group where a list of signatures was expected
        return [to_data(value)]
    # iter(): a celery regen is a list subclass whose list storage stays empty.
    return [to_data(item) for item in iter(value)]


def to_data(sig: Any) -> Any:
    """A signature (or its dict form) as plain dicts and lists: members, bodies, callbacks
    and errbacks converted too, lazy lists (``regen``, generators given to ``group``)
    materialized. The tasks' own arguments are left as they are.

    The result encodes with the app's serializer and rebuilds with
    :func:`celery.canvas.signature`.
    """
    if not isinstance(sig, dict):
        return sig
    data = dict(sig.items())
    data["args"] = tuple(data.get("args") or ())
    kwargs = dict(data.get("kwargs") or {})
    if data.get("subtask_type") in _CANVAS_TYPES or data.get("task") in _CANVAS_TASKS:
        for key in ("tasks", "header"):
            if kwargs.get(key) is not None:
                kwargs[key] = _sequence(kwargs[key])
        for key in ("body", "task"):
            if isinstance(kwargs.get(key), dict):
                kwargs[key] = to_data(kwargs[key])
        if kwargs.get("it") is not None:
            kwargs["it"] = list(iter(kwargs["it"]))
    data["kwargs"] = kwargs
    options = dict(data.get("options") or {})
    for key in ("link", "link_error"):
        if options.get(key) is not None:
            options[key] = _sequence(maybe_list(options[key]))
    data["options"] = options
    return data


def as_signature(value: Any) -> Signature:
    """``value`` as a signature: a signature as it is, a dict rebuilt as the signature type
    its ``subtask_type`` names (``celery.canvas.maybe_signature``).

    Raises:
        TypeError: ``value`` is neither.
    """
    sig = maybe_signature(value)
    if not isinstance(sig, Signature):
        raise TypeError(f"expected a Celery signature or its dict form, got {value!r}")
    return sig


def copy_canvas(sig: Any) -> Signature:
    """A private deep copy of a signature (or its dict form), every member rebuilt as the
    signature type its ``subtask_type`` names.

    The walk changes options as Celery does when it sends a canvas (a chord's options move
    to its body, a chain's errbacks to its tasks); on a copy, the caller's canvas stays
    as it was.
    """
    return as_signature(to_data(sig))


def merge_options(own: Mapping[str, Any], call: Mapping[str, Any]) -> dict[str, Any]:
    """``own`` options overridden by the ``call`` options, as ``Signature._merge`` does."""
    immutable = _IMMUTABLE_OPTIONS | set(own.get("stamped_headers") or ())
    merged = dict(own)
    for key, value in call.items():
        if key not in immutable or key not in own:
            merged[key] = value
    return merged


def merge_call(
    sig: Signature, args: Iterable[Any], kwargs: Mapping[str, Any], options: Mapping[str, Any]
) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """The arguments and options a task is sent with when ``sig`` is applied with partial
    ``args``/``kwargs`` and call ``options`` (``Signature._merge``): partial args go
    first, partial kwargs win, and an immutable signature (``.si()``) takes neither."""
    merged = merge_options(sig.options, options)
    if sig.immutable:
        return tuple(sig.args), dict(sig.kwargs), merged
    return tuple(args) + tuple(sig.args), {**sig.kwargs, **kwargs}, merged


def _append_option(sig: Signature, key: str, value: Any) -> None:
    items = maybe_list(sig.options.get(key)) or []
    if value not in items:
        items = [*items, value]
    sig.options[key] = items


def link_errback(sig: Signature, errback: Signature) -> None:
    """Link ``errback`` to ``sig`` where Celery's ``link_error`` puts it.

    A group gives it to each member; a chord to its body (and to chords nested in its
    header, which do the same); anything else keeps it in its options (a chain then gives
    it to each of its tasks when it runs). Unlike ``chord.link_error`` this does not warn
    about ``task_allow_error_cb_on_chord_header``: the header keeps no errback, which is
    that setting's default.
    """
    if isinstance(sig, group):
        for member in sig.tasks:
            link_errback(as_signature(member), errback.clone())
    elif isinstance(sig, chord):
        for member in maybe_list(sig.tasks) or []:
            if isinstance(member, chord):
                link_errback(member, errback)
        if sig.body is not None:
            link_errback(as_signature(sig.body), errback)
    else:
        _append_option(sig, "link_error", errback)


def _link_callback(sig: Signature, callback: Signature) -> None:
    # Signature.link for each type: a chord links its body, a (non-empty) group its first
    # task with an immutable copy (the first task cannot pass on its siblings' results).
    if isinstance(sig, chord) and sig.body is not None:
        _link_callback(as_signature(sig.body), callback)
    elif isinstance(sig, group) and sig.tasks:
        _link_callback(as_signature(sig.tasks[0]), callback.clone().set(immutable=True))
    else:
        _append_option(sig, "link", callback)


def add_body_callbacks(body: Signature, callbacks: Iterable[Any], errbacks: Iterable[Any]) -> None:
    """Move a chord's ``link``/``link_error`` onto its body (``chord._add_body_callbacks``)."""
    for callback in callbacks:
        _link_callback(body, as_signature(callback).clone())
    for errback in errbacks:
        errback = as_signature(errback)
        if isinstance(body, group):
            _link_error_to_body_tasks(body, errback)
        else:
            _append_option(body, "link_error", errback)


def _link_error_to_body_tasks(sig: Signature, errback: Signature, as_group: bool = True) -> None:
    # celery.canvas._link_error_to_body_tasks: a group that has errbacks of its own takes
    # the new one there (its option replaces its tasks' errbacks when it runs).
    if isinstance(sig, group):
        if as_group and sig.options.get("link_error") is not None:
            _append_option(sig, "link_error", errback.clone())
        else:
            for member in sig.tasks:
                _link_error_to_body_tasks(as_signature(member), errback, as_group=False)
    elif isinstance(sig, chord):
        if sig.body is not None:
            _link_error_to_body_tasks(as_signature(sig.body), errback)
    else:
        _append_option(sig, "link_error", errback.clone())


def _unroll_group(sig: Signature) -> Signature:
    # celery.canvas.maybe_unroll_group: a group of one member is that member (#1656).
    if isinstance(sig, group) and len(sig.tasks) == 1:
        return as_signature(sig.tasks[0])
    return sig


def _is_empty_group(sig: Signature) -> bool:
    return isinstance(sig, group) and not sig.tasks


def _unchain(sig: _chain) -> list[Signature]:
    # chain.unchain_tasks, without its clones (the walk works on a private copy) and
    # without chord.link_error's deprecation warning.
    tasks = [as_signature(task) for task in sig.tasks]
    if tasks:
        for callback in maybe_list(sig.options.get("link")) or []:
            _link_callback(tasks[-1], as_signature(callback).clone())
        for errback in maybe_list(sig.options.get("link_error")) or []:
            for task in tasks:
                link_errback(task, as_signature(errback))
    return tasks


def is_chunks(sig: Signature) -> bool:
    """True for ``task.chunks(...)``, also once cloned or sent as a dict (Celery keeps no
    ``subtask_type`` for it, so a copy is a plain signature of ``celery.chunks``)."""
    return isinstance(sig, chunks) or sig.task == "celery.chunks"


def chunks_group(sig: Signature) -> group:
    """The group of ``celery.starmap`` tasks that ``chunks`` runs as (``chunks.group``)."""
    task, it, n = sig.kwargs["task"], sig.kwargs["it"], sig.kwargs["n"]
    return group(xstarmap(task, part) for part in _chunk_items(iter(it), n))


def chain_steps(
    tasks: Iterable[Any], callbacks: Iterable[Any] = (), errbacks: Iterable[Any] = ()
) -> list[Signature]:
    """The steps a chain of ``tasks`` runs, in order, as ``chain.prepare_steps`` makes them.

    Nested chains are spliced (their callbacks going to their last task and their
    errbacks to each of their tasks, as ``unchain_tasks`` does), one-member groups
    unrolled, empty groups dropped (unless nothing else is left), and a group followed
    by a step becomes a chord with that step as its body. ``callbacks`` (the chain's
    ``link``) go to the last step; ``errbacks`` (its ``link_error``) to every step.
    """
    pending: deque[Signature] = deque(as_signature(task) for task in tasks)
    flat: list[Signature] = []
    while pending:
        task = pending.popleft()
        unrolled = _unroll_group(task)
        if unrolled is not task:
            pending.appendleft(unrolled)
        elif isinstance(task, _chain):
            pending.extendleft(reversed(_unchain(task)))
        else:
            flat.append(task)
    kept = [task for task in flat if not _is_empty_group(task)]
    if not kept and flat:
        kept = flat[:1]  # a chain of empty groups gives an empty group's result: []
    steps: list[Signature] = []
    for task in reversed(kept):
        if isinstance(task, group) and steps:
            task = chord(task, body=steps.pop())
        steps.append(task)
    steps.reverse()
    if steps:
        for callback in callbacks:
            _link_callback(steps[-1], as_signature(callback).clone())
        for errback in errbacks:
            for step in steps:
                link_errback(step, as_signature(errback))
    return steps


def group_members(tasks: Iterable[Any]) -> list[Signature]:
    """The members of a group as ``group._prepared`` runs them: nested groups flattened
    (their own options dropped), empty chains left out."""
    members: list[Signature] = []
    for task in tasks:
        sig = as_signature(task)
        if isinstance(sig, group):
            members.extend(group_members(sig.tasks))
        elif isinstance(sig, _chain) and not sig.tasks:
            continue
        else:
            members.append(sig)
    return members


def yields_group(sig: Signature) -> bool:
    """True if applying ``sig`` gives a ``GroupResult``: a group, chunks, a chain ending in
    one, or a chord whose body does. A group of one such member gives that member's
    results rather than a list holding them (``group.apply_async``)."""
    if isinstance(sig, group) or is_chunks(sig):
        return True
    if isinstance(sig, chord):
        return sig.body is not None and yields_group(as_signature(sig.body))
    if isinstance(sig, _chain):
        steps = chain_steps(to_data(sig)["kwargs"]["tasks"])  # on a copy: it links things
        return bool(steps) and yields_group(steps[-1])
    return False


def _errbacks(sig: Signature) -> list[Any]:
    return list(maybe_list(sig.options.get("link_error")) or [])


def _result_errbacks(sig: Signature) -> list[Any]:
    # celery.backends.base._result_errbacks: a chord's result is its body's.
    errbacks: list[Any] = []
    while isinstance(sig, chord) and sig.body is not None:
        errbacks.extend(_errbacks(sig))
        sig = as_signature(sig.body)
    errbacks.extend(_errbacks(sig))
    if isinstance(sig, group):
        for member in sig.tasks:
            errbacks.extend(_result_errbacks(as_signature(member)))
    return errbacks


def _unique(items: Iterable[Any]) -> list[Any]:
    found: list[Any] = []
    for item in items:
        if item not in found:
            found.append(item)
    return found


def chord_error_calls(body: Signature) -> list[dict[str, Any]]:
    """The errback calls a chord whose header failed makes, as Celery's
    ``chord_error_from_stack`` does: the body's errbacks, called with a stand-in request
    for the body (which never ran); for a group body, each member's errbacks and the
    group's, once per member.

    Returns JSON-able ``{"request": {...}, "errbacks": [...]}`` entries (without task
    ids, which the caller assigns); entries without errbacks are left out.
    """
    if isinstance(body, group):
        own = _errbacks(body)
        calls = [
            {
                "request": {"task": member.task or "unknown"},
                "errbacks": _unique([*_result_errbacks(member), *own]),
            }
            for member in group_members(body.tasks)
        ]
    else:
        request = {
            "task": body.task or "unknown",
            "args": list(body.args),
            "kwargs": dict(body.kwargs),
            "subtask_type": body.subtask_type,
            "immutable": body.immutable,
        }
        calls = [{"request": request, "errbacks": _errbacks(body)}]
    return [
        {"request": call["request"], "errbacks": [to_data(e) for e in call["errbacks"]]}
        for call in calls
        if call["errbacks"]
    ]
