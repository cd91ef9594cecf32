"""``ContainerdContent``: blobs in containerd's content store, and the labels its GC follows.

containerd's garbage collector walks from image records through content labels:

* an index carries ``containerd.io/gc.ref.content.m.<i>`` → each manifest it holds here;
* a manifest carries ``containerd.io/gc.ref.content.config`` → its config and
  ``containerd.io/gc.ref.content.l.<i>`` → each layer;
* a config carries ``containerd.io/gc.ref.snapshot.<snapshotter>`` → the top chain ID, which
  keeps the snapshot chain (each snapshot keeps its parent);
* a layer carries ``containerd.io/uncompressed`` = its diff ID (not a GC reference: the
  unpacker's record that the layer was verified);
* every blob carries ``containerd.io/distribution.source.<registry host>`` = the repository,
  as containerd's fetcher sets it (cross-repository mounts on push).

:meth:`ContainerdContent.write` copies a blob through the content service's ``Write`` stream
(``STAT`` to learn where a previous, interrupted ingest of the same ref stopped; ``WRITE``
from there; ``COMMIT`` with the expected size, digest and labels), the way containerd's
remote content writer does; containerd verifies the digest before the blob becomes visible.
:meth:`ContainerdContent.ensure_labels` merges labels into a blob that is already present.

:class:`Ingest` streams a blob whose bytes are still arriving (a layer read as it downloads,
while it is unpacked) through the same ``Write`` stream, from a worker thread, and commits it
with its expected digest once the last byte is in: containerd verifies the digest, so a blob
whose bytes were not the right ones never becomes visible.
"""

from __future__ import annotations

import io
import queue
import threading
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO, Final

from google.protobuf import empty_pb2, field_mask_pb2

from agent.images import digests, errors
from agent.images.containerd import client as client_mod
from agent.images.containerd import leases
from agent.images.containerd.protos import content_pb2
from agent.images.content import store

LABEL_UNCOMPRESSED: Final = "containerd.io/uncompressed"
LABEL_DISTRIBUTION_SOURCE: Final = "containerd.io/distribution.source."
LABEL_REF_CONFIG: Final = "containerd.io/gc.ref.content.config"
LABEL_REF_LAYER: Final = "containerd.io/gc.ref.content.l."
LABEL_REF_MANIFEST: Final = "containerd.io/gc.ref.content.m."
LABEL_REF_SNAPSHOT: Final = "containerd.io/gc.ref.snapshot."

#: Bytes per ``WRITE`` message (containerd's own client uses 1 MiB buffers).
CHUNK: Final = 1024 * 1024

_SERVICE: Final = "/containerd.services.content.v1.Content/"


