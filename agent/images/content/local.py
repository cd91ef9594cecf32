"""``LocalStore``: the content store on a local filesystem.

Layout under the store's root::

    blobs/<algorithm>/<hex>     committed blobs (sha256, sha512), read-only (0444), immutable
    ingest/<sha256(ref)>/data   bytes of an ingest in progress
    ingest/<sha256(ref)>/ref    the ingest's ref (for listing)
    ingest/<sha256(ref)>/total  expected size, if known
    ingest/<sha256(ref)>/lock   flock'd by the one writer of this ingest

A commit fsyncs the data, verifies size and digest, renames it into ``blobs/`` and fsyncs the
directory, so a committed blob is complete and verified even after a power cut. An ingest's
``data`` is kept when a writer closes without committing, which is what makes downloads
resumable; it is removed on any verification failure.

:meth:`LocalWriter.follow` lets another thread read an ingest while it is being written (an
unpack that starts before the download ends): an :class:`IngestFeed` learns of every write,
truncation and the writer's outcome, and its :class:`FollowingReader` s hand out bytes as they
arrive. Those bytes are *unconfirmed*: :meth:`FollowingReader.confirm` succeeds only once the
writer committed the blob (size and digest verified, the writer hashing every byte it wrote)
and tells whether the reader certainly returned the blob's bytes: it did when the writer
never rewrote a byte while the reader was open (bytes below what the writer reported written
only change by a truncation, which the feed counts), so the reader need not hash them again.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from agent.images import descriptors, digests, errors, syscalls, turns
from agent.images.content import store

_READ_CHUNK = 1024 * 1024
#: A following reader that caught up with the download waits for this many new bytes (or
#: the rest of the blob, or the size asked for if smaller) rather than waking per chunk.
_FOLLOW_MIN = 64 * 1024


class LocalStore:
    """A :class:`~agent.images.content.store.ContentStore` in a directory."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._blobs = self.root / "blobs"
        self._ingest = self.root / "ingest"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._ingest.mkdir(parents=True, exist_ok=True)

    # BlobProvider / BlobInfo

    def blob_path(self, digest: digests.Digest) -> Path:
        """Where a committed blob lives (it may not exist)."""
        d = digests.Digest(digest)
        return self._blobs / d.algorithm / d.hex

    def open_blob(self, digest: digests.Digest) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError as e:
            raise errors.NotFound(f"blob {digest} is not in the content store") from e

    def read_blob(
        self, digest: digests.Digest, limit: int = descriptors.MAX_MANIFEST_BYTES
    ) -> bytes:
        """The whole blob, for manifests, indexes and configs: one larger than ``limit``
        bytes (a layer, say) is refused from its size, before anything is read.

        Raises:
            NotFound: no such blob.
            InvalidManifest: the blob is larger than ``limit``.
        """
        with self.open_blob(digest) as f:
            size = os.fstat(f.fileno()).st_size
            if size > limit:
                raise errors.InvalidManifest(
                    f"blob {digest} is {size} bytes, more than the {limit}-byte limit for"
                    " manifests, indexes and configs: it is not one (a layer?), so it is not"
                    " read"
                )
            return f.read(limit)

    def exists(self, digest: digests.Digest) -> bool:
        return self.blob_path(digest).is_file()

    def info(self, digest: digests.Digest) -> store.Info:
        try:
            st = self.blob_path(digest).stat()
        except FileNotFoundError as e:
            raise errors.NotFound(f"blob {digest} is not in the content store") from e
        return store.Info(digest=digests.Digest(digest), size=st.st_size, created_at=st.st_mtime)

    def walk(self) -> Iterator[store.Info]:
        for algo_dir in sorted(self._blobs.iterdir()):
            if not algo_dir.is_dir():
                continue
            for path in sorted(algo_dir.iterdir()):
                try:
                    digest = digests.Digest(f"{algo_dir.name}:{path.name}")
                except errors.InvalidReference:
                    continue
                st = path.stat()
                yield store.Info(digest=digest, size=st.st_size, created_at=st.st_mtime)

    # BlobIngester

    def writer(
        self, ref: str, *, total: int = 0, expected: digests.Digest | None = None
    ) -> LocalWriter:
        path = self._ingest_dir(ref)
        path.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(lock_fd)
            raise errors.Unavailable(f"ingest {ref!r} is being written by another writer") from e
        try:
            if not (path / "ref").exists():
                _write_small(path / "ref", ref)
                _write_small(path / "startedat", repr(time.time()))
            if total:
                _write_small(path / "total", str(total))
            return LocalWriter(self, ref, path, lock_fd, _algorithm_for(ref, expected))
        except BaseException:
            os.close(lock_fd)
            raise

    # BlobManager

    def delete(self, digest: digests.Digest) -> None:
        path = self.blob_path(digest)
        try:
            path.unlink()
        except FileNotFoundError as e:
            raise errors.NotFound(f"blob {digest} is not in the content store") from e

    def ingests(self) -> list[store.IngestStatus]:
        out = []
        for path in sorted(self._ingest.iterdir()):
            try:
                ref = (path / "ref").read_text()
                data = path / "data"
                size = data.stat().st_size if data.exists() else 0
                total_file = path / "total"
                total = int(total_file.read_text()) if total_file.exists() else 0
                started = float((path / "startedat").read_text())
                updated = data.stat().st_mtime if data.exists() else started
            except (OSError, ValueError):
                continue
            out.append(
                store.IngestStatus(
                    ref=ref,
                    offset=size,
                    total=total,
                    expected=None,
                    started_at=started,
                    updated_at=updated,
                )
            )
        return out

    def abort_ingest(self, ref: str) -> None:
        path = self._ingest_dir(ref)
        if not path.exists():
            raise errors.NotFound(f"no ingest {ref!r}")
        shutil.rmtree(path, ignore_errors=True)

    def clean_ingests(self, older_than: float = 0.0) -> list[str]:
        """Remove ingests no writer holds and not updated for ``older_than`` seconds."""
        now = time.time()
        return [
            status.ref
            for status in self.ingests()
            if now - status.updated_at >= older_than and self.remove_idle_ingest(status.ref)
        ]

    def remove_idle_ingest(self, ref: str) -> bool:
        """Remove the ingest ``ref`` unless a writer (in any process) holds it; whether it
        was removed. The writer's lock is taken while removing, so no writer can open it
        half-way through."""
        path = self._ingest_dir(ref)
        try:
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        else:
            shutil.rmtree(path, ignore_errors=True)
            return True
        finally:
            os.close(fd)

    def clean_finished_ingests(self) -> list[str]:
        """Remove ingests that nothing will resume: their blob is committed (a writer died
        between the rename and removing its ingest) or they hold no data. Held ones stay."""
        removed = []
        for path in sorted(self._ingest.iterdir()):
            try:
                ref = (path / "ref").read_text()
            except OSError:
                ref = ""
            finished = not (path / "data").exists() or (
                digests.is_digest(ref) and self.exists(digests.Digest(ref))
            )
            if not finished:
                continue
            try:
                fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            else:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(ref or path.name)
            finally:
                os.close(fd)
        return removed

    def usage(self) -> int:
        """Bytes held by committed blobs."""
        return sum(i.size for i in self.walk())

    def _ingest_dir(self, ref: str) -> Path:
        return self._ingest / hashlib.sha256(ref.encode()).hexdigest()


