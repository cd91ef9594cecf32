"""Content store protocols: what a content-addressed blob store can do, one capability each.

Vocabulary:

* **blob** — bytes addressed by their digest. A committed blob is immutable and complete:
  its size and digest were verified before it became visible.
* **ingest** (named by a **ref** string) — a write in progress. It is invisible to
  :class:`BlobProvider` and :class:`BlobInfo` until :meth:`Writer.commit` succeeds. An
  ingest survives the process: opening a writer with the same ref later resumes at the
  bytes already on disk (``Writer.offset``), which is what lets a download resume with an
  HTTP ``Range`` request.
* **commit** — fsync the data, check size and digest, then atomically rename into place
  and fsync the directory. If the blob already exists the commit raises
  :class:`~agent.images.errors.AlreadyExists` and the ingest is dropped; callers treat
  that as success. On a digest or size mismatch the ingest is removed and nothing becomes
  visible.

Code asks for the narrowest capability it needs: the unpacker takes a :class:`BlobProvider`,
the fetcher a :class:`BlobIngester`, garbage collection a :class:`BlobManager`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO, Protocol, runtime_checkable

from agent.images import digests


@dataclass(frozen=True)
class Info:
    """A committed blob."""

    digest: digests.Digest
    size: int
    created_at: float
    labels: dict[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class IngestStatus:
    """An ingest in progress."""

    ref: str
    offset: int
    total: int
    expected: digests.Digest | None
    started_at: float
    updated_at: float


class Writer(Protocol):
    """One writer of one ingest. Not shared between tasks."""

    @property
    def ref(self) -> str: ...

    @property
    def offset(self) -> int:
        """Bytes already written (and resumable) in this ingest."""
        ...

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data`` and feed it to the running hash."""
        ...

    def truncate(self, offset: int = 0) -> None:
        """Drop everything after ``offset`` (0 restarts the ingest); rehashes what stays."""
        ...

    def digest(self) -> digests.Digest:
        """The digest of the bytes written so far (what a commit would check)."""
        ...

    def commit(self, size: int, expected: digests.Digest) -> Info:
        """Verify and publish. Blocking (fsync): call it from a thread in async code.

        Raises:
            SizeMismatch, DigestMismatch: the ingest is removed, nothing is published.
            AlreadyExists: the blob was already there; the ingest is removed.
        """
        ...

    def close(self) -> None:
        """Release the writer, keeping the ingest for a later resume."""
        ...

    def abort(self) -> None:
        """Release the writer and delete the ingest."""
        ...


@runtime_checkable
class BlobProvider(Protocol):
    """Reads committed blobs."""

    def open_blob(self, digest: digests.Digest) -> BinaryIO:
        """Open a committed blob for reading. Raises :class:`NotFound`."""
        ...


@runtime_checkable
class BlobInfo(Protocol):
    """Looks at committed blobs without reading them."""

    def info(self, digest: digests.Digest) -> Info:
        """Raises :class:`NotFound`."""
        ...

    def exists(self, digest: digests.Digest) -> bool: ...

    def walk(self) -> Iterator[Info]: ...


@runtime_checkable
class BlobIngester(Protocol):
    """Writes new blobs through ingests."""

    def writer(self, ref: str, *, total: int = 0, expected: digests.Digest | None = None) -> Writer:
        """Open (or resume) the ingest ``ref``.

        Raises:
            Unavailable: another writer (in this or another process) holds ``ref``.
        """
        ...


@runtime_checkable
class BlobManager(Protocol):
    """Deletes blobs and lists or aborts ingests."""

    def delete(self, digest: digests.Digest) -> None: ...

    def ingests(self) -> list[IngestStatus]: ...

    def abort_ingest(self, ref: str) -> None: ...


@runtime_checkable
class ContentStore(BlobProvider, BlobInfo, BlobIngester, BlobManager, Protocol):
    """All capabilities together."""
