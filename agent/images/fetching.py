"""``Fetcher``: download blobs into the content store, resuming broken and silent requests.

One blob at a time per digest (a lock per digest: a blob two pulls need at once is
downloaded once), at most ``per_pull`` at once per pull and ``node_limit`` at once for the
whole service; a pull's blobs given places in a :class:`Line` queue for those slots in its
order (a pull's layers in the manifest's, the order they are unpacked in). Each blob is
streamed into an ingest, hashed as it arrives, resumed with ``Range`` after a broken
connection (at most :data:`MAX_BLOB_RESUMES` times) or after a request that went silent for
the stall policy's read timeout (a recovered stall; too many of them fail the pull with
:class:`~agent.images.errors.PullStalled`), and committed only once verified. Blobs already
in the store are not downloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from agent.images import descriptors, digests, durations, errors, locks, references, tracing
from agent.images.content import local, sinks
from agent.images.progress import stall, tracker
from agent.images.registry import client as registry_client

#: Resumes of one blob after a broken (not silent) connection before the pull fails.
MAX_BLOB_RESUMES = 5

#: Called with a blob's ingest writer before its first byte is written.
OnWriter = Callable[[descriptors.Descriptor, sinks.SinkWriter], None]


class Line:
    """An order in which blobs queue for their download slots: a pull's layers in the
    manifest's order, which is the order its unpack applies them in. Taken as they come, the
    blobs of a runtime's store (containerd's) would queue in whatever order its answers to
    "do you have it?" came back, and on a network slower than the unpack a layer downloaded
    out of turn holds the unpack up while later layers are already in.

    A blob's :class:`Place` waits for the one before to have queued (or to need no slot, or
    to wait for another pull that fetches the same blob) and lets the next one go once it
    queues itself.
    """

    def __init__(self, size: int):
        self._gone = [asyncio.Event() for _ in range(size)]

    def place(self, index: int) -> Place:
        return Place(self._gone, index)


class Place:
    """One blob's place in a :class:`Line`."""

    def __init__(self, gone: list[asyncio.Event], index: int):
        self._gone = gone
        self._index = index

    async def reached(self) -> None:
        """Wait until the blob before this one has queued or left the line."""
        if self._index:
            await self._gone[self._index - 1].wait()

    def leave(self) -> None:
        """Let the next blob go (again: no effect)."""
        self._gone[self._index].set()


