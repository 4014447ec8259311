"""Settings on ``app.conf`` (all prefixed ``durable_``) and the per-app store.

| setting | default | meaning |
|---|---|---|
| ``durable_database_url`` | ``sqlite:///celery_durable.sqlite3`` | where runs and history live |
| ``durable_sweep_interval`` | ``10`` s | how often each worker's sweeper looks for lost work |
| ``durable_stall_timeout`` | ``30`` s | how long a message may look lost before it is re-sent |
| ``durable_timer_interval`` | ``0.5`` s | how often each worker fires due durable timers |
| ``durable_worker_timeout`` | ``30`` s | silence after which a worker counts as dead |
| ``durable_cache_size`` | ``1000`` | suspended runs kept in memory per process (0: always replay) |
| ``durable_max_redeliveries`` | ``3`` | times a step lost with its worker is sent again |
| ``durable_redelivery_backoff`` | ``1`` s | wait before the first re-send after a loss (doubling) |
| ``durable_result_expires`` | 7 days | age at which finished runs are deleted (0: never) |
"""

from __future__ import annotations

import os
import threading
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from functools import cached_property
from typing import Any

from celery import Celery
from celery.exceptions import ImproperlyConfigured
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from ._codec import Codec, accepted_types
from .store import LossPolicy, Store

__all__ = [
    "DEFAULT_DATABASE_URL",
    "DEFAULT_RESULT_EXPIRES",
    "Settings",
    "settings_for",
    "store_for",
]

DEFAULT_DATABASE_URL = "sqlite:///celery_durable.sqlite3"

#: A week, not Celery's day: a failed run can be retried (``WorkflowHandle.retry``) and
#: looked at (``celery durable show``) only while it exists, and a week spans a weekend.
DEFAULT_RESULT_EXPIRES = 7 * 24 * 3600.0


@dataclass(frozen=True)
class Settings:
    """The ``durable_*`` settings of one app, validated."""

    database_url: str
    sweep_interval: float
    stall_timeout: float
    timer_interval: float
    worker_timeout: float
    cache_size: int
    serializer: str
    max_redeliveries: int = 3
    redelivery_backoff: float = 1.0
    #: Seconds after its end at which a finished run is deleted; None: never.
    result_expires: float | None = DEFAULT_RESULT_EXPIRES
    #: Content types decoded for inputs, steps and signals (``accept_content``).
    accept: frozenset[str] = field(default_factory=lambda: accepted_types(None))
    #: Content types decoded for results (``result_accept_content``, else ``accept``).
    result_accept: frozenset[str] = field(default_factory=lambda: accepted_types(None))
    result_setting: str = "result_accept_content"

    @cached_property
    def codec(self) -> Codec:
        """Encodes with ``task_serializer``; decodes only what the app accepts."""
        return Codec(
            self.serializer,
            accept=self.accept,
            result_accept=self.result_accept,
            result_setting=self.result_setting,
        )

    @property
    def loss_policy(self) -> LossPolicy:
        """How steps lost with their worker are sent again."""
        return LossPolicy(max_losses=self.max_redeliveries, backoff=self.redelivery_backoff)


def _number(app: Celery, key: str, default: float, minimum: float, unit: str = "seconds") -> float:
    value: Any = app.conf.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not number >= minimum:  # also rejects NaN
        raise ImproperlyConfigured(
            f"app.conf.{key} must be a number >= {minimum:g} ({unit}), got {value!r}; "
            f"leave it unset for the default of {default:g}"
        )
    return number


def _expires(app: Celery) -> float | None:
    """``durable_result_expires``: seconds or a timedelta, like Celery's ``result_expires``;
    0 or None mean never."""
    value: Any = app.conf.get("durable_result_expires", DEFAULT_RESULT_EXPIRES)
    if value is None:
        return None
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    else:
        try:
            seconds = float(value) if not isinstance(value, bool) else float("nan")
        except (TypeError, ValueError):
            seconds = float("nan")
    if not seconds >= 0:  # also rejects NaN
        raise ImproperlyConfigured(
            f"app.conf.durable_result_expires must be a number of seconds >= 0 or a "
            f"timedelta, got {value!r}; write e.g. 7 * 24 * 3600 (a week, the default), or "
            "None to keep finished runs forever"
        )
    return seconds or None


