"""Service errors as the node layer sees them: retried with backoff, or final at once.

Only this layer knows kopf's error semantics (STYLE guideline 7). An attempt that fails
with a *temporary* error (:func:`is_temporary`) is retried after a backoff, up to the
entry's ``backoffLimit``; a *permanent* one ends the attempt series as ``Failed`` at once
(a retry with the same reference and credentials cannot succeed). :func:`to_kopf` gives
the same verdict as ``kopf.TemporaryError`` / ``kopf.PermanentError`` for handlers.

Reasons shown in ``status.images[].reason``: an :class:`agent.images.errors.ImageError`'s
own ``reason`` (``PullStalled``, ``Unauthorized``, ``NotFound``, ``DigestMismatch``,
``DiskPressure``…), plus ``PullSecretNotFound`` (:class:`MissingPullSecret`), ``Timeout``
(``timeoutSeconds`` ran out) and ``Internal`` (a bug; the message says what).
"""

from __future__ import annotations

import kopf

from agent.images import errors as image_errors
from agent.node import kubeapi

TIMEOUT = "Timeout"
INTERNAL = "Internal"

#: Errors a later attempt with the same inputs cannot fix.
PERMANENT: tuple[type[BaseException], ...] = (
    image_errors.InvalidReference,
    image_errors.NotFound,  # also NoMatchingPlatform
    image_errors.Unauthorized,
    image_errors.Denied,
    image_errors.UnsupportedMediaType,
    image_errors.InvalidManifest,
    image_errors.UnsafeLayer,
    image_errors.InvalidConfiguration,
)
#: Their ``reason`` values: a later attempt series is tried at most ``backoffLimit`` times.
def _reasons(classes: tuple[type[BaseException], ...]) -> frozenset[str]:
    found: set[str] = set()
    todo = list(classes)
    while todo:
        cls = todo.pop()
        found.add(str(getattr(cls, "reason", cls.__name__)))
        todo.extend(cls.__subclasses__())
    return frozenset(found)


PERMANENT_REASONS = _reasons(PERMANENT)
#: Errors never retried, not even by a later attempt series (failed_retry_interval).
HOPELESS: tuple[type[BaseException], ...] = (image_errors.InvalidReference,)
#: Their ``reason`` values, as an Outcome records them.
HOPELESS_REASONS = frozenset(str(getattr(e, "reason", e.__name__)) for e in HOPELESS)

#: Delay kopf waits before retrying a handler that failed temporarily.
KOPF_RETRY_DELAY = 5.0


class MissingPullSecret(Exception):
    """A pull-secret copy named by the entry does not exist in the operator namespace."""

    reason = "PullSecretNotFound"


def reason(error: BaseException) -> str:
    """The CamelCase ``reason`` for status and Events."""
    if isinstance(error, TimeoutError):
        return TIMEOUT
    value = getattr(error, "reason", None)
    if isinstance(value, str) and value.isidentifier():
        return value
    return INTERNAL


def is_temporary(error: BaseException) -> bool:
    """Whether another attempt (after a backoff) may succeed."""
    return not isinstance(error, PERMANENT)


def to_kopf(error: BaseException) -> kopf.TemporaryError | kopf.PermanentError:
    """The kopf error a handler raises for ``error``."""
    if isinstance(error, kubeapi.APIError):
        if error.temporary:
            return kopf.TemporaryError(str(error), delay=error.retry_after or KOPF_RETRY_DELAY)
        return kopf.PermanentError(str(error))
    if is_temporary(error):
        delay = getattr(error, "retry_after", None) or KOPF_RETRY_DELAY
        return kopf.TemporaryError(str(error), delay=delay)
    return kopf.PermanentError(str(error))
