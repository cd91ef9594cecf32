"""``LocalStore``: the content store on a local filesystem.

Layout under the store's root::

    blobs/sha256/<hex>          committed blobs, read-only (0444), immutable
    ingest/<sha256(ref)>/data   bytes of an ingest in progress
    ingest/<sha256(ref)>/ref    the ingest's ref (for listing)
    ingest/<sha256(ref)>/total  expected size, if known
    ingest/<sha256(ref)>/lock   flock'd by the one writer of this ingest

A commit fsyncs the data, verifies size and digest, renames it into ``blobs/`` and fsyncs the
directory, so a committed blob is complete and verified even after a power cut. An ingest's
``data`` is kept when a writer closes without committing, which is what makes downloads
resumable; it is removed on any verification failure.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from agent.images import digests, errors
from agent.images.content import store

_READ_CHUNK = 1024 * 1024


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

    def read_blob(self, digest: digests.Digest) -> bytes:
        """The whole blob (for small manifests and configs only)."""
        with self.open_blob(digest) as f:
            return f.read()

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
            return LocalWriter(self, ref, path, lock_fd)
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
        removed = []
        now = time.time()
        for status in self.ingests():
            if now - status.updated_at < older_than:
                continue
            path = self._ingest_dir(status.ref)
            try:
                fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            shutil.rmtree(path, ignore_errors=True)
            os.close(fd)
            removed.append(status.ref)
        return removed

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


class LocalWriter:
    """Writes one ingest of a :class:`LocalStore`. See :class:`store.Writer`."""

    def __init__(self, owner: LocalStore, ref: str, path: Path, lock_fd: int):
        self._owner = owner
        self._ref = ref
        self._path = path
        self._lock_fd = lock_fd
        # Unbuffered: chunks are large already, and what write() returned is in the kernel,
        # so a killed process leaves exactly the bytes it reported for a resume.
        self._file = open(path / "data", "a+b", buffering=0)  # noqa: SIM115
        self._hasher = digests.Hasher()
        self._offset = 0
        self._closed = False
        self._rehash()

    @property
    def ref(self) -> str:
        return self._ref

    @property
    def offset(self) -> int:
        return self._offset

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        written = 0
        while written < len(view):
            written += self._file.write(view[written:]) or 0
        self._hasher.update(data)
        self._offset += len(view)

    def truncate(self, offset: int = 0) -> None:
        self._file.truncate(offset)
        self._rehash()

    def commit(self, size: int, expected: digests.Digest) -> store.Info:
        expected = digests.Digest(expected)
        os.fsync(self._file.fileno())
        if size and self._offset != size:
            got = self._offset
            self.abort()
            raise errors.SizeMismatch(
                f"blob {expected}: got {got} bytes, expected {size}; the download was discarded"
            )
        actual = self._hasher.digest()
        if actual != expected:
            self.abort()
            raise errors.DigestMismatch(
                f"blob {expected}: content hashes to {actual}; the registry served bytes that"
                " do not match the digest, so nothing was stored (the registry's copy may be"
                " corrupt or tampered with)"
            )
        target = self._owner.blob_path(expected)
        if target.exists():
            self.abort()
            raise errors.AlreadyExists(f"blob {expected} already exists")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.fchmod(self._file.fileno(), 0o444)
        os.rename(self._path / "data", target)
        _fsync_dir(target.parent)
        info = store.Info(digest=expected, size=self._offset, created_at=time.time())
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
        with contextlib.suppress(OSError):
            self._file.close()
        if remove:
            shutil.rmtree(self._path, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._lock_fd)

    def _rehash(self) -> None:
        """Rebuild the hash state from the bytes on disk (on resume or truncate)."""
        self._hasher = digests.Hasher()
        self._file.seek(0)
        offset = 0
        while chunk := self._file.read(_READ_CHUNK):
            self._hasher.update(chunk)
            offset += len(chunk)
        self._offset = offset
        self._file.seek(0, os.SEEK_END)

    def __enter__(self) -> LocalWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _write_small(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover - some filesystems refuse fsync on dirs
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