#: The settings :func:`settings_for` reads, by the names they are stored under.
_READ = (
    "durable_database_url",
    "durable_sweep_interval",
    "durable_stall_timeout",
    "durable_timer_interval",
    "durable_worker_timeout",
    "durable_cache_size",
    "durable_max_redeliveries",
    "durable_redelivery_backoff",
    "durable_result_expires",
    "task_serializer",
    "accept_content",
    "result_accept_content",
)
_UNSET = object()
_read: weakref.WeakKeyDictionary[Celery, tuple[tuple[Any, ...], Settings]] = (
    weakref.WeakKeyDictionary()
)


def _as_read(conf: Any) -> tuple[Any, ...] | None:
    """What ``conf`` holds for the settings read (copies of containers, which can change
    in place); None if this is not a configuration whose layers can be looked at."""
    maps = getattr(conf, "maps", None)
    if not isinstance(maps, list):
        return None
    values = []
    for mapping in maps:
        get = getattr(mapping, "get", None)
        if get is None:
            return None
        for key in _READ:
            value = get(key, _UNSET)
            values.append(tuple(value) if isinstance(value, (list, set, tuple)) else value)
    return tuple(values)


def settings_for(app: Celery) -> Settings:
    """Read and check the app's ``durable_*`` settings.

    Called for every step and turn: the checked settings are kept while what the
    configuration holds for them stays the same (a look costs a microsecond, reading
    and checking them fifty).

    Raises:
        ImproperlyConfigured: a setting is missing its right type or the URL is malformed.
    """
    seen = _as_read(app.conf)
    kept = _read.get(app) if seen is not None else None
    if kept is not None and kept[0] == seen:
        return kept[1]
    settings = _settings_of(app)
    # Reading may have finished loading the configuration: keep what it holds now, if
    # nothing changed while it was read.
    after = _as_read(app.conf)
    if after is not None and (seen is None or len(seen) != len(after) or seen == after):
        _read[app] = (after, settings)
    return settings


def _settings_of(app: Celery) -> Settings:
    url = app.conf.get("durable_database_url") or DEFAULT_DATABASE_URL
    if not isinstance(url, str):
        raise ImproperlyConfigured(
            f"app.conf.durable_database_url must be an SQLAlchemy URL string, got {url!r}"
        )
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ImproperlyConfigured(
            f"app.conf.durable_database_url {url!r} is not a database URL: {exc}. Use e.g. "
            "'sqlite:///celery_durable.sqlite3' or 'postgresql+psycopg://host/dbname'."
        ) from exc
    if parsed.get_backend_name() == "postgresql" and parsed.get_driver_name() != "psycopg":
        raise ImproperlyConfigured(
            f"app.conf.durable_database_url {url!r} uses the driver "
            f"{parsed.get_driver_name()!r}; celery_durable uses psycopg 3: write "
            "'postgresql+psycopg://...' and install celery-durable[postgres]"
        )
    accept_content = app.conf.accept_content
    result_accept_content = app.conf.get("result_accept_content")
    return Settings(
        database_url=url,
        sweep_interval=_number(app, "durable_sweep_interval", 10.0, 0.05),
        stall_timeout=_number(app, "durable_stall_timeout", 30.0, 0.05),
        timer_interval=_number(app, "durable_timer_interval", 0.5, 0.01),
        worker_timeout=_number(app, "durable_worker_timeout", 30.0, 0.05),
        cache_size=int(_number(app, "durable_cache_size", 1000, 0, "runs")),
        serializer=str(app.conf.task_serializer or "json"),
        max_redeliveries=int(_number(app, "durable_max_redeliveries", 3, 0, "times")),
        redelivery_backoff=_number(app, "durable_redelivery_backoff", 1.0, 0),
        result_expires=_expires(app),
        accept=accepted_types(accept_content),
        result_accept=accepted_types(result_accept_content or accept_content),
        # Errors name the setting that decides: without result_accept_content, that is
        # accept_content.
        result_setting="result_accept_content" if result_accept_content else "accept_content",
    )


_stores: dict[str, Store] = {}
_stores_lock = threading.Lock()


def _reset_lock_after_fork() -> None:
    # A thread of the parent (the sweeper) may have held the lock when a prefork child
    # was forked; the child must not inherit it locked.
    global _stores_lock
    _stores_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_lock_after_fork)


def store_for(app: Celery) -> Store:
    """The (process-wide, per-URL) store of ``app``."""
    # A URL with a store was checked when the store was made: skip the checks then.
    store = _stores.get(app.conf.get("durable_database_url") or DEFAULT_DATABASE_URL)
    if store is not None:
        return store
    url = settings_for(app).database_url
    store = _stores.get(url)
    if store is None:
        with _stores_lock:
            store = _stores.get(url)
            if store is None:
                store = _stores[url] = Store(url)
    return store