class Fetcher:
    """Downloads blobs into ``content`` with the client ``registry()`` returns.

    Args:
        content: the store blobs are committed into.
        registry: returns the registry client of the pull in progress.
        node_limit: downloads at once across every pull of the service.
    """

    def __init__(
        self,
        content: local.LocalStore,
        registry: Callable[[], registry_client.RegistryClient],
        node_limit: int,
    ):
        self.content = content
        self._registry = registry
        self._blob_locks = locks.KeyedLock()
        self._node_downloads = asyncio.Semaphore(max(1, node_limit))

    async def fetch_blob(
        self,
        ref: references.Reference,
        desc: descriptors.Descriptor,
        progress: tracker.PullProgress,
        per_pull: asyncio.Semaphore,
        progress_timeout: float,
        on_writer: OnWriter | None = None,
        sink: sinks.BlobSink | None = None,
        place: Place | None = None,
    ) -> int:
        """Download one blob into ``sink`` (default: the store) unless it is there. Returns
        bytes downloaded.

        ``on_writer`` is called with the ingest's writer before the first byte is written
        (an unpack follows the ingest from there, see :mod:`agent.images.arriving`).
        ``sink`` is where a backend keeps the blob itself (containerd's content ingest).
        ``place``: the blob queues for ``per_pull`` in that :class:`Line`'s order."""
        key = str(desc.digest)
        into: sinks.BlobSink = sink if sink is not None else self.content
        try:
            if place is not None:
                await place.reached()
            if await self._exists(into, desc.digest):
                progress.blob_present(desc)
                return 0
            # Taken at once if no other pull holds it: nothing can have changed since the
            # check above (no await in between), and another process's writer is found by
            # the check after the ingest is opened (_download).
            contended = self._blob_locks.held(key)
            if place is not None and contended:
                place.leave()  # another pull fetches it: the blobs behind need not wait
            async with self._blob_locks.hold(key):
                if contended and await self._exists(into, desc.digest):
                    progress.blob_present(desc)
                    return 0
                if place is not None:
                    place.leave()  # it queues for a slot right here, before the next one
                async with per_pull, self._node_downloads:
                    attrs: dict[str, str | int] = {
                        tracing.LAYER_DIGEST: key,
                        tracing.LAYER_SIZE: desc.size,
                        tracing.LAYER_MEDIA_TYPE: desc.media_type,
                    }
                    with tracing.span(tracing.SERVICE_SPANS, "fetch_blob", attrs) as span:
                        got = await self._download(
                            ref, desc, progress, progress_timeout, on_writer, into
                        )
                        span.set_attribute("blob.bytes_downloaded", got)
                        return got
        finally:
            if place is not None:
                place.leave()

    async def store_small(self, desc: descriptors.Descriptor, data: bytes) -> None:
        """Commit ``data`` (a manifest or index already read and verified) as ``desc``."""
        async with self._blob_locks.hold(str(desc.digest)):
            if self.content.exists(desc.digest):
                return
            writer = await self._open_writer(self.content, desc.digest, len(data))
            if self.content.exists(desc.digest):  # the process that held it published it
                writer.abort()
                return
            try:
                writer.truncate(0)
                writer.write(data)
                await asyncio.to_thread(writer.commit, len(data), desc.digest)
            except errors.AlreadyExists:
                pass
            finally:
                writer.close()

    async def _download(
        self,
        ref: references.Reference,
        desc: descriptors.Descriptor,
        progress: tracker.PullProgress,
        progress_timeout: float,
        on_writer: OnWriter | None,
        sink: sinks.BlobSink,
    ) -> int:
        writer = await self._open_writer(sink, desc.digest, desc.size)
        policy = stall.RetryPolicy.for_stall_timeout(progress_timeout)
        downloaded = 0
        stalls = 0
        resumes = 0
        refetched = False
        # From here on a cancelled pull aborts (or keeps) the ingest it opened, including
        # while asking whether another process published the blob meanwhile: a runtime's
        # ingest left open would keep its lock and stay in the runtime's store.
        try:
            if await self._exists(sink, desc.digest):
                # Another process held the ingest and published the blob while we waited.
                writer.abort()
                progress.blob_present(desc)
                return 0
            if on_writer is not None:
                on_writer(desc, writer)
            if writer.offset > desc.size:
                writer.truncate(0)
            while writer.offset < desc.size or desc.size == 0:
                offset = writer.offset
                progress.request_started(desc.digest, offset=offset)
                try:
                    async with self._registry().open_blob(
                        ref, desc, offset=offset, read_timeout=policy.read_timeout
                    ) as body:
                        if body.offset != offset:  # the server ignored Range: start over
                            writer.truncate(body.offset)
                            progress.request_finished(desc.digest)
                            progress.request_started(desc.digest, offset=body.offset)
                        async for chunk in body.chunks():
                            if writer.offset + len(chunk) > desc.size:
                                raise errors.SizeMismatch(
                                    f"blob {desc.digest} of {ref.name}: the registry sent more"
                                    f" than the {desc.size} bytes the manifest states"
                                )
                            writer.write(chunk)
                            downloaded += len(chunk)
                            progress.bytes_read(desc.digest, len(chunk))
                except registry_client.RequestStalled as e:
                    stalls += 1
                    if stalls > policy.max_request_stalls:
                        message = (
                            f"blob {desc.digest} of {ref.name} stalled {stalls} times"
                            f" (no data for {durations.format(policy.read_timeout or 0)} each"
                            " time)"
                        )
                        progress.stalled(desc.digest, message, fatal=True)
                        raise errors.PullStalled(message) from e
                    progress.retry(desc.digest, stalls, str(e), stalled=True)
                    await asyncio.sleep(policy.backoff(stalls))
                    continue
                except errors.Unavailable as e:
                    resumes += 1
                    if resumes > MAX_BLOB_RESUMES:
                        raise
                    progress.retry(desc.digest, resumes, str(e), stalled=False)
                    await asyncio.sleep(policy.backoff(resumes))
                    continue
                finally:
                    progress.request_finished(desc.digest)
                if desc.size == 0 or writer.offset >= desc.size:
                    if refetched or writer.digest() == desc.digest:
                        break  # verified, or the second copy is bad too: commit() says so
                    # Corrupt once (a flaky proxy or CDN): discard and fetch it once more.
                    refetched = True
                    progress.retry(desc.digest, 1, f"the bytes hashed to {writer.digest()}",
                                   stalled=False)
                    writer.truncate(0)
                    continue
                # EOF before the stated size: resume from where it stopped.
                resumes += 1
                if resumes > MAX_BLOB_RESUMES:
                    raise errors.SizeMismatch(
                        f"blob {desc.digest} of {ref.name}: the registry keeps ending the body"
                        f" at {writer.offset} of {desc.size} bytes"
                    )
                progress.retry(desc.digest, resumes, "short body", stalled=False)
            with contextlib.suppress(errors.AlreadyExists):
                await asyncio.to_thread(writer.commit, desc.size, desc.digest)
            progress.blob_done(desc.digest)
            return downloaded
        except asyncio.CancelledError:
            if sinks.keeps_cancelled(sink):
                writer.close()
            else:
                writer.abort()  # a runtime's content store keeps no partial blob of ours
            raise
        except BaseException:
            writer.close()  # keeps the ingest for a resume; verification failures removed it
            raise
        finally:
            tracing.set_attributes({"blob.retries": stalls + resumes, "blob.stalls": stalls})

    async def _exists(self, sink: sinks.BlobSink, digest: digests.Digest) -> bool:
        if sink is self.content:
            return self.content.exists(digest)
        # A runtime's store answers over its API (and may wait behind a snapshot commit):
        # not on the event loop, whose downloads would stall meanwhile.
        return await asyncio.to_thread(sink.exists, digest)

    async def _open_writer(
        self, sink: sinks.BlobSink, digest: digests.Digest, size: int
    ) -> sinks.SinkWriter:
        """Open the ingest of ``digest``; wait while another process writes it."""
        delay = 0.05
        while True:
            try:
                if sink is self.content:
                    return self.content.writer(str(digest), total=size)
                # A runtime's ingest is opened over its API: not on the event loop. If the
                # pull is cancelled meanwhile, the writer the thread still opens is aborted
                # (it would hold the runtime's lock and leave its ingest behind).
                opening = asyncio.ensure_future(
                    asyncio.to_thread(sink.writer, str(digest), total=size))
                try:
                    return await asyncio.shield(opening)
                except asyncio.CancelledError:
                    opening.add_done_callback(_abort_opened)
                    raise
            except errors.Unavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)


def _abort_opened(opening: asyncio.Future[sinks.SinkWriter]) -> None:
    """Abort a writer opened for a pull that was cancelled while it opened."""
    if not opening.cancelled() and opening.exception() is None:
        opening.result().abort()