class ContainerdContent:
    """containerd's content service in the client's namespace.

    Args:
        client: the channel (shared).
        lease: attach every blob written through this object to this lease.
    """

    def __init__(self, client: client_mod.Client, *, lease: str = ""):
        self.client = client
        self.lease = lease

    def info(self, digest: digests.Digest | str) -> store.Info:
        """The blob's size and labels. Raises :class:`NotFound`.

        Under a lease, the blob joins the lease first (see
        :func:`~agent.images.containerd.leases.protect`).
        """
        if self.lease:
            leases.protect(self.client, self.lease, str(digest), "content")
        response = self.client.unary(
            _SERVICE + "Info",
            content_pb2.InfoRequest(digest=str(digest)),
            content_pb2.InfoResponse,
            lease=self.lease,
            what=f"content.Info {digest}",
        )
        return _info(response.info)

    def exists(self, digest: digests.Digest | str) -> bool:
        try:
            self.info(digest)
        except errors.NotFound:
            return False
        return True

    def ensure_labels(self, digest: digests.Digest | str, labels: Mapping[str, str]) -> None:
        """Set ``labels`` on a present blob, keeping its other labels."""
        if not labels:
            return
        self.client.unary(
            _SERVICE + "Update",
            content_pb2.UpdateRequest(
                info=content_pb2.Info(digest=str(digest), labels=dict(labels)),
                update_mask=field_mask_pb2.FieldMask(paths=[f"labels.{k}" for k in labels]),
            ),
            content_pb2.UpdateResponse,
            lease=self.lease,
            what=f"content.Update {digest}",
        )

    def write(
        self,
        ref: str,
        source: BinaryIO,
        size: int,
        expected: digests.Digest | str,
        labels: Mapping[str, str] | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> bool:
        """Copy ``size`` bytes from ``source`` into containerd as ``expected``. ``source`` may
        be a blob still downloading (a follower of its ingest): containerd verifies the digest
        before it commits, so bytes that turn out wrong are never committed.

        An interrupted ingest of the same ``ref`` is resumed where containerd has it. Returns
        ``False`` when the blob was already there (its labels are then merged in).

        Raises:
            Unavailable: another writer holds ``ref`` (containerd: "ref … locked").
            DigestMismatch: containerd computed another digest or size (its message).
        """
        # The stream's request iterator runs in a gRPC thread; each request waits for the
        # answer to the one before, so the queue never holds more than one.
        requests: queue.Queue[content_pb2.WriteContentRequest | None] = queue.Queue()

        def feed() -> Iterator[content_pb2.WriteContentRequest]:
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        call = self.client.stream_stream(
            _SERVICE + "Write", feed(), content_pb2.WriteContentResponse, lease=self.lease
        )
        what = f"content.Write {expected}"
        try:
            with client_mod.translating(what, self.client.address):
                responses = iter(call)
                requests.put(
                    content_pb2.WriteContentRequest(
                        action=content_pb2.STAT, ref=ref, total=size, expected=str(expected)
                    )
                )
                status = next(responses)
                offset = status.offset if 0 <= status.offset <= size else 0
                _skip(source, offset)
                sent = offset
                while sent < size:
                    if cancel is not None and cancel.is_set():
                        raise _Cancelled
                    data = source.read(min(CHUNK, size - sent))
                    if not data:
                        raise errors.SizeMismatch(
                            f"blob {expected}: the local copy ended at {sent} of {size} bytes"
                        )
                    requests.put(
                        content_pb2.WriteContentRequest(
                            action=content_pb2.WRITE, ref=ref, offset=sent, data=data
                        )
                    )
                    sent += len(data)
                    next(responses)
                requests.put(
                    content_pb2.WriteContentRequest(
                        action=content_pb2.COMMIT,
                        ref=ref,
                        total=size,
                        offset=sent,
                        expected=str(expected),
                        labels=dict(labels or {}),
                    )
                )
                done = next(responses)
                if done.digest and done.digest != str(expected):
                    raise errors.DigestMismatch(
                        f"containerd committed {done.digest} for blob {expected}"
                    )
                return True
        except errors.AlreadyExists:
            self.ensure_labels(expected, labels or {})
            return False
        except errors.ImageError as e:
            if "unexpected commit digest" in str(e) or "unexpected commit size" in str(e):
                raise errors.DigestMismatch(str(e)) from e
            raise
        except _Cancelled as e:
            call.cancel()  # containerd keeps the ingest: a later write resumes it
            raise errors.Unavailable(
                f"writing blob {expected} into containerd was cancelled"
            ) from e
        finally:
            requests.put(None)  # ends the request iterator in every case

    def open_blob(self, digest: digests.Digest) -> BinaryIO:
        """Read a blob from containerd (the :class:`~store.BlobProvider` capability).

        Raises:
            NotFound: containerd does not have it.
        """
        self.info(digest)  # a missing blob fails here, not at the first read
        responses = self.client.unary_stream(
            _SERVICE + "Read",
            content_pb2.ReadContentRequest(digest=str(digest)),
            content_pb2.ReadContentResponse,
            lease=self.lease,
            what=f"content.Read {digest}",
        )
        return io.BufferedReader(_StreamReader(responses), buffer_size=CHUNK)

    def abort(self, ref: str) -> None:
        """Drop the ingest ``ref`` (missing is fine)."""
        try:
            self.client.unary(
                _SERVICE + "Abort",
                content_pb2.AbortRequest(ref=ref),
                empty_pb2.Empty,
                lease=self.lease,
                what=f"content.Abort {ref}",
            )
        except errors.NotFound:
            pass


class Ingest:
    """One blob streamed into containerd's content ingest ``ref`` as its bytes come.

    :meth:`write` hands bytes to a worker thread that runs the ``Write`` stream (at most
    ``depth`` chunks of :data:`CHUNK` bytes wait; then it blocks); :meth:`commit` sends the
    rest and ``COMMIT`` with the expected size, digest and labels. The ingest starts at
    offset 0 (containerd truncates what an interrupted ingest of ``ref`` left). Nothing is
    visible in containerd until the commit, which containerd verifies.

    Once the worker fails (containerd busy, another writer holding ``ref``), :meth:`write`
    drops the bytes and :meth:`commit` raises that error; :meth:`cancel` stops it and leaves
    the uncommitted ingest to containerd (a later write truncates it, its GC removes it).
    """

    def __init__(
        self,
        content: ContainerdContent,
        ref: str,
        size: int,
        expected: digests.Digest | str,
        *,
        depth: int = 4,
    ):
        self.ref = ref
        self.size = size
        self.expected = str(expected)
        self._content = content
        self._chunks: queue.Queue[bytes | None] = queue.Queue(depth)
        self._buffer = bytearray()
        self._labels: dict[str, str] = {}
        self._stop = threading.Event()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._existed = False
        self._thread = threading.Thread(target=self._run, name="ctrd-ingest", daemon=True)
        self._thread.start()

    def write(self, data: bytes) -> None:
        """Queue ``data`` (the blob's next bytes)."""
        if self._done.is_set():
            return
        self._buffer += data
        while len(self._buffer) >= CHUNK:
            self._put(bytes(self._buffer[:CHUNK]))
            del self._buffer[:CHUNK]

    def commit(self, labels: Mapping[str, str] | None = None) -> bool:
        """Send what is left and commit; ``False``: containerd had the blob already.

        Raises:
            DigestMismatch: the bytes written are not ``expected`` (containerd's check).
            Unavailable, ContainerdError: the stream failed; nothing was committed.
        """
        self._labels = dict(labels or {})
        if self._buffer:
            self._put(bytes(self._buffer))
            self._buffer.clear()
        self._put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._existed:
            self._content.ensure_labels(self.expected, self._labels)
        return not self._existed

    def cancel(self) -> None:
        """Stop without committing."""
        self._stop.set()
        self._thread.join()

    def _put(self, item: bytes | None) -> None:
        while not self._done.is_set():
            try:
                self._chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _next_chunk(self) -> bytes | None:
        while True:
            if self._stop.is_set():
                raise _Cancelled
            try:
                return self._chunks.get(timeout=0.1)
            except queue.Empty:
                continue

    def _run(self) -> None:
        content = self._content
        requests: queue.Queue[content_pb2.WriteContentRequest | None] = queue.Queue()

        def feed() -> Iterator[content_pb2.WriteContentRequest]:
            while (item := requests.get()) is not None:
                yield item

        call = content.client.stream_stream(
            _SERVICE + "Write", feed(), content_pb2.WriteContentResponse, lease=content.lease
        )
        ref, expected = self.ref, self.expected
        try:
            with client_mod.translating(f"content.Write {expected}", content.client.address):
                responses = iter(call)
                requests.put(
                    content_pb2.WriteContentRequest(
                        action=content_pb2.STAT, ref=ref, total=self.size, expected=expected
                    )
                )
                next(responses)
                sent = 0
                while (chunk := self._next_chunk()) is not None:
                    requests.put(
                        content_pb2.WriteContentRequest(
                            action=content_pb2.WRITE, ref=ref, offset=sent, data=chunk
                        )
                    )
                    sent += len(chunk)
                    next(responses)
                requests.put(
                    content_pb2.WriteContentRequest(
                        action=content_pb2.COMMIT,
                        ref=ref,
                        total=self.size,
                        offset=sent,
                        expected=expected,
                        labels=self._labels,
                    )
                )
                done = next(responses)
                if done.digest and done.digest != expected:
                    raise errors.DigestMismatch(
                        f"containerd committed {done.digest} for blob {expected}"
                    )
        except errors.AlreadyExists:
            self._existed = True
        except _Cancelled:
            call.cancel()
            self._error = errors.Unavailable(
                f"writing blob {expected} into containerd was cancelled"
            )
        except errors.ImageError as e:
            call.cancel()
            if "unexpected commit digest" in str(e) or "unexpected commit size" in str(e):
                self._error = errors.DigestMismatch(str(e))
            else:
                self._error = e
        except BaseException as e:  # pragma: no cover - reported by commit()
            call.cancel()
            self._error = e
        finally:
            requests.put(None)
            self._done.set()


class _Cancelled(Exception):
    pass


class _StreamReader(io.RawIOBase):
    """A read-only file over a stream of ``ReadContentResponse`` messages."""

    def __init__(self, responses: Iterator[content_pb2.ReadContentResponse]):
        self._responses = responses
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not self._pending:
            try:
                self._pending = next(self._responses).data
            except StopIteration:
                return 0
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n

    def close(self) -> None:
        close = getattr(self._responses, "close", None)
        if close is not None:
            close()
        super().close()


def ingest_ref(kind: str, digest: digests.Digest | str) -> str:
    """containerd's ingest ref for a blob: ``layer-sha256:…``, ``manifest-…``, ``config-…``."""
    return f"{kind}-{digest}"


def _info(info: content_pb2.Info) -> store.Info:
    return store.Info(
        digest=digests.Digest(info.digest),
        size=info.size,
        created_at=info.created_at.ToNanoseconds() / 1e9,
        labels=dict(info.labels),
    )


def _skip(source: BinaryIO, offset: int) -> None:
    """Move ``source`` to ``offset``: seek when it can (to 0 too: a descriptor duplicated for
    an earlier try shares its position), else read past the bytes."""
    seekable = getattr(source, "seekable", None)
    if seekable is not None and seekable():
        source.seek(offset)
        return
    left = offset
    while left:
        data = source.read(min(CHUNK, left))
        if not data:
            raise errors.SizeMismatch(f"the local copy ended before {offset} bytes")
        left -= len(data)
