"""The operator's errors, and how kopf should treat them (STYLE guideline 7)."""

from __future__ import annotations

import kopf

from agent.images import errors as image_errors
from agent.kube.errors import APIError, Conflict, Invalid, NotFound

__all__ = ["APIError", "Conflict", "Invalid", "InvalidSpec", "NotFound", "to_kopf"]


class InvalidSpec(ValueError):
    """An ImagePrefetch spec the schema let through but the operator cannot use.

    Reported as condition ``Failed`` with reason ``InvalidSpec``; never retried until the
    spec changes. ``field`` is the dotted path (``spec.images[1]``).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def to_kopf(error: BaseException) -> BaseException:
    """The kopf error a handler should raise for ``error`` (temporary vs permanent)."""
    if isinstance(error, InvalidSpec | image_errors.InvalidReference):
        return kopf.PermanentError(str(error))
    if isinstance(error, Conflict):
        return kopf.TemporaryError(str(error), delay=1)
    if isinstance(error, APIError) and error.temporary:
        return kopf.TemporaryError(str(error), delay=error.retry_after or 5)
    if isinstance(error, image_errors.Unavailable | image_errors.TooManyRequests):
        return kopf.TemporaryError(str(error), delay=10)
    return kopf.TemporaryError(str(error), delay=10)
