"""The image service's one exception tree.

::

    ImageError                    anything the image service raises on purpose
    ├── InvalidReference          a reference string that cannot be parsed
    ├── NotFound                  no such repository, tag, blob or snapshot
    ├── AlreadyExists             target exists; callers treat it as "skip" (idempotent)
    ├── Unavailable               a lock is held, a host is unreachable, the registry said 5xx
    ├── DigestMismatch            bytes do not hash to the digest they were asked for
    ├── SizeMismatch              bytes are not as many as the descriptor says
    ├── UnsupportedMediaType      a manifest or layer of a kind this service cannot handle
    ├── NoMatchingPlatform        an index holds no manifest for the wanted platform
    ├── InvalidManifest           a manifest, index or config that is not what it claims
    ├── UnsafeLayer               a layer that would write outside its root, or is a bomb
    ├── DiskPressure              not enough free space for what is about to be written
    ├── InvalidConfiguration      a hosts.toml, auth file or pull secret that cannot be used
    ├── PullStalled               no progress for the stall timeout; the pull was cancelled
    └── RegistryError             the registry answered with an error (status, code, message)
        ├── Unauthorized          401: no or wrong credentials
        ├── Denied                403: credentials are fine, access is not
        └── TooManyRequests       429: back off (``retry_after`` seconds when the registry said)

Every error carries a message that names the reference, digest or host it is about and,
where there is one, what the user can do about it. Errors that come from a lower library
(httpx, OSError) are raised ``from`` the original, so the cause stays in the traceback.
"""

from __future__ import annotations


class ImageError(Exception):
    """Base class of every error the image service raises on purpose."""

    #: A short CamelCase word for status fields and metrics (``reason``).
    reason: str = "ImageError"


class InvalidReference(ImageError):
    """A reference string that cannot be parsed or normalised."""

    reason = "InvalidReference"


class NotFound(ImageError):
    """No such repository, tag, manifest, blob or snapshot."""

    reason = "NotFound"


class AlreadyExists(ImageError):
    """The target already exists. Callers treat this as success (an idempotent skip)."""

    reason = "AlreadyExists"


class Unavailable(ImageError):
    """Temporarily unavailable: a lock is held, a host is unreachable, or a 5xx answer."""

    reason = "Unavailable"


class DigestMismatch(ImageError):
    """Bytes that do not hash to the digest they were fetched or committed under."""

    reason = "DigestMismatch"


class SizeMismatch(ImageError):
    """Bytes that are not as many as their descriptor says."""

    reason = "SizeMismatch"


class UnsupportedMediaType(ImageError):
    """A manifest, config or layer media type this service cannot handle."""

    reason = "UnsupportedMediaType"


class NoMatchingPlatform(NotFound):
    """An image index holds no manifest for the wanted platform."""

    reason = "NoMatchingPlatform"


class InvalidManifest(ImageError):
    """A manifest, index or image config that is malformed or too large."""

    reason = "InvalidManifest"


class UnsafeLayer(ImageError):
    """A layer that would write outside its snapshot root, smuggles forbidden xattrs,
    or decompresses past the configured limit."""

    reason = "UnsafeLayer"


class DiskPressure(ImageError):
    """Not enough free space for what is about to be written."""

    reason = "DiskPressure"


class InvalidConfiguration(ImageError):
    """A registry configuration (``hosts.toml``, auth file, pull secret) that cannot be used.

    The message names the file or secret and the offending key.
    """

    reason = "InvalidConfiguration"


class PullStalled(ImageError):
    """A pull (or one of its requests) made no progress for the stall timeout."""

    reason = "PullStalled"


class RegistryError(ImageError):
    """The registry answered with an error.

    Attributes:
        status: the HTTP status code.
        code: the OCI distribution error code (``MANIFEST_UNKNOWN``…), or "".
        detail: the registry's own message, or "".
    """

    reason = "RegistryError"

    def __init__(self, message: str, *, status: int = 0, code: str = "", detail: str = ""):
        super().__init__(message)
        self.status = status
        self.code = code
        self.detail = detail


class Unauthorized(RegistryError):
    """401: the registry wants credentials, or rejected the ones given."""

    reason = "Unauthorized"


class Denied(RegistryError):
    """403: the credentials were accepted but do not grant access."""

    reason = "Denied"


class TooManyRequests(RegistryError):
    """429: rate limited. ``retry_after`` holds the registry's advice in seconds, if any."""

    reason = "TooManyRequests"

    def __init__(
        self,
        message: str,
        *,
        status: int = 429,
        code: str = "TOOMANYREQUESTS",
        detail: str = "",
        retry_after: float | None = None,
    ):
        super().__init__(message, status=status, code=code, detail=detail)
        self.retry_after = retry_after
