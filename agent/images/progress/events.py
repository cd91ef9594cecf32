"""Progress events of one pull: what happened, plus a snapshot of the totals at that moment.

Every event carries a :class:`ProgressSnapshot`, so a consumer can render (or patch status)
from any single event without keeping state of its own. Events are frozen and cheap: a
:class:`BlobProgress` is emitted per chunk read, so consumers must throttle what they do
with it (a status patch per interval, a redraw per frame), never act once per event.

The event kinds::

    ProgressEvent                 base: ``snapshot`` and a ``kind`` name
    ├── PhaseChanged              the pull entered a new phase (Resolving, Downloading…)
    ├── BlobStarted               a body read began for a blob (first time or a Range resume)
    ├── BlobProgress              bytes of a blob arrived (per chunk)
    ├── BlobDone                  a blob is verified and committed, or was already present
    ├── LayerUnpacked             a layer was unpacked into its snapshot (or already was)
    ├── Retry                     a request is retried; ``stalled`` when it was a hung request
    └── Stalled                   a stall: recovered (``fatal=False``) or cancelling the pull

A fatal :class:`Stalled` is also the pull's change to :attr:`Phase.STALLED`; no separate
:class:`PhaseChanged` is emitted for it.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

from agent.images import digests


class Phase(enum.StrEnum):
    """The phase of one image pull, as shown in ``NodeImageSet.status.images[].phase``."""

    PENDING = "Pending"
    RESOLVING = "Resolving"
    DOWNLOADING = "Downloading"
    UNPACKING = "Unpacking"
    COMMITTING = "Committing"
    READY = "Ready"
    FAILED = "Failed"
    STALLED = "Stalled"

    @property
    def final(self) -> bool:
        """Whether the pull is over in this phase (Ready, Failed or Stalled)."""
        return self in _FINAL


_FINAL = frozenset({Phase.READY, Phase.FAILED, Phase.STALLED})


@dataclass(frozen=True, slots=True)
class ProgressSnapshot:
    """The totals of one pull at one moment.

    Attributes:
        reference: the image reference being pulled, as the caller gave it.
        phase: the current phase.
        bytes_done: bytes of known blobs that are downloaded, committed or already present;
            ends equal to ``bytes_total`` on success. A Range resume keeps the bytes before
            the offset; a restart from zero takes them back.
        bytes_total: the sum of the sizes of all known blobs (config and layers).
        blobs_done: blobs committed or already present.
        blobs_total: blobs known (each digest counted once).
        layers_done: layers unpacked into snapshots (or found already unpacked).
        layers_total: known blobs whose media type is a layer.
        bytes_unpacked: uncompressed bytes this pull wrote into snapshots so far (a layer
            applied again after a failed attempt counts once, from its latest attempt).
        active_requests: HTTP bodies being read right now.
        retries: requests retried, for any reason (stalls included).
        stalls: hung requests that were aborted and resumed (recovered stalls).
        stall_cancellations: stalls that cancelled the pull (fatal; 0 or 1 per pull).
    """

    reference: str = ""
    phase: Phase = Phase.PENDING
    bytes_done: int = 0
    bytes_total: int = 0
    blobs_done: int = 0
    blobs_total: int = 0
    layers_done: int = 0
    layers_total: int = 0
    bytes_unpacked: int = 0
    active_requests: int = 0
    retries: int = 0
    stalls: int = 0
    stall_cancellations: int = 0

    @property
    def fraction(self) -> float:
        """``bytes_done / bytes_total`` in 0..1 (0 while nothing is known)."""
        return self.bytes_done / self.bytes_total if self.bytes_total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``phase`` as its string value)."""
        data = asdict(self)
        data["phase"] = self.phase.value
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class ProgressEvent:
    """Base of all progress events. ``kind`` names the event type (``"BlobDone"``…)."""

    kind: ClassVar[str] = "ProgressEvent"

    snapshot: ProgressSnapshot

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``kind``, the event's own fields, and ``snapshot``."""
        data: dict[str, Any] = {"kind": self.kind}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if isinstance(value, ProgressSnapshot):
                value = value.to_dict()
            elif isinstance(value, Phase):
                value = value.value
            data[name] = value
        return data


@dataclass(frozen=True, slots=True, kw_only=True)
class PhaseChanged(ProgressEvent):
    """The pull entered ``phase``; ``message`` says why or what, if anything."""

    kind: ClassVar[str] = "PhaseChanged"

    phase: Phase
    message: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobStarted(ProgressEvent):
    """A body read began for a blob of ``total`` bytes, at byte ``offset``.

    ``offset`` is 0 for a fresh download, and the resume point for a Range resume or a
    partial ingest left by an earlier attempt.
    """

    kind: ClassVar[str] = "BlobStarted"

    digest: digests.Digest
    total: int
    offset: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobProgress(ProgressEvent):
    """``done`` of ``total`` bytes of a blob are in (emitted per chunk)."""

    kind: ClassVar[str] = "BlobProgress"

    digest: digests.Digest
    done: int
    total: int


@dataclass(frozen=True, slots=True, kw_only=True)
class BlobDone(ProgressEvent):
    """A blob is verified and committed; ``present`` when it was in the store already."""

    kind: ClassVar[str] = "BlobDone"

    digest: digests.Digest
    total: int
    present: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class LayerUnpacked(ProgressEvent):
    """A layer (by its blob digest) is unpacked and its snapshot committed."""

    kind: ClassVar[str] = "LayerUnpacked"

    digest: digests.Digest


@dataclass(frozen=True, slots=True, kw_only=True)
class UnpackProgress(ProgressEvent):
    """A layer (by its blob digest) being applied wrote ``written`` uncompressed bytes so far
    (about every MiB). ``snapshot.bytes_unpacked`` is the pull's total."""

    kind: ClassVar[str] = "UnpackProgress"

    digest: digests.Digest
    written: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry(ProgressEvent):
    """A request is about to be retried (``attempt`` counts from 1 for the first retry).

    ``digest`` is the blob's, or ``None`` for a request that is not a blob body (a manifest
    by tag, a token). ``stalled`` is true when the request was aborted because its socket
    went silent (a recovered stall, resumed by Range); ``reason`` says what went wrong.
    """

    kind: ClassVar[str] = "Retry"

    digest: digests.Digest | None
    attempt: int
    reason: str
    stalled: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Stalled(ProgressEvent):
    """No progress: ``fatal`` when the pull is being cancelled for it.

    ``digest`` names the hung blob when one request is to blame, or is ``None`` when the
    whole pull made no progress (the pull-level watchdog). ``message`` is the reason, as in
    ``no progress in 5m0s``.
    """

    kind: ClassVar[str] = "Stalled"

    digest: digests.Digest | None
    message: str
    fatal: bool
