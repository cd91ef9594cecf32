"""``ImageService``: pull an image into the content store and unpack it into snapshots.

``pull(reference)`` is containerd's CRI ``PullImage`` without Kubernetes:

1. **resolve** the reference (``HEAD``, then ``GET`` unless the manifest is already stored),
   and pick the platform's manifest from an index;
2. **fetch** the config and every layer concurrently (``max_concurrent_downloads`` per pull,
   a node-wide limit shared by all pulls of this service), each blob streamed into an ingest,
   hashed as it arrives, resumed with ``Range`` after a broken or silent connection, and
   committed only once verified. Blobs already in the store are not downloaded; a blob two
   pulls need at once is downloaded once (a lock per digest);
3. **unpack** the layers into snapshots named by chain ID (skipping chains that exist),
   ``syncfs``-ing each before it is committed when configured;
4. **record** the image (name → digest, platform manifest, config, top chain ID).

Progress goes to the caller's ``on_event`` through a :class:`PullProgress`; a
:class:`StallWatchdog` cancels a pull that makes no byte progress for the progress timeout
with :class:`~agent.images.errors.PullStalled`. A request whose socket goes silent on its own
is aborted and resumed (a recovered stall) while the others keep flowing.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Final, cast

from agent.images import (
    descriptors,
    digests,
    durations,
    errors,
    gc,
    locks,
    mediatypes,
    platforms,
    records,
    references,
    tracing,
)
from agent.images.content import local
from agent.images.content import store as content_store
from agent.images.progress import events, stall, tracker
from agent.images.registry import client as registry_client

if TYPE_CHECKING:
    from agent.images.containerd import backend as containerd_backend
    from agent.images.snapshots import snapshotter as snapshotter_api

EventCallback = Callable[[events.ProgressEvent], None]

SPAN_PREFIX = "agent.images.service"

#: Resumes of one blob after a broken (not silent) connection before the pull fails.
MAX_BLOB_RESUMES = 5


@dataclass(frozen=True)
class PullResult:
    """What a pull did."""

    reference: str
    #: the digest the reference resolved to (the index's, for a multi-platform image)
    digest: digests.Digest
    media_type: str
    manifest_digest: digests.Digest
    config_digest: digests.Digest
    platform: str
    layers: int
    #: bytes of every blob the image needs (compressed, as stored)
    size: int
    #: bytes this pull actually downloaded (0 when everything was present)
    bytes_downloaded: int
    #: top chain ID ("" when not unpacked)
    chain_id: str
    seconds: float
    stalls: int
    stall_cancellations: int
    retries: int

    def to_json(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, digests.Digest) else v) for k, v in
                dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class ServiceOptions:
    """Plain arguments for :class:`ImageService` (the edge builds them from settings)."""

    max_concurrent_downloads: int = 3
    node_max_concurrent_downloads: int = 8
    #: seconds without byte progress before a pull is cancelled; 0 disables
    progress_timeout: float = 300.0
    min_bytes_per_second: float = 0.0
    sync_fs: bool = False
    #: "overlayfs", "naive", "containerd" (unpack into the node's containerd), or ""
    #: (content only, no unpack)
    snapshotter: str = "overlayfs"
    max_layer_uncompressed_bytes: int = 32 * 1024**3
    unpack_concurrency: int = 2
    #: delete layer blobs once their snapshots are committed (containerd's option)
    discard_unpacked_layers: bool = False
    #: with ``snapshotter="containerd"``: the node's containerd, where images are imported
    containerd_address: str = "/run/containerd/containerd.sock"
    containerd_namespace: str = "k8s.io"
    containerd_snapshotter: str = "overlayfs"


class ImageService:
    """Pulls images into a store root. Create one per process; close it when done.

    Layout of ``root``: ``content/`` (:class:`LocalStore`), ``snapshots/`` (the
    snapshotter), ``images.db`` (:class:`ImageRecords`).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        registry: registry_client.RegistryClient,
        options: ServiceOptions | None = None,
        *,
        snapshotter: snapshotter_api.Snapshotter | None = None,
    ):
        self.root = Path(root)
        self.options = options or ServiceOptions()
        self.registry = registry
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _open_shared_lock(self.root / "lock")
        # What in-flight pulls hold (blob digests, chain IDs): GC keeps it. A pull adds a name
        # *before* it looks for or stores that content, and GC checks under the same lock at
        # the moment it deletes, so a delete and a lease never interleave.
        self._leases: dict[int, set[str]] = {}
        self._lease_lock = threading.Lock()
        self.content = local.LocalStore(self.root / "content")
        self.records = records.ImageRecords(self.root / "images.db")
        self.containerd: containerd_backend.ContainerdBackend | None = None
        if self.options.snapshotter == "containerd":
            from agent.images.containerd import backend as containerd_backend

            # containerd owns the snapshots: never give them to the local GC or cleanup().
            self.containerd = containerd_backend.ContainerdBackend(
                self.options.containerd_address,
                self.options.containerd_namespace,
                self.options.containerd_snapshotter,
                max_uncompressed_bytes=self.options.max_layer_uncompressed_bytes,
            )
            self.containerd.start()
        self.snapshotter = snapshotter if snapshotter is not None else self._make_snapshotter()
        self._clean_leftovers()
        self._blob_locks = locks.KeyedLock()
        self._node_downloads = asyncio.Semaphore(max(1, self.options.node_max_concurrent_downloads))

    def _clean_leftovers(self) -> None:
        """Sweep what killed processes left: active snapshots of dead owners, half-built
        snapshot directories, ingests whose blob was published. Only when no other process
        has the store open (the lock can be held exclusively): a live agent's unpack in
        progress looks like a leftover from outside."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # a failed upgrade drops the lock
            return
        try:
            self.content.clean_finished_ingests()
            if self.snapshotter is not None:
                self.snapshotter.cleanup()
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def _make_snapshotter(self) -> snapshotter_api.Snapshotter | None:
        name = self.options.snapshotter
        if not name or name == "containerd":
            return None
        if name == "overlayfs":
            from agent.images.snapshots import overlay

            # syncfs is the unpacker's job (after each layer's files, before its commit).
            return overlay.OverlaySnapshotter(self.root / "snapshots")
        if name == "naive":
            from agent.images.snapshots import naive

            return naive.NaiveSnapshotter(self.root / "snapshots-naive")
        raise errors.ImageError(
            f"unknown snapshotter {name!r}: expected 'overlayfs', 'naive' or 'containerd'"
        )

    def close(self) -> None:
        self.records.close()
        if self.snapshotter is not None:
            self.snapshotter.close()
        if self.containerd is not None:
            self.containerd.close()
        os.close(self._lock_fd)

    # Images on this node.

    def list_images(self) -> list[ImageStatus]:
        """Every image record, with whether its snapshot chain is ready to mount."""
        return [ImageStatus(r, self._unpacked(r)) for r in self.records]

    def image(self, reference: str | references.Reference) -> records.ImageRecord:
        """The record of ``reference`` (normalised). Raises :class:`NotFound`."""
        return self.records.get(str(_parse(reference)))

    async def remove(self, reference: str | references.Reference) -> gc.Result:
        """Drop the image's record, then collect what nothing else needs (``ctr rm --sync``)."""
        name = str(_parse(reference))
        await asyncio.to_thread(self.records.delete, name)
        return await self.gc()

    async def gc(self) -> gc.Result:
        """Remove blobs and snapshots no image record, mount or in-flight pull needs.

        Raises:
            Unavailable: another process has this store open (its pulls are not leased here).
        """
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            # A failed upgrade drops the lock; taking it back may wait (off the event loop).
            await asyncio.to_thread(fcntl.flock, self._lock_fd, fcntl.LOCK_SH)
            raise errors.Unavailable(
                f"the store {self.root} is in use by another prefetcher process (the node"
                " agent?); garbage collection runs there, or stop it first"
            ) from e
        try:
            with tracing.span(SPAN_PREFIX, "gc"):
                return await asyncio.to_thread(
                    gc.collect,
                    self.content,
                    self.snapshotter,
                    list(self.records),
                    leased=self._is_leased,
                    lease_lock=self._lease_lock,
                    discard_unpacked_layers=self.options.discard_unpacked_layers,
                )
        finally:
            await asyncio.to_thread(fcntl.flock, self._lock_fd, fcntl.LOCK_SH)

    def mount(self, reference: str | references.Reference, target: str | os.PathLike[str]) -> None:
        """Mount the image's root filesystem read-only at ``target`` (a view snapshot).

        The mount is ``ro,nosuid,nodev``: it is there to be inspected, so an image's setuid
        binaries and device nodes give nobody the host's privileges or devices.
        """
        record = self.image(reference)
        if self.containerd is not None:
            raise errors.NotFound(
                f"{record.name} lives in containerd's snapshotter here; mount it with"
                f" `ctr -n {self.options.containerd_namespace} image mount {record.name} DIR`"
            )
        if self.snapshotter is None or not self._chain_ready(record.chain_id):
            raise errors.NotFound(
                f"{record.name} is not unpacked on this node; pull it without --no-unpack"
            )
        from agent.images.snapshots import snapshotter as snapshots

        key = _mount_key(target)
        mounts = self.snapshotter.view(key, record.chain_id, {"prefetcher.dev/mount": key})
        try:
            snapshots.mount_all([m.with_options(*_INSPECT_OPTIONS) for m in mounts], target)
        except BaseException:
            self.snapshotter.remove(key)
            raise

    def unmount(self, target: str | os.PathLike[str]) -> None:
        """Unmount ``target`` and drop its view snapshot."""
        from agent.images.snapshots import snapshotter as snapshots

        if self.snapshotter is None:
            raise errors.NotFound("this store has no snapshotter")
        key = _mount_key(target)
        try:
            self.snapshotter.stat(key)
        except errors.NotFound as e:
            raise errors.NotFound(f"{target} is not a prefetcher mount of {self.root}") from e
        snapshots.unmount(target)
        self.snapshotter.remove(key)

    def _unpacked(self, record: records.ImageRecord) -> bool:
        """Whether the image's whole snapshot chain is committed (here or in containerd)."""
        if self.containerd is None:
            return self._chain_ready(record.chain_id)
        if not record.chain_id:
            return False
        try:
            config = descriptors.ImageConfig.parse(self.content.read_blob(record.config_digest))
            return self.containerd.unpacked_depth(config.diff_ids) == len(config.diff_ids)
        except errors.ImageError:
            return False

    def _registry(self) -> registry_client.RegistryClient:
        """The client of the pull in progress: its own (see ``pull(registry=)``) or ours."""
        return _PULL_REGISTRY.get() or self.registry

    def _chain_ready(self, chain_id: str) -> bool:
        if not chain_id or self.snapshotter is None:
            return False
        try:
            return self.snapshotter.stat(chain_id).kind.name == "COMMITTED"
        except errors.NotFound:
            return False

    @contextlib.contextmanager
    def _lease(self) -> Iterator[set[str]]:
        """A set of blob digests and chain IDs that GC must keep while the block runs."""
        held: set[str] = set()
        token = id(held)
        with self._lease_lock:
            self._leases[token] = held
        try:
            yield held
        finally:
            with self._lease_lock:
                del self._leases[token]

    def _hold(self, lease: set[str], *names: object) -> None:
        """Add ``names`` to ``lease``: call it before looking for or storing them."""
        with self._lease_lock:
            lease.update(str(n) for n in names)

    def _is_leased(self, name: str, *, besides: set[str] | None = None) -> bool:
        """Whether an in-flight pull (other than ``besides``) holds ``name``. Call with
        ``_lease_lock`` held."""
        return any(name in held for held in self._leases.values() if held is not besides)

    # Pull.

    async def pull(
        self,
        reference: str | references.Reference,
        *,
        platform: descriptors.Platform | None = None,
        on_event: EventCallback | None = None,
        progress_timeout: float | None = None,
        unpack: bool = True,
        labels: dict[str, str] | None = None,
        pinned: bool = False,
        registry: registry_client.RegistryClient | None = None,
    ) -> PullResult:
        """Pull ``reference`` for ``platform`` (default: this host's). See the module doc.

        ``pinned`` (containerd backend) labels the image so kubelet's image GC keeps it.
        ``registry`` replaces the service's client for this pull only: the node agent passes
        one holding just the credentials of the pull secrets this image was dispatched with.

        Raises:
            ImageError: any subclass; :class:`PullStalled` when cancelled for no progress.
        """
        ref = reference if isinstance(reference, references.Reference) else references.parse(
            reference
        )
        want = platform or platforms.default()
        timeout = self.options.progress_timeout if progress_timeout is None else progress_timeout
        progress = tracker.PullProgress(str(ref), on_event)
        started = time.monotonic()
        token = _PULL_REGISTRY.set(registry)  # tasks created below inherit it
        try:
            return await self._pull_traced(
                ref, want, progress, timeout, unpack, labels, pinned, started
            )
        finally:
            _PULL_REGISTRY.reset(token)

    async def _pull_traced(
        self,
        ref: references.Reference,
        want: descriptors.Platform,
        progress: tracker.PullProgress,
        timeout: float,
        unpack: bool,
        labels: dict[str, str] | None,
        pinned: bool,
        started: float,
    ) -> PullResult:
        stalled: list[errors.PullStalled] = []
        inner: asyncio.Task[PullResult] | None = None

        def cancel(error: errors.PullStalled) -> None:
            stalled.append(error)
            if inner is not None:
                inner.cancel()

        watchdog = stall.StallWatchdog(
            progress, timeout, cancel, min_bytes_per_second=self.options.min_bytes_per_second
        )
        with tracing.span(SPAN_PREFIX, "pull", {tracing.IMAGE_REF: str(ref)}) as span:
            try:
                async with watchdog:
                    inner = asyncio.ensure_future(
                        self._leased_pull(
                            ref, want, progress, timeout, unpack, labels or {}, pinned
                        )
                    )
                    try:
                        result = await asyncio.shield(inner)
                    except asyncio.CancelledError:
                        if not inner.done():  # the caller was cancelled: stop the pull too
                            inner.cancel()
                            with contextlib.suppress(BaseException):
                                await inner
                            raise
                        if inner.cancelled() and stalled:
                            raise stalled[0] from None
                        raise
            except errors.ImageError as e:  # PullStalled included
                progress.set_phase(events.Phase.FAILED, str(e))
                tracing.record_error(span, e)
                raise
            snap = progress.snapshot()
            done = dataclasses.replace(
                result,
                seconds=time.monotonic() - started,
                stalls=snap.stalls,
                stall_cancellations=snap.stall_cancellations,
                retries=snap.retries,
            )
            span.set_attribute("image.digest", str(done.digest))
            span.set_attribute("image.bytes_downloaded", done.bytes_downloaded)
            progress.set_phase(events.Phase.READY, f"{done.reference}@{done.digest}")
            return done

    async def _leased_pull(
        self,
        ref: references.Reference,
        want: descriptors.Platform,
        progress: tracker.PullProgress,
        timeout: float,
        unpack: bool,
        labels: dict[str, str],
        pinned: bool,
    ) -> PullResult:
        with self._lease() as lease:
            return await self._pull(
                ref, want, progress, timeout, unpack, labels, lease, pinned
            )

    async def _pull(
        self,
        ref: references.Reference,
        want: descriptors.Platform,
        progress: tracker.PullProgress,
        timeout: float,
        unpack: bool,
        labels: dict[str, str],
        lease: set[str],
        pinned: bool = False,
    ) -> PullResult:
        progress.set_phase(events.Phase.RESOLVING)
        # Manifest requests count as active for the stall watchdog (digest None: they are
        # not part of the byte totals), as every request does in containerd's reporter.
        with tracing.span(SPAN_PREFIX, "resolve", {tracing.IMAGE_REF: str(ref)}):
            top, top_data = await self._resolve(ref, progress, lease)
        blobs: list[digests.Digest] = [top.digest]
        manifest_desc, manifest_data = top, top_data
        if top.media_type in mediatypes.INDEXES:
            index = descriptors.Index.parse(top_data, top.media_type)
            chosen = platforms.select(index, want, what=str(ref))
            manifest_desc, manifest_data = await self._manifest_by_digest(
                ref, chosen, progress, lease
            )
            blobs.append(manifest_desc.digest)
        elif top.media_type not in mediatypes.MANIFESTS:
            raise errors.UnsupportedMediaType(
                f"{ref} resolved to {top.digest} of media type {top.media_type!r}, which is"
                " neither an image manifest nor an index"
            )
        manifest = descriptors.Manifest.parse(manifest_data, manifest_desc.media_type)
        self._hold(lease, manifest.config.digest, *(layer.digest for layer in manifest.layers))

        progress.set_phase(events.Phase.DOWNLOADING)
        progress.add_blobs([manifest.config, *manifest.layers])
        per_pull = asyncio.Semaphore(max(1, self.options.max_concurrent_downloads))
        with tracing.span(SPAN_PREFIX, "fetch", {tracing.IMAGE_REF: str(ref)}):
            # The config first: its diff IDs name the snapshot chain, which says which layers
            # are needed at all (a layer whose chain is committed needs no download).
            downloaded = await self._fetch_blob(ref, manifest.config, progress, per_pull, timeout)
            config = descriptors.ImageConfig.parse(
                self.content.read_blob(manifest.config.digest)
            )
            if len(config.diff_ids) != len(manifest.layers):
                raise errors.InvalidManifest(
                    f"{ref}: the manifest lists {len(manifest.layers)} layers but the config"
                    f" {manifest.config.digest} has {len(config.diff_ids)} diff IDs"
                )
            self._hold(lease, *digests.chain_ids(config.diff_ids))
            unpacking = unpack and self.snapshotter is not None and bool(manifest.layers)
            needed = list(manifest.layers)
            if unpack and self.containerd is not None:
                needed = await asyncio.to_thread(
                    self._containerd_needs, manifest, config.diff_ids, progress
                )
            if unpacking:
                unpacked = await asyncio.to_thread(self._unpacked_depth, config.diff_ids)
                for layer in manifest.layers[:unpacked]:
                    if not self.content.exists(layer.digest):
                        progress.blob_present(layer)  # its snapshot is there: nothing to fetch
                needed = list(manifest.layers[unpacked:])
            arriving = _ArrivingBlobs(self.content, [d.digest for d in needed])
            try:
                async with asyncio.TaskGroup() as group:  # one failure cancels the rest
                    fetches = [
                        group.create_task(
                            self._fetch_and_announce(ref, desc, progress, per_pull, timeout,
                                                     arriving)
                        )
                        for desc in _unique(needed)
                    ]
                    # Unpacking starts now and takes each layer as soon as its blob is in.
                    unpacked_chain = None
                    if unpacking:
                        unpacked_chain = group.create_task(
                            self._unpack(manifest, config, progress, arriving)
                        )
                        group.create_task(_phase_after(fetches, progress, events.Phase.UNPACKING))
            except BaseExceptionGroup as eg:
                raise _first_error(eg) from None
            finally:
                arriving.close()
            downloaded += sum(t.result() for t in fetches)
        blobs += [manifest.config.digest, *(layer.digest for layer in manifest.layers)]
        chain_id = str(unpacked_chain.result()) if unpacked_chain is not None else ""
        if unpack and self.containerd is not None:
            progress.set_phase(events.Phase.UNPACKING)
            chain_id = await self._import_into_containerd(
                ref, top, manifest_desc, manifest, config, progress, pinned
            )

        progress.set_phase(events.Phase.COMMITTING)
        platform_text = str(config.platform) if config.platform.os else str(want)
        record = records.ImageRecord(
            name=str(ref),
            digest=top.digest,
            media_type=top.media_type,
            size=sum(_blob_sizes(top, manifest_desc, manifest)),
            manifest_digest=manifest_desc.digest,
            config_digest=manifest.config.digest,
            platform=platform_text,
            chain_id=chain_id,
            blobs=tuple(dict.fromkeys(blobs)),
            labels=labels,
        )
        await asyncio.to_thread(self.records.put, record)
        if chain_id and self.options.discard_unpacked_layers:
            await asyncio.to_thread(self._discard_layers, record, manifest, lease)
        return PullResult(
            reference=str(ref),
            digest=top.digest,
            media_type=top.media_type,
            manifest_digest=manifest_desc.digest,
            config_digest=manifest.config.digest,
            platform=platform_text,
            layers=len(manifest.layers),
            size=record.size,
            bytes_downloaded=downloaded,
            chain_id=chain_id,
            seconds=0.0,
            stalls=0,
            stall_cancellations=0,
            retries=0,
        )

    def _discard_layers(
        self, record: records.ImageRecord, manifest: descriptors.Manifest, lease: set[str]
    ) -> None:
        """Delete this image's layer blobs unless an image that is not unpacked, or another
        pull in flight, needs them."""
        needed = {str(b) for r in self.records if not r.chain_id for b in r.blobs}
        for layer in manifest.layers:
            with self._lease_lock:
                if str(layer.digest) in needed or self._is_leased(
                    str(layer.digest), besides=lease
                ):
                    continue
                with contextlib.suppress(errors.NotFound):
                    self.content.delete(layer.digest)

    async def _resolve(
        self, ref: references.Reference, progress: tracker.PullProgress, lease: set[str]
    ) -> tuple[descriptors.Descriptor, bytes]:
        """The top descriptor and its bytes, from the store when the digest is known there.

        Registry requests count as active for the stall watchdog while they are on the wire
        (digest ``None``: not part of the byte totals), as every request does in containerd's
        reporter; storing the manifest afterwards does not.
        """
        if ref.digest is not None:
            desc = descriptors.Descriptor(media_type="", digest=ref.digest, size=0)
            return await self._manifest_by_digest(ref, desc, progress, lease)
        with progress.request(None):
            head = await self._registry().resolve(ref)
        if head is not None:
            self._hold(lease, head.digest)
        if head is not None and self.content.exists(head.digest):
            data = self.content.read_blob(head.digest)
            media_type = descriptors.media_type_of(data, head.media_type)
            return dataclasses.replace(head, media_type=media_type, size=len(data)), data
        with progress.request(None):
            desc, data = await self._registry().fetch_manifest(ref)
        self._hold(lease, desc.digest)
        # (If the tag moved between HEAD and GET, the GET's verified bytes win.)
        await self._store_small(desc, data)
        return desc, data

    async def _manifest_by_digest(
        self,
        ref: references.Reference,
        desc: descriptors.Descriptor,
        progress: tracker.PullProgress,
        lease: set[str],
    ) -> tuple[descriptors.Descriptor, bytes]:
        self._hold(lease, desc.digest)
        if self.content.exists(desc.digest):
            data = self.content.read_blob(desc.digest)
        else:
            with progress.request(None):
                fetched, data = await self._registry().fetch_manifest(ref, str(desc.digest))
            await self._store_small(fetched, data)
        media_type = descriptors.media_type_of(data, desc.media_type)
        if desc.size and desc.size != len(data):
            raise errors.SizeMismatch(
                f"{ref.name}@{desc.digest}: the index says {desc.size} bytes, the manifest has"
                f" {len(data)}"
            )
        return dataclasses.replace(desc, media_type=media_type, size=len(data)), data

    async def _store_small(self, desc: descriptors.Descriptor, data: bytes) -> None:
        async with self._blob_locks.hold(str(desc.digest)):
            if self.content.exists(desc.digest):
                return
            writer = self.content.writer(str(desc.digest), total=len(data))
            try:
                writer.truncate(0)
                writer.write(data)
                await asyncio.to_thread(writer.commit, len(data), desc.digest)
            except errors.AlreadyExists:
                pass
            finally:
                writer.close()

    async def _fetch_blob(
        self,
        ref: references.Reference,
        desc: descriptors.Descriptor,
        progress: tracker.PullProgress,
        per_pull: asyncio.Semaphore,
        progress_timeout: float,
        on_writer: Callable[[descriptors.Descriptor, local.LocalWriter], None] | None = None,
    ) -> int:
        """Download one blob into the store unless it is there. Returns bytes downloaded.

        ``on_writer`` is called with the ingest's writer before the first byte is written
        (the unpack follows the ingest from there, see :class:`_ArrivingBlobs`)."""
        key = str(desc.digest)
        if self.content.exists(desc.digest):
            progress.blob_present(desc)
            return 0
        async with self._blob_locks.hold(key):
            if self.content.exists(desc.digest):
                progress.blob_present(desc)
                return 0
            async with per_pull, self._node_downloads:
                attrs: dict[str, str | int] = {
                    tracing.LAYER_DIGEST: key,
                    tracing.LAYER_SIZE: desc.size,
                    tracing.LAYER_MEDIA_TYPE: desc.media_type,
                }
                with tracing.span(SPAN_PREFIX, "fetch_blob", attrs) as span:
                    got = await self._download(
                        ref, desc, progress, progress_timeout, on_writer
                    )
                    span.set_attribute("blob.bytes_downloaded", got)
                    return got

    async def _download(
        self,
        ref: references.Reference,
        desc: descriptors.Descriptor,
        progress: tracker.PullProgress,
        progress_timeout: float,
        on_writer: Callable[[descriptors.Descriptor, local.LocalWriter], None] | None = None,
    ) -> int:
        writer = await self._open_writer(desc)
        if self.content.exists(desc.digest):
            # Another process held the ingest and published the blob while we waited.
            writer.abort()
            progress.blob_present(desc)
            return 0
        if on_writer is not None:
            on_writer(desc, writer)
        policy = stall.RetryPolicy.for_stall_timeout(progress_timeout)
        downloaded = 0
        stalls = 0
        resumes = 0
        try:
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
                    break
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
        except BaseException:
            writer.close()  # keeps the ingest for a resume; verification failures removed it
            raise
        finally:
            tracing.set_attributes({"blob.retries": stalls + resumes, "blob.stalls": stalls})

    async def _fetch_and_announce(
        self,
        ref: references.Reference,
        desc: descriptors.Descriptor,
        progress: tracker.PullProgress,
        per_pull: asyncio.Semaphore,
        progress_timeout: float,
        arriving: _ArrivingBlobs,
    ) -> int:
        try:
            return await self._fetch_blob(
                ref, desc, progress, per_pull, progress_timeout, arriving.downloading
            )
        finally:
            # Committed, or never will be in this pull: either way an unpack waiting for
            # it must not wait any more (it would hold up the task group's cancellation).
            arriving.arrived(desc.digest)

    def _containerd_needs(
        self,
        manifest: descriptors.Manifest,
        diff_ids: Sequence[digests.Digest],
        progress: tracker.PullProgress,
    ) -> list[descriptors.Descriptor]:
        """Layers to download for the containerd backend: not unpacked there, not its content."""
        assert self.containerd is not None
        depth = self.containerd.unpacked_depth(diff_ids)
        needed = []
        for i, layer in enumerate(manifest.layers):
            if i < depth or self.containerd.has_blob(layer.digest):
                if not self.content.exists(layer.digest):
                    progress.blob_present(layer)
                continue
            needed.append(layer)
        return needed

    async def _import_into_containerd(
        self,
        ref: references.Reference,
        top: descriptors.Descriptor,
        manifest_desc: descriptors.Descriptor,
        manifest: descriptors.Manifest,
        config: descriptors.ImageConfig,
        progress: tracker.PullProgress,
        pinned: bool,
    ) -> str:
        assert self.containerd is not None
        loop = asyncio.get_running_loop()

        def on_layer(event: Any) -> None:  # from worker threads
            if event.kind in ("done", "skipped"):
                loop.call_soon_threadsafe(progress.layer_unpacked, event.layer.digest)

        with tracing.span(SPAN_PREFIX, "import_containerd", {tracing.IMAGE_REF: str(ref)}):
            imported = await self.containerd.import_image(
                self.content,
                ref,
                top,
                manifest,
                manifest.config,
                config.diff_ids,
                manifest_desc=manifest_desc,
                pinned=pinned,
                sync_fs=self.options.sync_fs,
                on_layer=on_layer,
            )
        # containerd holds the layers now; the local copies would only duplicate them.
        for layer in manifest.layers:
            with contextlib.suppress(errors.NotFound):
                self.content.delete(layer.digest)
        return str(imported.chain_id)

    def _unpacked_depth(self, diff_ids: Sequence[digests.Digest]) -> int:
        """How many bottom layers of this image already have committed snapshots."""
        if self.snapshotter is None:
            return 0
        chain = digests.chain_ids(diff_ids)
        for depth in range(len(chain), 0, -1):
            try:
                info = self.snapshotter.stat(str(chain[depth - 1]))
            except errors.NotFound:
                continue
            if info.kind.name == "COMMITTED":
                return depth
        return 0

    async def _open_writer(self, desc: descriptors.Descriptor) -> local.LocalWriter:
        """Open the ingest for ``desc``; wait while another process writes it."""
        delay = 0.05
        while True:
            try:
                return self.content.writer(str(desc.digest), total=desc.size)
            except errors.Unavailable:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _unpack(
        self,
        manifest: descriptors.Manifest,
        config: descriptors.ImageConfig,
        progress: tracker.PullProgress,
        blobs: content_store.BlobProvider,
    ) -> digests.Digest:
        from agent.images.unpack import unpacker as unpacker_mod

        assert self.snapshotter is not None
        loop = asyncio.get_running_loop()

        def on_progress(event: unpacker_mod.UnpackEvent) -> None:  # from worker threads
            if event.kind in ("done", "skipped"):
                loop.call_soon_threadsafe(progress.layer_unpacked, event.layer.digest)

        unpacker = unpacker_mod.Unpacker(
            blobs,
            self.snapshotter,
            sync_fs=self.options.sync_fs,
            max_uncompressed_bytes=self.options.max_layer_uncompressed_bytes,
            concurrency=self.options.unpack_concurrency,
            on_progress=on_progress,
        )
        with tracing.span(SPAN_PREFIX, "unpack", {"image.layers": len(manifest.layers)}):
            return await unpacker.unpack(manifest.layers, config.diff_ids)


