"""PullProgress: the totals of one pull, fed by the fetch loop, emitted as events.

The tracker is where bytes are counted as they arrive (STYLE guideline 9). It holds two
kinds of numbers:

* **for the stall watchdog** — :attr:`PullProgress.active_requests` (HTTP bodies being read
  now) and :attr:`PullProgress.total_bytes_read` (every byte read from the network, only
  ever growing, including bytes of manifests and of bodies that are later thrown away);
* **for users** — a :class:`~agent.images.progress.events.ProgressSnapshot`: phase, bytes
  done/total of the known blobs, blobs and layers done/total, retries and stalls.

A request is active from :meth:`~PullProgress.request_started` until
:meth:`~PullProgress.request_finished`, which the fetch loop calls **the moment the body
reaches EOF or fails** — not after the blob's fsync and commit. A slow commit under I/O
pressure is not a stalled download (containerd's false alarm, fixed by closing on EOF).

Typical use in a fetch loop (one blob, with a Range resume)::

    progress.request_started(desc.digest, offset=writer.offset)
    try:
        async for chunk in response.aiter_raw():
            await writer.write(chunk)
            progress.bytes_read(desc.digest, len(chunk))
    finally:
        progress.request_finished(desc.digest)   # at EOF: before the commit
    await writer.commit()
    progress.blob_done(desc.digest)

:meth:`~PullProgress.request` wraps the first and the finish in a ``with`` block.

Events go to ``on_event`` synchronously, in order, from the caller's thread (the event
loop). A callback must be cheap and must not raise; it is called per chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Iterator

from agent.images import descriptors, digests, mediatypes
from agent.images.progress import events

EventCallback = Callable[[events.ProgressEvent], None]


class _Blob:
    """Mutable per-blob state; private to the tracker."""

    __slots__ = ("digest", "total", "done", "is_layer", "finished", "unpacked", "written")

    def __init__(self, digest: digests.Digest, total: int, is_layer: bool) -> None:
        self.digest = digest
        self.total = total
        self.done = 0
        self.is_layer = is_layer
        self.finished = False
        self.unpacked = False
        self.written = 0  # uncompressed bytes its unpack wrote (latest attempt)


def _default_clock() -> Callable[[], float]:
    try:
        return asyncio.get_running_loop().time
    except RuntimeError:
        return time.monotonic


class PullProgress:
    """Progress of one image pull.

    Args:
        reference: the image reference, carried in every snapshot.
        on_event: called with every :class:`~agent.images.progress.events.ProgressEvent`;
            ``None`` to only keep the numbers (no snapshot is built then).
        clock: the time source of :attr:`last_progress_at`. Defaults to the running event
            loop's ``time()`` (so fake loop time in tests applies), or ``time.monotonic``
            when constructed outside a loop.

    Blobs are known by digest. A digest that was never added (a manifest, a token
    request, ``None``) still counts in :attr:`active_requests` and
    :attr:`total_bytes_read`, but not in the user-facing totals, and emits no events.
    Calls for a digest added twice count once.
    """

    def __init__(
        self,
        reference: str,
        on_event: EventCallback | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.reference = reference
        self._on_event = on_event
        self._clock = clock if clock is not None else _default_clock()
        self._blobs: dict[digests.Digest, _Blob] = {}
        self._active: dict[digests.Digest | None, int] = {}
        self._phase = events.Phase.PENDING
        self._phase_message = ""
        self.active_requests = 0
        self.total_bytes_read = 0
        self.last_progress_at = self._clock()
        self._bytes_done = 0
        self._bytes_total = 0
        self._blobs_done = 0
        self._layers_done = 0
        self._layers_total = 0
        self._bytes_unpacked = 0
        self._retries = 0
        self._stalls = 0
        self._stall_cancellations = 0

    # -- reading the numbers

    @property
    def phase(self) -> events.Phase:
        return self._phase

    @property
    def stalls(self) -> int:
        """Hung requests that were aborted and resumed (recovered)."""
        return self._stalls

    @property
    def stall_cancellations(self) -> int:
        """Stalls that cancelled the pull."""
        return self._stall_cancellations

    def snapshot(self) -> events.ProgressSnapshot:
        """The totals now."""
        return events.ProgressSnapshot(
            reference=self.reference,
            phase=self._phase,
            bytes_done=self._bytes_done,
            bytes_total=self._bytes_total,
            blobs_done=self._blobs_done,
            blobs_total=len(self._blobs),
            layers_done=self._layers_done,
            layers_total=self._layers_total,
            bytes_unpacked=self._bytes_unpacked,
            active_requests=self.active_requests,
            retries=self._retries,
            stalls=self._stalls,
            stall_cancellations=self._stall_cancellations,
        )

    # -- phases and known blobs

    def set_phase(self, phase: events.Phase, message: str = "") -> None:
        """Enter ``phase``; emits :class:`PhaseChanged` if the phase or message changed."""
        if phase is self._phase and message == self._phase_message:
            return
        self._phase = phase
        self._phase_message = message
        if self._on_event is not None:
            self._on_event(
                events.PhaseChanged(snapshot=self.snapshot(), phase=phase, message=message)
            )

    def add_blobs(self, blobs: Iterable[descriptors.Descriptor]) -> None:
        """Make blobs known: their sizes add to ``bytes_total``; layers to ``layers_total``.

        May be called more than once (the config first, then the layers); a digest already
        known is ignored. Emits nothing: the totals appear in the next event's snapshot.
        """
        for desc in blobs:
            self._add(desc)

    def blob_present(self, desc: descriptors.Descriptor) -> None:
        """A blob is already in the content store: it counts as done, with all its bytes.

        Adds the blob if it was not known. Emits :class:`BlobDone` with ``present=True``.
        """
        blob = self._add(desc)
        self._finish(blob, present=True)

    def _add(self, desc: descriptors.Descriptor) -> _Blob:
        blob = self._blobs.get(desc.digest)
        if blob is None:
            blob = _Blob(desc.digest, desc.size, mediatypes.is_layer(desc.media_type))
            self._blobs[desc.digest] = blob
            self._bytes_total += desc.size
            if blob.is_layer:
                self._layers_total += 1
        return blob

    # -- requests and bytes (the hot path)

    def request_started(self, digest: digests.Digest | None, *, offset: int = 0) -> None:
        """An HTTP body is now being read: ``active_requests`` grows by one.

        For a known blob, ``offset`` is where this body starts in the blob (a Range resume
        or a partial ingest; 0 for a fresh download or a restart): the blob's done bytes
        become ``offset``. Emits :class:`BlobStarted` for a known blob.
        """
        self.active_requests += 1
        self._active[digest] = self._active.get(digest, 0) + 1
        blob = self._blobs.get(digest) if digest is not None else None
        if blob is None or blob.finished:
            return
        offset = max(0, min(offset, blob.total))
        self._bytes_done += offset - blob.done
        blob.done = offset
        if self._on_event is not None:
            self._on_event(
                events.BlobStarted(
                    snapshot=self.snapshot(), digest=blob.digest, total=blob.total, offset=offset
                )
            )

    def request_finished(self, digest: digests.Digest | None) -> None:
        """The body hit EOF or failed: ``active_requests`` shrinks by one.

        Call it the moment the body ends, before any commit. A finish without a matching
        start (e.g. a second call from a ``finally``) is ignored.
        """
        count = self._active.get(digest, 0)
        if count <= 0:
            return
        if count == 1:
            del self._active[digest]
        else:
            self._active[digest] = count - 1
        self.active_requests -= 1

    @contextlib.contextmanager
    def request(self, digest: digests.Digest | None, *, offset: int = 0) -> Iterator[None]:
        """``request_started`` on entry and ``request_finished`` on exit, however it exits.

        Put only the body read inside, not the commit.
        """
        self.request_started(digest, offset=offset)
        try:
            yield
        finally:
            self.request_finished(digest)

    def bytes_read(self, digest: digests.Digest | None, n: int) -> None:
        """``n`` bytes of a body arrived; called per chunk, so it is kept cheap.

        Advances ``total_bytes_read`` and :attr:`last_progress_at`; for a known blob also
        its done bytes (never past its size) and emits :class:`BlobProgress`.
        """
        if n <= 0:
            return
        self.total_bytes_read += n
        self.last_progress_at = self._clock()
        blob = self._blobs.get(digest) if digest is not None else None
        if blob is None or blob.finished:
            return
        done = min(blob.done + n, blob.total)
        self._bytes_done += done - blob.done
        blob.done = done
        if self._on_event is not None:
            self._on_event(
                events.BlobProgress(
                    snapshot=self.snapshot(), digest=blob.digest, done=done, total=blob.total
                )
            )

    # -- outcomes

    def blob_done(self, digest: digests.Digest) -> None:
        """A blob is verified and committed (or the store said it already exists).

        Its bytes count in full. Emits :class:`BlobDone` once per blob.
        """
        blob = self._blobs.get(digest)
        if blob is None:
            return
        self._finish(blob, present=False)

    def _finish(self, blob: _Blob, *, present: bool) -> None:
        if blob.finished:
            return
        blob.finished = True
        self._bytes_done += blob.total - blob.done
        blob.done = blob.total
        self._blobs_done += 1
        if self._on_event is not None:
            self._on_event(
                events.BlobDone(
                    snapshot=self.snapshot(), digest=blob.digest, total=blob.total, present=present
                )
            )

    def layer_unpacked(self, digest: digests.Digest) -> None:
        """A layer is unpacked into its snapshot, or its snapshot already existed.

        Counts once per known layer digest. Emits :class:`LayerUnpacked`.
        """
        blob = self._blobs.get(digest)
        if blob is None or blob.unpacked:
            return
        blob.unpacked = True
        self._layers_done += 1
        if self._on_event is not None:
            self._on_event(events.LayerUnpacked(snapshot=self.snapshot(), digest=digest))

    def layer_written(self, digest: digests.Digest, written: int) -> None:
        """A layer being unpacked has written ``written`` uncompressed bytes (its attempt's
        total so far; a new attempt starts again from 0). Emits :class:`UnpackProgress`."""
        blob = self._blobs.get(digest)
        if blob is None:
            return
        self._bytes_unpacked += written - blob.written
        blob.written = written
        if self._on_event is not None:
            self._on_event(
                events.UnpackProgress(snapshot=self.snapshot(), digest=digest, written=written)
            )

    def retry(
        self, digest: digests.Digest | None, attempt: int, reason: str, *, stalled: bool
    ) -> None:
        """A request is about to be retried. ``stalled``: it was a hung request (socket
        silent past the per-request limit) that will be resumed by Range; it counts as a
        recovered stall. Do not also call :meth:`stalled` for the same stall.

        Emits :class:`Retry`.
        """
        self._retries += 1
        if stalled:
            self._stalls += 1
        if self._on_event is not None:
            self._on_event(
                events.Retry(
                    snapshot=self.snapshot(),
                    digest=digest,
                    attempt=attempt,
                    reason=reason,
                    stalled=stalled,
                )
            )

    def stalled(self, digest: digests.Digest | None, message: str, *, fatal: bool) -> None:
        """A stall. ``fatal``: the pull is being cancelled for it — counts in
        ``stall_cancellations`` and moves the phase to Stalled. Otherwise it counts as a
        recovered stall (``stalls``), for a stall recovered other than by :meth:`retry`.

        Emits :class:`Stalled`. ``digest`` is ``None`` when no single request is to blame.
        """
        if fatal:
            self._stall_cancellations += 1
            self._phase = events.Phase.STALLED
            self._phase_message = message
        else:
            self._stalls += 1
        if self._on_event is not None:
            snapshot = self.snapshot()
            self._on_event(
                events.Stalled(snapshot=snapshot, digest=digest, message=message, fatal=fatal)
            )
