"""``ContainerdIngests``: a pull's layer blobs written straight into containerd's content
ingest — the :class:`~agent.images.content.sinks.BlobSink` of the containerd backend.

A layer is written once, where it stays: the fetcher hashes the downloaded bytes and writes
them into the ``data`` file of containerd's own ingest (under containerd's content root,
``/var/lib/containerd/io.containerd.content.v1.content/ingest/…``, which the agent sees at
the same path, as it sees the snapshotter's directories), and the unpacker follows that file
while it grows, as it follows the local store's ingests. Nothing goes over gRPC but the
ingest's opening and its commit.

Per blob (ref ``layer-<digest>``, as containerd's own fetcher names it):

1. a ``Write`` stream sends ``STAT``: containerd creates the ingest (or finds an interrupted
   one, whose bytes are resumed) and holds its ref lock for as long as the stream stays open,
   so no other writer (containerd's own pull of the same layer, another agent process) writes
   it meanwhile; the stream carries no lease, so containerd keeps an interrupted ingest for
   24 hours for a later pull to resume, as it does for its own pulls;
2. the bytes go into the ``data`` file, hashed as they are written;
3. once the fetcher verified size and digest, the blob is committed:

   * where containerd shares content across namespaces (its metadata plugin's
     ``content_sharing_policy = "shared"``, the default), the verified file is made the blob
     as containerd's own commit makes it (``fsync``, moved to ``blobs/<alg>/<hex>`` while the
     ref's lock is still held, commit time, read-only), the emptied ingest is aborted, and a
     second ``Write`` stream (under the pull's lease) sends ``STAT`` and ``COMMIT`` with the
     expected digest and the layer's labels: containerd finds the blob in its store and
     records it in the namespace without reading it again (its shared-content path, as when
     another namespace has the blob). Hashing hundreds of megabytes a second time would take
     containerd's CPU from the unpack beside it. If the blob is gone before that stream
     (containerd's garbage collector removes blobs no namespace records), containerd starts
     an empty ingest, the bytes are sent to it from the file still open here, and containerd
     verifies them;
   * otherwise (``isolated``, or containerd does not say) the first stream is closed and a
     second one's ``STAT`` makes containerd resume the ingest, hashing the file; ``COMMIT``
     has it verify the digest again before the blob is visible.

A blob whose bytes fail verification, and a cancelled download, abort the ingest: nothing is
left in containerd.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO, Final

from agent.images import digests, errors
from agent.images.containerd import client as client_mod
from agent.images.containerd import content as content_mod
from agent.images.containerd.protos import content_pb2, introspection_pb2
from agent.images.content import local, store

logger = logging.getLogger(__name__)

#: containerd's content plugin, whose ``root`` export is its content store's directory.
CONTENT_PLUGIN: Final = ("io.containerd.content.v1", "content")
#: containerd's metadata plugin, whose ``policy`` export is its content sharing policy.
METADATA_PLUGIN: Final = ("io.containerd.metadata.v1", "bolt")

_SERVICE: Final = "/containerd.services.content.v1.Content/"
#: Tries of a commit whose ref another writer took in the moment between the two streams.
_LOCKED_TRIES: Final = 20


def _exports(client: client_mod.Client, plugin: tuple[str, str]) -> Mapping[str, str]:
    """What containerd's plugin ``(type, id)`` exports (empty if containerd has no such
    plugin)."""
    plugins = client.unary(
        "/containerd.services.introspection.v1.Introspection/Plugins",
        introspection_pb2.PluginsRequest(filters=[f"type=={plugin[0]}"]),
        introspection_pb2.PluginsResponse,
        what="introspection.Plugins",
    ).plugins
    for found in plugins:
        if (found.type, found.id) == plugin:
            return found.exports
    return {}


def content_root(client: client_mod.Client) -> Path | None:
    """containerd's content store directory, if containerd says where it is and this process
    sees it there (with its ``ingest`` directory); ``None`` otherwise."""
    if root := _exports(client, CONTENT_PLUGIN).get("root"):
        if (Path(root) / "ingest").is_dir():
            return Path(root)
    return None


def shares_content(client: client_mod.Client) -> bool:
    """Whether containerd's content sharing policy is ``shared`` (a blob in its store is
    recorded in a namespace without being written again); ``False`` for ``isolated`` and when
    containerd does not say."""
    return _exports(client, METADATA_PLUGIN).get("policy") == "shared"


class ContainerdIngests:
    """Layer blobs of one pull, written into containerd's content ingests.

    Args:
        content: containerd's content service under the pull's lease (commits join it).
        root: containerd's content store directory (:func:`content_root`).
        labels: the labels each layer is committed with, by digest.
        publish: containerd shares content (:func:`shares_content`): a verified blob is
            moved into its store and committed without containerd reading it again.
    """

    #: A cancelled pull's partial ingest is aborted, not left for a resume.
    keeps_cancelled: Final = False

    def __init__(
        self,
        content: content_mod.ContainerdContent,
        root: Path,
        labels: Mapping[str, Mapping[str, str]],
        *,
        publish: bool = False,
    ):
        self.content = content
        self.root = root
        self.labels = {k: dict(v) for k, v in labels.items()}
        self.publish = publish

    def exists(self, digest: digests.Digest) -> bool:
        return self.content.exists(digest)

    def open_blob(self, digest: digests.Digest) -> BinaryIO:
        """A committed blob, read from containerd's blob file (its content service if the
        file is not where the root says). Raises :class:`NotFound`."""
        self.content.info(digest)  # in this namespace (and under the lease), or NotFound
        d = digests.Digest(digest)
        try:
            return open(self.root / "blobs" / d.algorithm / d.hex, "rb")  # noqa: SIM115
        except FileNotFoundError:
            return self.content.open_blob(d)

    def writer(
        self, ref: str, *, total: int = 0, expected: digests.Digest | None = None
    ) -> IngestWriter:
        digest = digests.Digest(expected or ref)
        return IngestWriter(
            self, content_mod.ingest_ref("layer", digest), total, digest,
            self.labels.get(str(digest), {}),
        )


class IngestWriter(local.FileIngest):
    """One blob written into a containerd ingest; a :class:`~..sinks.SinkWriter`.

    If containerd already has the blob, the writer is empty and its :meth:`commit` raises
    :class:`AlreadyExists` (the fetcher checks ``exists`` first and aborts it).
    """

    def __init__(
        self,
        owner: ContainerdIngests,
        ref: str,
        total: int,
        expected: digests.Digest,
        labels: dict[str, str],
    ):
        super().__init__(ref, expected.algorithm)
        self._owner = owner
        self._total = total
        self._expected = expected
        self._labels = labels
        self._closed = False
        self._held: _HeldStream | None = None
        self._data: Path | None = None
        try:
            self._held = _HeldStream(owner.content.client, ref, total, expected)
        except errors.AlreadyExists:
            return  # containerd has the blob: nothing to write
        try:
            self._data = _ingest_data(owner.root, owner.content.client.namespace, ref)
            self._fd = os.open(self._data, os.O_RDWR | os.O_CLOEXEC)
            self._rehash()
        except BaseException:
            self._release()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            raise

    def commit(self, size: int, expected: digests.Digest) -> store.Info:
        """Verify what was written, then have containerd commit it (and verify it again).

        Raises:
            SizeMismatch, DigestMismatch: the bytes are not the blob; the ingest is aborted.
            AlreadyExists: containerd has the blob (committed by another writer).
        """
        expected = digests.Digest(expected)
        if self._fd is None:
            self._finish(committed=True)
            raise errors.AlreadyExists(f"blob {expected} already exists in containerd")
        self._verify(size, expected)
        # The bytes are the blob's: an unpack following them may commit its snapshot now,
        # without waiting for containerd's commit (which can wait behind a snapshot commit
        # holding containerd's metadata lock). If containerd's commit fails, so does the pull.
        if self._feed is not None:
            self._feed.finish(committed=True)
        # Published while containerd's lock on the ref is still held: no other writer can
        # have the ingest's file open when it becomes the blob.
        published = self._owner.publish and self._publish()
        self._release()  # containerd's lock: the commit's stream takes it again
        if published:
            self._abort_ingest("the committed blob's ingest")
        try:
            created = self._commit_in_containerd(size)
        except errors.DigestMismatch:
            self.abort()
            raise
        except BaseException:
            self.close()
            raise
        self._finish(committed=True)
        if not created:
            raise errors.AlreadyExists(f"blob {expected} already exists in containerd")
        return store.Info(digest=expected, size=size, created_at=time.time())

    def close(self) -> None:
        """Stop writing; containerd keeps the ingest for a later pull to resume."""
        self._finish(committed=False)

    def abort(self) -> None:
        """Stop writing and drop the ingest from containerd."""
        self._finish(committed=False)
        self._abort_ingest("the partial ingest")

    # -- internals ----------------------------------------------------------------------

    def _abort_ingest(self, what: str) -> None:
        """Have containerd drop the ingest (its bucket and directory); logged if it could
        not."""
        for attempt in range(_LOCKED_TRIES):
            try:
                self._owner.content.abort(self._ref)
                return
            except errors.Unavailable as e:  # still locked: the writer's stream is closing
                if attempt == _LOCKED_TRIES - 1:
                    logger.warning(f"{what} {self._ref} stays in containerd: {e}")
                    return
            except errors.ImageError as e:
                logger.warning(f"{what} {self._ref} stays in containerd: {e}")
                return
            time.sleep(min(0.02 * 2**attempt, 0.5))

    def _publish(self) -> bool:
        """Make the verified ingest file containerd's blob as its own commit does — flushed,
        moved to ``blobs/<alg>/<hex>`` (never over a blob already there), with the commit
        time, read-only. ``True`` if the blob is now there; the commit that follows records
        it without reading it. On failure (logged) that is left to the ordinary commit."""
        fd, data = self._require(), self._data
        if data is None:  # pragma: no cover - set with the descriptor
            return False
        blob = self._owner.root / "blobs" / self._expected.algorithm / self._expected.hex
        try:
            os.fsync(fd)  # a blob is never visible before its bytes are on disk
            blob.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            os.link(data, blob)
        except FileExistsError:
            return True  # containerd has the blob's file (another namespace's): it is used
        except OSError as e:
            logger.debug(f"blob {self._expected} not moved into containerd's store: {e}")
            return False
        try:
            os.unlink(data)
            os.utime(fd)
            os.fchmod(fd, os.fstat(fd).st_mode & 0o777 & ~0o333)
        except OSError as e:  # as containerd: the blob is there, this is only logged
            logger.warning(f"blob {self._expected}: ingest file, time or mode left: {e}")
        return True

    def _commit_in_containerd(self, size: int) -> bool:
        fd = self._require()
        for attempt in range(_LOCKED_TRIES):
            # containerd finds the published blob, or resumes the ingest (hashing the file);
            # the source is only read if containerd has fewer bytes than were written (it
            # then takes the rest over gRPC).
            with open(os.dup(fd), "rb") as source:
                try:
                    return self._owner.content.write(
                        self._ref, source, size, self._expected, self._labels
                    )
                except errors.Unavailable:
                    if attempt == _LOCKED_TRIES - 1:
                        raise
            time.sleep(min(0.02 * 2**attempt, 0.5))
        return True  # pragma: no cover - the loop returns or raises

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()

    def _finish(self, *, committed: bool) -> None:
        if self._closed:
            return
        self._closed = True
        self._release()
        if self._feed is not None:
            self._feed.finish(committed=committed)
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> IngestWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _HeldStream:
    """A ``Write`` stream that opened (or found) the ingest ``ref`` with ``STAT`` and holds
    containerd's lock on it until :meth:`release`. Without a lease: containerd then expires
    an abandoned ingest after 24 hours instead of with a lease."""

    def __init__(
        self, client: client_mod.Client, ref: str, total: int, expected: digests.Digest
    ):
        self._requests: queue.Queue[content_pb2.WriteContentRequest | None] = queue.Queue()

        def feed() -> Iterator[content_pb2.WriteContentRequest]:
            while (item := self._requests.get()) is not None:
                yield item

        self._what = f"content.Write {expected}"
        self._address = client.address
        self._call = client.stream_stream(
            _SERVICE + "Write", feed(), content_pb2.WriteContentResponse, lease=""
        )
        try:
            with client_mod.translating(self._what, self._address):
                self._responses = iter(self._call)
                self._requests.put(
                    content_pb2.WriteContentRequest(
                        action=content_pb2.STAT, ref=ref, total=total, expected=str(expected)
                    )
                )
                next(self._responses)
        except BaseException:
            self._requests.put(None)
            self._call.cancel()
            raise

    def release(self) -> None:
        """End the stream and wait until containerd closed its writer (and its lock)."""
        self._requests.put(None)
        try:
            with client_mod.translating(self._what, self._address):
                for _ in self._responses:
                    pass
        except errors.ImageError:
            self._call.cancel()


def _ingest_data(root: Path, namespace: str, ref: str) -> Path:
    """The ``data`` file of the ingest ``ref`` of ``namespace`` (containerd names ingest
    directories by the digest of ``<namespace>/<sequence>/<ref>``, its metadata's key)."""
    wanted = re.compile(re.escape(namespace) + r"/\d+/" + re.escape(ref))
    found: list[Path] = []
    with os.scandir(root / "ingest") as entries:
        for entry in entries:
            try:
                text = Path(entry.path, "ref").read_text()
            except OSError:
                continue
            if wanted.fullmatch(text):
                found.append(Path(entry.path, "data"))
    found = [p for p in found if p.exists()]
    if not found:
        raise errors.InvalidConfiguration(  # not Unavailable: waiting would not help
            f"containerd opened the ingest {ref} but it is not under {root}/ingest"
            " (is containerd's root mounted at the same path?)"
        )
    return max(found, key=lambda p: p.stat().st_mtime)
