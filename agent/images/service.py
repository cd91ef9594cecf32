"""``ImageService``: pull an image into the content store and unpack it into snapshots.

``pull(reference)`` is containerd's CRI ``PullImage`` without Kubernetes:

1. **resolve** the reference (``HEAD``, then ``GET`` unless the manifest is already stored),
   and pick the platform's manifest from an index;
2. **fetch** the config, then every layer concurrently (``max_concurrent_downloads`` per pull,
   started in the manifest's order, the unpack's; a node-wide limit shared by all pulls of
   this service), each blob streamed into an ingest
   (ours; for layers, the backend's own when it has one: containerd's content ingest), hashed
   as it arrives, resumed with ``Range`` after a broken or silent connection, and committed
   only once verified. Blobs already in the store are not downloaded; a blob two pulls need
   at once is downloaded once (a lock per digest);
3. **unpack** the layers into snapshots named by chain ID (skipping chains that exist),
   ``syncfs``-ing each before it is committed when configured;
4. **record** the image (name → digest, platform manifest, config, top chain ID).

The service is the pipeline; the pieces live in modules named after them: the
:class:`~agent.images.fetching.Fetcher` (downloads and resumes), the
:class:`~agent.images.leases.Leases` GC leases of the pulls in flight, the
:class:`~agent.images.arriving.ArrivingBlobs` an unpack reads while the pull downloads, and
the :class:`~agent.images.backends.Backend` the edge chose — where the layers are unpacked
and what "unpacked" means (the local store, the node's containerd, a CRI runtime).

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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.images import (
    arriving,
    descriptors,
    digests,
    errors,
    fetching,
    gc,
    leases,
    mediatypes,
    platforms,
    records,
    references,
    tracing,
    turns,
)
from agent.images.backends import backend as backend_api
from agent.images.backends import local as local_backend
from agent.images.content import local
from agent.images.progress import events, stall, tracker
from agent.images.registry import client as registry_client
from agent.images.unpack import readahead

if TYPE_CHECKING:
    from agent.images.snapshots import snapshotter as snapshotter_api

EventCallback = Callable[[events.ProgressEvent], None]

SPAN_PREFIX = tracing.SERVICE_SPANS


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
    #: top chain ID of the snapshots the prefetcher committed ("": it unpacked nothing
    #: itself: content only, or a runtime pulled the layers through the CRI)
    chain_id: str
    seconds: float
    stalls: int
    stall_cancellations: int
    retries: int
    #: the node runtime's ID of the image (CRI ``Image.id``); "" outside a runtime
    image_id: str = ""

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
    max_layer_uncompressed_bytes: int = 32 * 1024**3
    #: refuse an image whose layers unpacked by one pull decompress to more than this in
    #: total (0: no cap); what the failed pull committed is removed unless something uses it
    max_image_uncompressed_bytes: int = 64 * 1024**3
    #: layers one pull takes up at once (each waits for a turn to write its files)
    unpack_concurrency: int = 3
    #: layers whose files this service writes at once, across all its pulls
    max_concurrent_unpacks: int = turns.DEFAULT_LIMIT
    #: delete layer blobs once their snapshots are committed (containerd's option)
    discard_unpacked_layers: bool = False


class ImageService:
    """Pulls images into a store root. Create one per process; close it when done.

    Layout of ``root``: ``content/`` (:class:`LocalStore`), ``images.db``
    (:class:`ImageRecords`), and what the backend keeps there (the local store's
    ``snapshots/``). ``backend`` (default: the local store with overlayfs) is where the
    layers are unpacked; the service owns it from now on and closes it.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        registry: registry_client.RegistryClient,
        options: ServiceOptions | None = None,
        *,
        backend: backend_api.Backend | None = None,
    ):
        self.root = Path(root)
        self.options = options or ServiceOptions()
        # One service per process (see above): it sets the interpreter's switch interval
        # its unpacks' read-ahead threads need.
        readahead.tune_interpreter()
        self.registry = registry
        # A step that fails closes what the earlier ones opened (the backend handed in
        # included: it is ours from the start), so a refused start leaks no socket or fd.
        with contextlib.ExitStack() as undo:
            if backend is not None:
                undo.callback(backend.close)
            self.root.mkdir(parents=True, exist_ok=True)
            if backend is None:
                backend = local_backend.open_store(self.root, "overlayfs")
                undo.callback(backend.close)
            self.backend: backend_api.Backend = backend
            self._lock_fd = _open_shared_lock(self.root / "lock")
            undo.callback(os.close, self._lock_fd)
            self.leases = leases.Leases()
            self._turns = turns.Turns(self.options.max_concurrent_unpacks)
            self.content = local.LocalStore(self.root / "content")
            self.records = records.ImageRecords(self.root / "images.db")
            undo.callback(self.records.close)
            self.fetcher = fetching.Fetcher(
                self.content, self._registry, self.options.node_max_concurrent_downloads
            )
            self._clean_leftovers()
            undo.pop_all()

    @property
    def snapshotter(self) -> snapshotter_api.Snapshotter | None:
        """The snapshots in this store (the local backend's), which GC manages."""
        return self.backend.store_snapshotter

    def _clean_leftovers(self) -> None:
        """Sweep what killed processes left: active snapshots of dead owners, half-built
        snapshot directories, ingests whose blob was published, a backend's leftovers. Only
        when no other process has the store open (the lock can be held exclusively): a live
        agent's unpack in progress looks like a leftover from outside."""
        with self._alone() as alone:
            if alone:
                self.content.clean_finished_ingests()
                self.backend.cleanup()

    @contextlib.contextmanager
    def _alone(self) -> Iterator[bool]:
        """Hold the store's lock exclusively for the block if no other process has the store
        open; yields whether it could. Shared again afterwards (blocking: a thread's job)."""
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)  # a failed upgrade drops the lock
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_SH)

    def close(self) -> None:
        self.records.close()
        self.backend.close()
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
        await self.forget(reference)
        return await self.gc()

    async def forget(self, reference: str | references.Reference) -> None:
        """Release the image to the backend's runtime (unpinned, left to its own GC), then
        drop its record.

        Raises:
            NotFound: no such record.
            ImageError: the runtime refused or did not answer (the unpin failed): the record
                stays, so the image is still the prefetcher's and forgetting it again (the
                agent's next collection, ``prefetcher images rm``) retries the unpin.
        """
        name = str(_parse(reference))
        record = await asyncio.to_thread(self.records.get, name)
        await asyncio.to_thread(self.backend.release, record)
        await asyncio.to_thread(self.records.delete, name)

    def _collect(self) -> gc.Result:
        with self._alone() as alone:
            if not alone:
                raise errors.Unavailable(
                    f"the store {self.root} is in use by another prefetcher process (the node"
                    " agent?); garbage collection runs there, or stop it first"
                )
            return gc.collect(
                self.content,
                self.snapshotter,
                list(self.records),
                leased=self.leases.is_leased,
                lease_lock=self.leases.lock,
                discard_unpacked_layers=self.options.discard_unpacked_layers,
            )

    async def gc(self) -> gc.Result:
        """Remove blobs and snapshots no image record, mount or in-flight pull needs.

        Raises:
            Unavailable: another process has this store open (its pulls are not leased here).
        """
        with tracing.span(SPAN_PREFIX, "gc"):
            return await asyncio.to_thread(self._collect)

    def mount(self, reference: str | references.Reference, target: str | os.PathLike[str]) -> None:
        """Mount the image's root filesystem at ``target`` (a view snapshot), ``ro,nosuid,nodev``:
        it is there to be inspected, never run."""
        self.backend.mount(self.image(reference), target)

    def unmount(self, target: str | os.PathLike[str]) -> None:
        """Unmount ``target`` and drop its view snapshot."""
        self.backend.unmount(target)

    def _unpacked(self, record: records.ImageRecord) -> bool:
        """Whether the image is unpacked where the backend puts images."""
        return self.backend.is_unpacked(record, self.content)

    def _registry(self) -> registry_client.RegistryClient:
        """The client of the pull in progress: its own (see ``pull(registry=)``) or ours."""
        return _PULL_REGISTRY.get() or self.registry

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

        ``pinned`` (the node runtime's backends) pins the image against kubelet's image GC.
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
        with self.leases.held() as lease:
            try:
                return await self._pull(
                    ref, want, progress, timeout, unpack, labels, lease, pinned
                )
            except errors.UnsafeLayer:
                # A bomb or a hostile layer: what this pull committed is of no use to anyone
                # unless another image or pull shares it.
                await asyncio.to_thread(self._drop_unused, lease)
                raise

    def _drop_unused(self, lease: leases.Lease) -> None:
        """Remove the blobs and snapshots ``lease`` names that no image record and no other
        pull uses; skipped while another process has the store open (GC does it later)."""
        with self._alone() as alone:
            if alone:
                gc.collect(
                    self.content,
                    self.snapshotter,
                    list(self.records),
                    leased=lambda name: self.leases.is_leased(name, besides=lease),
                    lease_lock=self.leases.lock,
                    only=set(lease),
                )

    async def _pull(
        self,
        ref: references.Reference,
        want: descriptors.Platform,
        progress: tracker.PullProgress,
        timeout: float,
        unpack: bool,
        labels: dict[str, str],
        lease: leases.Lease,
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
        self.leases.hold(
            lease, manifest.config.digest, *(layer.digest for layer in manifest.layers)
        )

        progress.set_phase(events.Phase.DOWNLOADING)
        # A runtime that pulls the layers itself reports no bytes of them: count none, rather
        # than show them done before they are (the phase message says so).
        counted = manifest.layers if self.backend.info.byte_progress or not unpack else []
        progress.add_blobs([manifest.config, *counted])
        per_pull = asyncio.Semaphore(max(1, self.options.max_concurrent_downloads))
        with tracing.span(SPAN_PREFIX, "fetch", {tracing.IMAGE_REF: str(ref)}):
            # The config first: its diff IDs name the snapshot chain, which says which layers
            # are needed at all (a layer whose chain is committed needs no download).
            downloaded = await self.fetcher.fetch_blob(
                ref, manifest.config, progress, per_pull, timeout
            )
            config = descriptors.ImageConfig.parse(
                self.content.read_blob(manifest.config.digest)
            )
            if len(config.diff_ids) != len(manifest.layers):
                raise errors.InvalidManifest(
                    f"{ref}: the manifest lists {len(manifest.layers)} layers but the config"
                    f" {manifest.config.digest} has {len(config.diff_ids)} diff IDs"
                )
            self.leases.hold(lease, *digests.chain_ids(config.diff_ids))
            unpacking = unpack and self.backend.unpacks and bool(manifest.layers)
            needed = list(manifest.layers)
            if unpacking:
                needed = await asyncio.to_thread(
                    self.backend.layers_to_fetch, manifest, config.diff_ids
                )
                wanted = {str(d.digest) for d in needed}
                for layer in counted:
                    if str(layer.digest) not in wanted and not self.content.exists(layer.digest):
                        progress.blob_present(layer)  # unpacked already: nothing to fetch
            # A backend that keeps the layers itself (containerd) has them written straight
            # into its store: each layer's bytes are written once, and unpacked from there.
            sink = (
                await asyncio.to_thread(self.backend.layer_sink, ref, manifest, config.diff_ids)
                if unpacking and needed
                else None
            )
            blobs_in = arriving.ArrivingBlobs(
                self.content, [d.digest for d in needed], sink
            )
            unique = _unique(needed)
            line = fetching.Line(len(unique))  # downloads start in the unpack's order
            try:
                async with asyncio.TaskGroup() as group:  # one failure cancels the rest
                    fetches = [
                        group.create_task(
                            self._fetch_and_announce(ref, desc, progress, per_pull, timeout,
                                                     blobs_in, sink, line.place(i))
                        )
                        for i, desc in enumerate(unique)
                    ]
                    # Unpacking starts now and takes each layer as soon as its blob is in.
                    unpacked_chain = None
                    if unpacking:
                        job = self._unpacking(
                            ref, top, manifest_desc, manifest, config, progress, blobs_in,
                            timeout, pinned, labels, lease,
                        )
                        job.sink = sink
                        if fetches:
                            group.create_task(
                                _phase_after(fetches, progress, events.Phase.UNPACKING)
                            )
                        else:
                            progress.set_phase(events.Phase.UNPACKING)
                        unpacked_chain = group.create_task(self.backend.unpack(job))
            except BaseExceptionGroup as eg:
                raise _first_error(eg) from None
            finally:
                blobs_in.close()
                if sink is not None:
                    await asyncio.shield(asyncio.to_thread(sink.close))
            downloaded += sum(t.result() for t in fetches)
        blobs += [manifest.config.digest, *(layer.digest for layer in manifest.layers)]
        unpacked = (
            unpacked_chain.result() if unpacked_chain is not None else backend_api.Unpacked()
        )
        chain_id = unpacked.chain_id

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
            image_id=unpacked.image_id,
        )
        await asyncio.to_thread(self.records.put, record)
        if chain_id and self.options.discard_unpacked_layers and self.snapshotter is not None:
            await asyncio.to_thread(self._discard_layers, manifest.layers, lease)
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
            image_id=unpacked.image_id,
        )

    def _unpacking(
        self,
        ref: references.Reference,
        top: descriptors.Descriptor,
        manifest_desc: descriptors.Descriptor,
        manifest: descriptors.Manifest,
        config: descriptors.ImageConfig,
        progress: tracker.PullProgress,
        blobs: arriving.ArrivingBlobs,
        timeout: float,
        pinned: bool,
        labels: dict[str, str],
        lease: leases.Lease,
    ) -> backend_api.Unpacking:
        loop = asyncio.get_running_loop()

        def layer_unpacked(digest: digests.Digest) -> None:  # from any thread
            loop.call_soon_threadsafe(progress.layer_unpacked, digest)

        def layer_written(digest: digests.Digest, uncompressed: int) -> None:  # any thread
            loop.call_soon_threadsafe(progress.layer_written, digest, uncompressed)

        return backend_api.Unpacking(
            ref=ref,
            target=top,
            manifest_desc=manifest_desc,
            manifest=manifest,
            config=config,
            blobs=blobs,
            content=self.content,
            layer_unpacked=layer_unpacked,
            layer_written=layer_written,
            progress=progress,
            registry=self._registry(),
            progress_timeout=timeout,
            pinned=pinned,
            sync_fs=self.options.sync_fs,
            max_uncompressed_bytes=self.options.max_layer_uncompressed_bytes,
            max_image_uncompressed_bytes=self.options.max_image_uncompressed_bytes,
            concurrency=self.options.unpack_concurrency,
            turns=self._turns,
            labels=labels,
            discard_layers=lambda layers: self._discard_layers(layers, lease),
        )

    def _discard_layers(
        self, layers: Sequence[descriptors.Descriptor], lease: leases.Lease
    ) -> None:
        """Delete these layer blobs unless an image that is not unpacked, or another pull in
        flight, needs them."""
        needed = {str(b) for r in self.records if not r.chain_id for b in r.blobs}
        for layer in layers:
            with self.leases.lock:
                if str(layer.digest) in needed or self.leases.is_leased(
                    str(layer.digest), besides=lease
                ):
                    continue
                with contextlib.suppress(errors.NotFound):
                    self.content.delete(layer.digest)

    async def _resolve(
        self, ref: references.Reference, progress: tracker.PullProgress, lease: leases.Lease
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
            self.leases.hold(lease, head.digest)
        if head is not None and self.content.exists(head.digest):
            data = self.content.read_blob(head.digest)
            media_type = descriptors.media_type_of(data, head.media_type)
            return dataclasses.replace(head, media_type=media_type, size=len(data)), data
        with progress.request(None):
            desc, data = await self._registry().fetch_manifest(ref)
        self.leases.hold(lease, desc.digest)
        # (If the tag moved between HEAD and GET, the GET's verified bytes win.)
        await self.fetcher.store_small(desc, data)
        return desc, data

    async def _manifest_by_digest(
        self,
        ref: references.Reference,
        desc: descriptors.Descriptor,
        progress: tracker.PullProgress,
        lease: leases.Lease,
    ) -> tuple[descriptors.Descriptor, bytes]:
        self.leases.hold(lease, desc.digest)
        if self.content.exists(desc.digest):
            data = self.content.read_blob(desc.digest)
        else:
            with progress.request(None):
                fetched, data = await self._registry().fetch_manifest(ref, str(desc.digest))
            await self.fetcher.store_small(fetched, data)
        media_type = descriptors.media_type_of(data, desc.media_type)
        if desc.size and desc.size != len(data):
            raise errors.SizeMismatch(
                f"{ref.name}@{desc.digest}: the index says {desc.size} bytes, the manifest has"
                f" {len(data)}"
            )
        return dataclasses.replace(desc, media_type=media_type, size=len(data)), data

    async def _fetch_and_announce(
        self,
        ref: references.Reference,
        desc: descriptors.Descriptor,
        progress: tracker.PullProgress,
        per_pull: asyncio.Semaphore,
        progress_timeout: float,
        blobs: arriving.ArrivingBlobs,
        sink: backend_api.LayerSink | None,
        place: fetching.Place,
    ) -> int:
        if sink is not None and self.content.exists(desc.digest):
            sink = None  # in our store already (left by an earlier pull): read from there
        try:
            return await self.fetcher.fetch_blob(
                ref, desc, progress, per_pull, progress_timeout, blobs.downloading, sink,
                place,
            )
        finally:
            # Committed, or never will be in this pull: either way an unpack waiting for
            # it must not wait any more (it would hold up the task group's cancellation).
            blobs.arrived(desc.digest)


async def _phase_after(
    tasks: Sequence[asyncio.Task[Any]], progress: tracker.PullProgress, phase: events.Phase
) -> None:
    """Move to ``phase`` once ``tasks`` have all finished successfully."""
    if tasks:
        await asyncio.wait(tasks)
    if all(not t.cancelled() and t.exception() is None for t in tasks):
        progress.set_phase(phase)


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
            "image_id": r.image_id,
            "unpacked": self.unpacked,
            "created": r.created,
            "updated": r.updated,
            "labels": dict(r.labels),
        }


def _parse(reference: str | references.Reference) -> references.Reference:
    return reference if isinstance(reference, references.Reference) else references.parse(
        reference
    )


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
