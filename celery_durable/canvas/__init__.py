"""Celery's canvas inside workflows (``await`` a signature)."""

from ._await import install

__all__ = ["install"]
