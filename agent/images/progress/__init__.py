"""Pull progress and stall detection: pure asyncio, no I/O.

The lowest layer of the image service: it imports only the standard library and the base
modules (``digests``, ``descriptors``, ``mediatypes``, ``durations``, ``errors``).

* :mod:`.events` — :class:`Phase`, :class:`ProgressSnapshot` and the frozen event types.
* :mod:`.tracker` — :class:`PullProgress`: the fetch loop feeds it requests, bytes and
  outcomes; it keeps the totals and emits events to a callback.
* :mod:`.stall` — :class:`StallWatchdog` (per pull) and the per-request policy
  (:func:`request_read_timeout`, :class:`RetryPolicy`).

This facade re-exports the public names; inside the package, import the modules.
"""

from agent.images.progress.events import (
    BlobDone,
    BlobProgress,
    BlobStarted,
    LayerUnpacked,
    Phase,
    PhaseChanged,
    ProgressEvent,
    ProgressSnapshot,
    Retry,
    Stalled,
    UnpackProgress,
)
from agent.images.progress.stall import (
    DEFAULT_MAX_REQUEST_STALLS,
    DEFAULT_STALL_TIMEOUT,
    PullActivity,
    RetryPolicy,
    StallWatchdog,
    check_interval,
    request_read_timeout,
)
from agent.images.progress.tracker import EventCallback, PullProgress

__all__ = [
    "DEFAULT_MAX_REQUEST_STALLS",
    "DEFAULT_STALL_TIMEOUT",
    "BlobDone",
    "BlobProgress",
    "BlobStarted",
    "EventCallback",
    "LayerUnpacked",
    "Phase",
    "PhaseChanged",
    "ProgressEvent",
    "ProgressSnapshot",
    "PullActivity",
    "PullProgress",
    "Retry",
    "RetryPolicy",
    "StallWatchdog",
    "Stalled",
    "UnpackProgress",
    "check_interval",
    "request_read_timeout",
]
