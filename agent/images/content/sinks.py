"""``BlobSink``: where a pull's fetcher writes a blob, and where its unpack reads it from.

The image service's own :class:`~agent.images.content.local.LocalStore` is one; a backend
that keeps layer blobs itself supplies another (containerd's content ingest:
:class:`~agent.images.containerd.ingests.ContainerdIngests`), so a layer's bytes are written
once, where they stay, and the unpack follows that same ingest while it grows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, BinaryIO, Protocol

from agent.images import digests
from agent.images.content import store

if TYPE_CHECKING:
    from agent.images.content import local


class SinkWriter(store.Writer, Protocol):
    """An ingest a pull writes, which unpacks may follow while it is written."""

    def follow(self, size: int, expected: digests.Digest) -> local.IngestFeed:
        """The ingest's :class:`~agent.images.content.local.IngestFeed` (one per writer)."""
        ...


class BlobSink(Protocol):
    """Blobs a pull downloads: ``exists``, ``open_blob`` (committed) and ``writer``."""

    def exists(self, digest: digests.Digest) -> bool: ...

    def open_blob(self, digest: digests.Digest) -> BinaryIO: ...

    def writer(
        self, ref: str, *, total: int = 0, expected: digests.Digest | None = None
    ) -> SinkWriter:
        """Open (or resume) the ingest of ``ref``. Raises ``Unavailable`` while another
        writer holds it."""
        ...


def keeps_cancelled(sink: BlobSink) -> bool:
    """Whether a cancelled download's partial ingest stays for a later pull to resume
    (the local store: yes; a runtime's content store: no, see its ``keeps_cancelled``)."""
    return bool(getattr(sink, "keeps_cancelled", True))
