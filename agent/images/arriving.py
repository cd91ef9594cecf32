"""``ArrivingBlobs``: the blobs of a pull in progress, for an unpack that runs meanwhile.

A :class:`~agent.images.content.store.BlobProvider` over the content store whose
``open_blob`` waits, in the unpacker's worker thread, until the blob's download has started
(or the blob is committed), so a layer is unpacked while it and later layers are still
downloading.

A committed blob is opened from the store. A blob still downloading is opened as a
:class:`~agent.images.content.local.FollowingReader` of its ingest: its bytes are not
verified yet, and the unpacker must :meth:`~FollowingReader.confirm` them (wait for the
blob's commit, learn whether the download was restarted under it) before it commits the
layer's snapshot — and redo the layer from the committed blob if that fails (see
``Unpacker``).

``arrived()`` (the fetch is over, whatever its outcome) and ``close()`` wake the waiters
(``close()`` also fails every feed); an expected blob that is not in the store then raises
:class:`~agent.images.errors.Unavailable`, a blob this pull does not fetch
:class:`~agent.images.errors.NotFound` unless the store has it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import BinaryIO, cast

from agent.images import descriptors, digests, errors
from agent.images.content import local, sinks


class ArrivingBlobs:
    """The blobs ``expected`` by an unpack, as the pull's fetches bring them in."""

    def __init__(
        self,
        content: local.LocalStore,
        expected: Sequence[digests.Digest],
        sink: sinks.BlobSink | None = None,
    ):
        """``sink``: where the pull's fetches commit the ``expected`` blobs, when not into
        ``content`` (a backend's own store); other blobs are read from ``content``."""
        self._store = content
        self._content: sinks.BlobSink = sink if sink is not None else content
        self._ready = {str(d): threading.Event() for d in expected}
        self._feeds: dict[str, local.IngestFeed] = {}
        self._lock = threading.Lock()
        self._closed = False

    def downloading(self, desc: descriptors.Descriptor, writer: sinks.SinkWriter) -> None:
        """The pull opened ``desc``'s ingest: readers may follow it from now on."""
        key = str(desc.digest)
        event = self._ready.get(key)
        if event is None:
            return
        with self._lock:
            if self._closed:
                return
            if key not in self._feeds:
                self._feeds[key] = writer.follow(desc.size, desc.digest)
        event.set()

    def arrived(self, digest: digests.Digest) -> None:
        """The blob's fetch is over: it is in the store, or its download failed."""
        self._ready[str(digest)].set()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            feeds, self._feeds = list(self._feeds.values()), {}
        for feed in feeds:
            feed.close()
        for event in self._ready.values():
            event.set()

    def open_blob(self, digest: digests.Digest) -> BinaryIO:
        key = str(digest)
        event = self._ready.get(key)
        if event is not None:
            event.wait()
        # A download in progress is followed (before asking the store whether the blob is
        # in: a runtime's store answers over its API, and may be busy meanwhile).
        with self._lock:
            feed = self._feeds.get(key)
            if feed is not None and not feed.finished:
                return cast(BinaryIO, feed.reader())
        if event is None:
            # Not fetched by this pull: the store's answer (NotFound lets a backend read it
            # from where it already is, as containerd's backend does).
            return self._store.open_blob(digest)
        if feed is not None and feed.finished:
            # Committed by this pull's download (maybe not yet visible where it goes: a
            # runtime's commit in progress): its verified bytes, as a plain file.
            with contextlib.suppress(errors.Unavailable):
                return feed.open_committed()
        if self._content.exists(digest):
            return self._content.open_blob(digest)
        if self._content is not self._store and self._store.exists(digest):
            return self._store.open_blob(digest)  # in the store already: not fetched again
        raise errors.Unavailable(f"blob {digest} did not arrive: its download failed")
