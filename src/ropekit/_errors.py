"""The one error class of ropekit."""

from __future__ import annotations

__all__ = ["RopeError"]


class RopeError(ValueError):
    """Bad input to a ropekit function.

    Every message says what was expected, what was received and how to fix it.
    It subclasses :class:`ValueError`, so ``except ValueError`` also catches it.
    """


def fail(expected: str, received: str, fix: str) -> RopeError:
    """Build a :class:`RopeError` in the house format (``raise fail(...)``)."""
    return RopeError(f"expected {expected}, got {received}. Fix: {fix}")
