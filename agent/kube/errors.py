"""The one tree of Kubernetes API errors, for the operator and the node agent alike.

:class:`APIError` carries the HTTP ``status`` (``0`` when no answer came: connection refused,
reset, timeout, TLS), the API's ``reason`` and message. Subclasses name the statuses callers
act on. Whether to retry is the caller's choice; :attr:`APIError.temporary` says what a
client-go style caller would do.
"""

from __future__ import annotations


class APIError(Exception):
    """A failed API request: ``status`` (HTTP status, 0 = no answer), ``reason``, message."""

    def __init__(self, status: int, reason: str, message: str, *,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message
        #: Seconds the server asked to wait (``Retry-After``), when it said.
        self.retry_after = retry_after

    @property
    def temporary(self) -> bool:
        """Whether the same request may succeed later without any change on our side."""
        return self.status in (0, 409, 429) or self.status >= 500


class Unavailable(APIError):
    """No answer (status 0): the API server is unreachable or the connection broke."""


class Unauthorized(APIError):
    """401: the credentials were rejected (an expired or rotated token)."""


class Forbidden(APIError):
    """403: RBAC does not allow the request."""


class NotFound(APIError):
    """404."""


class Conflict(APIError):
    """409: a stale resourceVersion, or the object already exists. Retry with a fresh read."""


class Gone(APIError):
    """410: a list ``continue`` token or a watch resourceVersion too old; relist."""


class Invalid(APIError):
    """422: the request was refused as invalid (a schema, or a failed JSON-patch ``test``)."""


class TooManyRequests(APIError):
    """429: throttled by API priority and fairness; wait ``retry_after`` seconds."""


BY_STATUS: dict[int, type[APIError]] = {
    401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict, 410: Gone,
    422: Invalid, 429: TooManyRequests,
}


def from_status(status: int, reason: str, message: str, *,
                retry_after: float | None = None) -> APIError:
    """The error for an HTTP failure ``status``."""
    cls = BY_STATUS.get(status, APIError)
    return cls(status, reason, message, retry_after=retry_after)