class FileIngest:
    """An ingest written into one file through a descriptor: hashed as it is written,
    resumed from the bytes already in the file (hashed again on open and on truncate), and
    followed by readers in other threads (:meth:`follow`). The base of the local store's
    :class:`LocalWriter` and of the containerd ingest writer; a subclass opens the file,
    calls :meth:`_rehash`, and commits with :meth:`_verify` first."""

    def __init__(self, ref: str, algorithm: str):
        self._ref = ref
        self._algorithm = algorithm
        self._hasher = digests.Hasher(algorithm)
        self._offset = 0
        self._fd: int | None = None
        self._feed: IngestFeed | None = None

    @property
    def ref(self) -> str:
        return self._ref

    @property
    def offset(self) -> int:
        return self._offset

    def write(self, data: bytes | memoryview) -> None:
        # Unbuffered: what the kernel took is what a killed process leaves for a resume.
        fd = self._require()
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], self._offset + written)
        self._hasher.update(view)
        self._offset += len(view)
        if self._feed is not None:
            self._feed.wrote(self._offset)

    def truncate(self, offset: int = 0) -> None:
        fd = self._require()
        if self._feed is not None:
            self._feed.wrote(min(offset, self._offset))  # before the bytes go
        os.ftruncate(fd, offset)
        self._rehash()
        if self._feed is not None:
            self._feed.wrote(self._offset)

    def digest(self) -> digests.Digest:
        return self._hasher.digest()

    def follow(self, size: int, expected: digests.Digest) -> IngestFeed:
        """An :class:`IngestFeed` of this ingest (one per writer), for readers in other
        threads while it is written. ``size`` and ``expected`` are the blob's."""
        if self._feed is None:
            self._feed = IngestFeed(
                os.dup(self._require()), self._offset, size, digests.Digest(expected)
            )
        return self._feed

    def abort(self) -> None:  # pragma: no cover - every subclass has its own
        raise NotImplementedError

    def _verify(self, size: int, expected: digests.Digest) -> None:
        """Check what was written is the blob; if not, abort the ingest and raise.

        Raises:
            SizeMismatch, DigestMismatch: the bytes are not the blob's.
        """
        if size and self._offset != size:
            got = self._offset
            self.abort()
            raise errors.SizeMismatch(
                f"blob {expected}: got {got} bytes, expected {size}; the download was discarded"
            )
        if self._hasher.algorithm != expected.algorithm:
            self._algorithm = expected.algorithm  # the ref did not say: hash the bytes again
            self._rehash()
        actual = self._hasher.digest()
        if actual != expected:
            self.abort()
            raise errors.DigestMismatch(
                f"blob {expected}: content hashes to {actual}; the registry served bytes that"
                " do not match the digest, so nothing was stored (the registry's copy may be"
                " corrupt or tampered with)"
            )

    def _require(self) -> int:
        if self._fd is None:
            raise errors.Unavailable(f"the ingest {self._ref} is closed")
        return self._fd

    def _rehash(self) -> None:
        """Rebuild the hash state from the bytes in the file (on resume or truncate)."""
        fd = self._require()
        self._hasher = digests.Hasher(self._algorithm)
        offset = 0
        while chunk := os.pread(fd, _READ_CHUNK, offset):
            self._hasher.update(chunk)
            offset += len(chunk)
        self._offset = offset


