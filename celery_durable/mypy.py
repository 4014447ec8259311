"""A mypy plugin that teaches mypy what importing celery_durable does to signatures.

celery_durable makes Celery's ``Signature`` awaitable inside workflows; Celery's type
stubs cannot know that, so ``await charge.s(...)`` is an error under ``mypy --strict``.
With this plugin, ``Signature[R]`` is awaitable and the await has type ``R``, so
``receipt: str = await charge.s(order_id, 1999)`` checks. Enable it in your mypy config::

    [tool.mypy]
    plugins = ["celery_durable.mypy"]
"""

from __future__ import annotations

from collections.abc import Callable

from mypy.plugin import ClassDefContext, Plugin
from mypy.plugins.common import add_method_to_class
from mypy.types import AnyType, NoneType, Type, TypeOfAny, TypeVarType

__all__ = ["plugin"]

_SIGNATURE = "celery.canvas.Signature"


def _make_signature_awaitable(ctx: ClassDefContext) -> None:
    info = ctx.cls.info
    if info.fullname != _SIGNATURE or "__await__" in info.names:
        return
    result: Type = AnyType(TypeOfAny.special_form)
    for type_var in info.defn.type_vars:
        if isinstance(type_var, TypeVarType):
            result = type_var
            break
    generator = ctx.api.named_type(
        "typing.Generator", [AnyType(TypeOfAny.special_form), NoneType(), result]
    )
    add_method_to_class(ctx.api, ctx.cls, "__await__", args=[], return_type=generator)


class CeleryDurablePlugin(Plugin):
    """Adds ``__await__`` to ``celery.canvas.Signature``."""

    def get_base_class_hook(self, fullname: str) -> Callable[[ClassDefContext], None] | None:
        # Signature derives from dict[str, Any] and Generic[R]; the hook sees each class
        # defined with one of those bases and picks out Signature itself.
        if fullname in ("builtins.dict", "typing.Generic"):
            return _make_signature_awaitable
        return None


def plugin(version: str) -> type[Plugin]:
    """Entry point mypy calls."""
    return CeleryDurablePlugin