async def _phase_after(
    tasks: Sequence[asyncio.Task[Any]], progress: tracker.PullProgress, phase: events.Phase
) -> None:
    """Move to ``phase`` once ``tasks`` have all finished successfully."""
    if tasks:
        await asyncio.wait(tasks)
    if all(not t.cancelled() and t.exception() is None for t in tasks):
        progress.set_phase(phase)


class _ArrivingBlobs:
    """A :class:`BlobProvider` over the content store for an unpack that runs while the
    pull downloads: ``open_blob`` waits, in the unpacker's worker thread, until the blob's
    download has started (or the blob is committed), so a layer is unpacked while it and
    later layers are still downloading.

    A committed blob is opened from the store. A blob still downloading is opened as a
    :class:`~agent.images.content.local.FollowingReader` of its ingest: its bytes are not
    verified yet, and the unpacker must :meth:`~FollowingReader.confirm` them (wait for the
    blob's commit, compare what it read) before it commits the layer's snapshot — and redo
    the layer from the committed blob if that fails (see ``Unpacker``).

    ``arrived()`` (the fetch is over, whatever its outcome) and ``close()`` wake the waiters
    (``close()`` also fails every feed); a blob that is not in the store then raises
    :class:`Unavailable`."""

    def __init__(self, content: local.LocalStore, expected: Sequence[digests.Digest]):
        self._content = content
        self._ready = {str(d): threading.Event() for d in expected}
        self._feeds: dict[str, local.IngestFeed] = {}
        self._lock = threading.Lock()
        self._closed = False

    def downloading(self, desc: descriptors.Descriptor, writer: local.LocalWriter) -> None:
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
        if not self._content.exists(digest):
            with self._lock:
                feed = self._feeds.get(key)
                if feed is not None and not feed.finished:
                    return cast(BinaryIO, feed.reader())
        if not self._content.exists(digest):
            raise errors.Unavailable(f"blob {digest} did not arrive: its download failed")
        return self._content.open_blob(digest)


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group: an image error before anything else."""
    leaves: list[BaseException] = []

    def walk(g: BaseExceptionGroup[BaseException]) -> None:
        for e in g.exceptions:
            if isinstance(e, BaseExceptionGroup):
                walk(e)
            else:
                leaves.append(e)

    walk(group)
    for e in leaves:
        if isinstance(e, errors.ImageError):
            return e
    return leaves[0]


def _unique(descs: Sequence[descriptors.Descriptor]) -> list[descriptors.Descriptor]:
    seen: dict[str, descriptors.Descriptor] = {}
    for d in descs:
        seen.setdefault(str(d.digest), d)
    return list(seen.values())


def _blob_sizes(
    top: descriptors.Descriptor,
    manifest_desc: descriptors.Descriptor,
    manifest: descriptors.Manifest,
) -> list[int]:
    sizes = {str(top.digest): top.size, str(manifest_desc.digest): manifest_desc.size}
    sizes[str(manifest.config.digest)] = manifest.config.size
    for layer in manifest.layers:
        sizes[str(layer.digest)] = layer.size
    return list(sizes.values())


#: The registry client a pull asked for (``pull(registry=…)``), seen by its tasks.
_PULL_REGISTRY: contextvars.ContextVar[registry_client.RegistryClient | None] = (
    contextvars.ContextVar("agent.images.service.pull_registry", default=None)
)


@dataclass(frozen=True)
class ImageStatus:
    """An image record and whether its snapshot chain is committed (ready to mount)."""

    record: records.ImageRecord
    unpacked: bool

    def to_json(self) -> dict[str, Any]:
        r = self.record
        return {
            "name": r.name,
            "digest": str(r.digest),
            "media_type": r.media_type,
            "size": r.size,
            "platform": r.platform,
            "manifest_digest": str(r.manifest_digest),
            "config_digest": str(r.config_digest),
            "chain_id": r.chain_id,
            "unpacked": self.unpacked,
            "created": r.created,
            "updated": r.updated,
            "labels": dict(r.labels),
        }


def _parse(reference: str | references.Reference) -> references.Reference:
    return reference if isinstance(reference, references.Reference) else references.parse(
        reference
    )


#: Mount options of ``prefetcher mount``: an image is inspected, never run, from there.
_INSPECT_OPTIONS: Final = ("ro", "nosuid", "nodev")


def _mount_key(target: str | os.PathLike[str]) -> str:
    return f"mount:{os.path.realpath(target)}"


def _open_shared_lock(path: Path) -> int:
    """Hold ``path`` shared for the service's life; waits while a GC holds it exclusively."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + 60
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except BlockingIOError as e:
            if time.monotonic() > deadline:
                os.close(fd)
                raise errors.Unavailable(
                    f"the store {path.parent} stayed locked by a garbage collection for 60s"
                ) from e
            time.sleep(0.1)