class LocalWriter(FileIngest):
    """Writes one ingest of a :class:`LocalStore`. See :class:`store.Writer`."""

    def __init__(
        self, owner: LocalStore, ref: str, path: Path, lock_fd: int, algorithm: str = "sha256"
    ):
        super().__init__(ref, algorithm)
        self._owner = owner
        self._path = path
        self._lock_fd = lock_fd
        self._closed = False
        self._fd = os.open(path / "data", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            self._rehash()
        except BaseException:
            os.close(self._fd)
            raise

    def commit(self, size: int, expected: digests.Digest) -> store.Info:
        expected = digests.Digest(expected)
        fd = self._require()
        os.fsync(fd)
        self._verify(size, expected)
        target = self._owner.blob_path(expected)
        if target.exists():
            # Verified, and the same bytes are already published (another writer won): a
            # reader following this ingest read exactly those bytes, so its blob is good.
            if self._feed is not None:
                self._feed.finish(committed=True)
            self._finish(remove=True)
            raise errors.AlreadyExists(f"blob {expected} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.fchmod(fd, 0o444)
        os.rename(self._path / "data", target)
        syscalls.fsync_dir(target.parent)
        info = store.Info(digest=expected, size=self._offset, created_at=time.time())
        if self._feed is not None:
            self._feed.finish(committed=True)
        self._finish(remove=True)
        return info

    def close(self) -> None:
        self._finish(remove=False)

    def abort(self) -> None:
        self._finish(remove=True)

    def _finish(self, *, remove: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._feed is not None:
            self._feed.finish(committed=False)  # no-op after a successful commit
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
        if remove:
            shutil.rmtree(self._path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def __enter__(self) -> LocalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IngestFeed:
    """What a :class:`LocalWriter` has written so far, for :class:`FollowingReader` s in
    other threads. The writer reports every write and truncation (:meth:`wrote`) and its end
    (:meth:`finish`); readers wait for bytes with :meth:`wait_for`.

    The feed holds its own descriptor of the ingest file, so readers keep reading it after
    the commit renamed it into ``blobs/`` and the writer closed. :meth:`close` it when no
    reader will be made any more (readers have their own duplicates).
    """

    def __init__(self, fd: int, offset: int, size: int, expected: digests.Digest):
        self.size = size
        self.expected = expected
        self._fd: int | None = fd
        self._cond = threading.Condition()
        self._written = offset  # bytes at the start of the file that the writer wrote
        self.restarts = 0  # truncations below what was written: bytes read may have changed
        self._wanted: list[int] = []  # the offsets waiting readers need
        self._outcome: bool | None = None  # True committed, False failed, None writing

    # The writer's side (the event loop's thread).

    def wrote(self, offset: int) -> None:
        with self._cond:
            if offset < self._written:
                self.restarts += 1
            self._written = offset
            if self._wanted and min(self._wanted) <= offset:
                self._cond.notify_all()

    def finish(self, *, committed: bool) -> None:
        with self._cond:
            if self._outcome is None:
                self._outcome = committed
                self._cond.notify_all()

    def close(self) -> None:
        """Fail the feed if it is still open, and release its descriptor."""
        self.finish(committed=False)
        with self._cond:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # The readers' side.

    @property
    def finished(self) -> bool:
        return self._outcome is not None

    def reader(self) -> FollowingReader:
        """A reader from offset 0 (raises :class:`Unavailable` once the feed is closed)."""
        with self._cond:
            if self._fd is None:
                raise errors.Unavailable(f"blob {self.expected}: its download is over")
            return FollowingReader(self, os.dup(self._fd))

    def open_committed(self) -> BinaryIO:
        """The blob as a plain file (its own offset), once the writer committed it — its
        size and digest verified — even before it appears where the writer commits it.
        Raises :class:`Unavailable` otherwise, or once the feed is closed."""
        with self._cond:
            if self._outcome is not True or self._fd is None:
                raise errors.Unavailable(f"blob {self.expected}: not committed by its download")
            return open(f"/proc/self/fd/{self._fd}", "rb")  # noqa: SIM115

    def written(self, end: int) -> int | None:
        """What :meth:`wait_for` would return now, or ``None`` if it would wait."""
        with self._cond:
            if self._outcome is False or self._written >= end or self._outcome:
                return self.wait_for(end)
            return None

    def wait_for(self, end: int) -> int:
        """Wait until ``end`` bytes are written (or the writer finished); return how many
        are. Raises :class:`Unavailable` if the writer stopped without committing."""
        with self._cond:
            while True:
                if self._outcome is False:
                    raise errors.Unavailable(
                        f"blob {self.expected}: its download failed or was interrupted"
                    )
                if self._written >= end or self._outcome:
                    return self._written
                self._wanted.append(end)
                try:
                    self._cond.wait()
                finally:
                    self._wanted.remove(end)

    def outcome(self) -> bool:
        """Wait for the writer to finish; whether it committed the blob."""
        with self._cond:
            while self._outcome is None:
                self._cond.wait()
            return self._outcome


class FollowingReader:
    """Reads an ingest from the start while it is being written: :meth:`read` waits for
    bytes that are not there yet and returns ``b""`` after the blob's last byte.

    A reader that has to wait for bytes gives its thread's turn at writing layers to
    another layer meanwhile (:func:`agent.images.turns.waiting`).

    Everything it returns is unconfirmed until :meth:`confirm`, which waits for the writer's
    commit. The reader reads only bytes the writer reported written, and the writer hashed
    each of them and verified the whole at its commit; such bytes only change when the
    ingest is truncated and written again (a resumed download the registry answered from
    offset 0), which the feed counts. So a reader returned exactly the committed blob when
    it read all of it and no truncation happened while it was open — no second hash of the
    compressed bytes; otherwise :meth:`confirm` says it cannot tell, and the caller judges
    what it made of the bytes by other means (the unpacker: the layer's diff ID).
    """

    def __init__(self, feed: IngestFeed, fd: int):
        self._feed = feed
        self._fd: int | None = fd
        self._pos = 0
        self._restarts = feed.restarts

    def read(self, size: int = -1, /) -> bytes:
        if self._fd is None:
            raise ValueError("read of a closed FollowingReader")
        total = self._feed.size
        if size < 0:
            size = _READ_CHUNK
        end = min(total, self._pos + size)
        while self._pos < end:
            want = min(end, self._pos + _FOLLOW_MIN)
            written = self._feed.written(want)
            if written is None:  # not there yet: another layer may write while this waits
                with turns.waiting():
                    written = self._feed.wait_for(want)
            if written <= self._pos:
                # Committed but shorter than the manifest says: the commit cannot have
                # verified such a blob; the caller's confirm() fails.
                return b""
            data = os.pread(self._fd, min(end, written) - self._pos, self._pos)
            if data:
                self._pos += len(data)
                return data
            # Truncated under us (a resume from offset 0): wait for the rewrite.
        return b""

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def confirm(self) -> bool:
        """Wait for the blob's commit; whether the bytes returned were certainly the blob's.

        ``True``: the reader returned the whole blob and the ingest was not truncated while
        it was open. ``False``: it was (a restarted download), so the bytes returned may
        differ from the committed blob's in places.

        Raises:
            Unavailable: the download failed, or the reader has not returned all of the
                blob (it was committed shorter than the manifest says, or not read to the
                end).
        """
        feed = self._feed
        if not feed.outcome():
            raise errors.Unavailable(f"blob {feed.expected}: its download failed")
        if self._pos != feed.size:
            raise errors.Unavailable(
                f"blob {feed.expected}: {self._pos} of its {feed.size} bytes were read"
                " while it downloaded"
            )
        return feed.restarts == self._restarts

    def outcome(self) -> bool:
        """Wait for the download to end; whether the blob was committed."""
        return self._feed.outcome()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> FollowingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _algorithm_for(ref: str, expected: digests.Digest | None) -> str:
    """The hash an ingest is written with: its expected digest's, else its ref's when the ref
    is a digest (as pulls name ingests), else SHA-256 (a commit to another algorithm then
    hashes the data again)."""
    if expected is not None:
        return digests.Digest(expected).algorithm
    if digests.is_digest(ref):
        return digests.Digest(ref).algorithm
    return "sha256"


def _write_small(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
