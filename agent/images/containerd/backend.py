"""``ContainerdBackend``: put a pulled image into the node's containerd, unpacked, as the CRI
plugin would have left it after its own pull — so kubelet finds it present and starts pods
without pulling.

:meth:`ContainerdBackend.import_image` takes an image the image service has resolved and
fetched (its blobs readable through a :class:`~agent.images.content.store.BlobProvider`) and,
holding one containerd lease for the whole import:

1. unpacks each layer whose chain ID containerd does not have: prepare an active snapshot on
   the previous chain ID (key ``extract-<unique> <chainID>``), write the layer with overlay
   whiteouts into the upper directory containerd returned, verify the diff ID, ``syncfs`` if
   asked, commit under the chain ID with ``containerd.io/snapshot.ref`` — the
   :class:`~agent.images.unpack.unpacker.Unpacker` with a :class:`ContainerdSnapshotter`.
   In a pull, each layer containerd lacks is written once, straight into containerd's own
   content ingest by the image service's fetcher (:meth:`ContainerdBackend.layer_sink`, see
   :mod:`.ingests`), hashed as it arrives, and applied from that same ingest file while it
   grows; it is committed with the expected digest (containerd verifies it again) and
   ``containerd.io/uncompressed`` = diff ID once the fetcher verified it. Where containerd's
   content root is not visible to the agent, the fetcher writes into the service's store
   and the bytes the unpacker reads are streamed into containerd's ingest over gRPC
   (:class:`~.content.Ingest`); layers written neither way (already unpacked, found in the
   service's store, a failed stream) are copied or labelled after the unpack;
2. copies the config (``containerd.io/gc.ref.snapshot.<snapshotter>`` = top chain ID), the
   manifest (``gc.ref.content.config`` / ``gc.ref.content.l.<i>``) and the index, if any
   (``gc.ref.content.m.<i>``): children before parents, as containerd's fetcher does;
3. creates or updates the image records the CRI plugin would (tag, ``repo@digest``, image
   ID), labelled ``io.cri-containerd.image=managed`` and, if asked, pinned;
4. deletes the lease: from now on the image record keeps everything from containerd's GC.

A crash at any point leaves no committed partial snapshot (a snapshot is committed only after
its layer is complete and verified), at most an active one and the lease, both labelled with
this process; :meth:`ContainerdBackend.cleanup` removes them at the next start and a rerun
completes the import, resuming interrupted blob copies where containerd has them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, cast

from agent.images import descriptors, digests, errors, mediatypes, records, references, tracing
from agent.images.backends import backend as backend_api
from agent.images.containerd import checks, ingests, leases, prepared_ahead
from agent.images.containerd import client as client_mod
from agent.images.containerd import content as content_mod
from agent.images.containerd import images as images_mod
from agent.images.containerd import snapshotter as snapshotter_mod
from agent.images.content import store
from agent.images.snapshots import chains
from agent.images.snapshots import snapshotter as snapshots
from agent.images.turns import Turns
from agent.images.unpack import compression
from agent.images.unpack import unpacker as unpacker_mod

#: Layer blobs copied into containerd at once.
COPY_CONCURRENCY: Final = 3
#: Tries of a blob copy whose ingest ref another writer holds.
_LOCKED_TRIES: Final = 20


@dataclass(frozen=True)
class ImportResult:
    """What :meth:`ContainerdBackend.import_image` did.

    Attributes:
        chain_id: the top snapshot's name (the image's chain ID).
        names: the image records created or updated.
        blobs_written: blobs copied into containerd's content store (0: it had them all).
        bytes_written: their bytes.
        layers_unpacked: layers applied and committed by this import.
        layers_skipped: layers whose chain ID containerd already had.
        seconds: wall time of the import.
    """

    chain_id: digests.Digest
    names: tuple[str, ...]
    blobs_written: int
    bytes_written: int
    layers_unpacked: int
    layers_skipped: int
    seconds: float


class ContainerdBackend:
    """The node's containerd as the place prefetched images are unpacked into.

    Args:
        address: containerd's socket (``[images.containerd] address``).
        namespace: containerd namespace (``k8s.io``: the CRI plugin's).
        snapshotter: containerd snapshotter (the CRI plugin's, ``overlayfs``).
        copy_layers: copy layer blobs into containerd's content store. ``None`` (default):
            yes, unless :meth:`check` finds the CRI plugin discards unpacked layers.
        max_uncompressed_bytes: refuse a layer that decompresses to more than this.
        max_image_uncompressed_bytes: refuse an image whose layers decompress to more than
            this together (0: no cap).
        lease_expire: seconds after which containerd drops an import's lease by itself.
        client: an existing :class:`~client.Client` (then ``address``/``namespace`` are
            taken from it and :meth:`close` leaves it open).
    """

    def __init__(
        self,
        address: str = "/run/containerd/containerd.sock",
        namespace: str = "k8s.io",
        snapshotter: str = "overlayfs",
        *,
        copy_layers: bool | None = None,
        max_uncompressed_bytes: int = compression.DEFAULT_MAX_UNCOMPRESSED_BYTES,
        max_image_uncompressed_bytes: int = 0,
        lease_expire: float = leases.DEFAULT_EXPIRE,
        client: client_mod.Client | None = None,
    ):
        self._own_client = client is None
        self.client = client or client_mod.Client(address, namespace)
        self.snapshotter_name = snapshotter
        self.snapshotter = snapshotter_mod.ContainerdSnapshotter(self.client, snapshotter)
        self.leases = leases.Leases(self.client)
        self.content = content_mod.ContainerdContent(self.client)
        self.images = images_mod.ContainerdImages(self.client)
        self.copy_layers = copy_layers
        self.max_uncompressed_bytes = max_uncompressed_bytes
        self.max_image_uncompressed_bytes = max_image_uncompressed_bytes
        self.lease_expire = lease_expire
        #: containerd's version, once :meth:`check` has asked
        self.version = ""
        #: containerd's content store directory as this process sees it (``None``: not
        #: visible; then layers are fetched into the service's store and streamed over gRPC)
        self._content_root: Path | None | bool = False  # False: not asked yet
        #: containerd's content sharing policy is ``shared`` (asked with the content root):
        #: verified layers are then moved into its store, not hashed by it again
        self._shares_content = False

    def close(self) -> None:
        if self._own_client:
            self.client.close()

    # -- the image service's backend (:class:`~agent.images.backends.Backend`) ------------

    @property
    def info(self) -> backend_api.RuntimeInfo:
        return backend_api.RuntimeInfo(
            mode="containerd",
            runtime="containerd",
            version=self.version,
            address=self.client.address,
            snapshotter=self.snapshotter_name,
            namespace=self.client.namespace,
            pins=checks.version_tuple(self.version) >= checks.PINNING_VERSION,
        )

    @property
    def unpacks(self) -> bool:
        return True

    @property
    def store_snapshotter(self) -> None:
        """containerd owns the snapshots: never give them to the local GC or cleanup."""
        return None

    def layers_to_fetch(
        self, manifest: descriptors.Manifest, diff_ids: Sequence[digests.Digest]
    ) -> list[descriptors.Descriptor]:
        """Layers neither unpacked in containerd nor in its content store."""
        depth = self.unpacked_depth(diff_ids)
        return [
            layer
            for i, layer in enumerate(manifest.layers)
            if i >= depth and not self.has_blob(layer.digest)
        ]

    def layer_sink(
        self,
        ref: references.Reference,
        manifest: descriptors.Manifest,
        diff_ids: Sequence[digests.Digest],
    ) -> LayerIngests | None:
        """containerd's own content ingests, when its content root is visible here and
        layers are kept as content (not when the CRI discards unpacked layers): the fetcher
        writes each layer there once and the unpack follows it (:mod:`.ingests`)."""
        if self.copy_layers is False:
            return None
        if self._content_root is False:
            try:
                self._content_root = ingests.content_root(self.client)
            except errors.ImageError:
                self._content_root = None
            if self._content_root is not None:
                # Not knowing the policy only means containerd hashes the layers again.
                with contextlib.suppress(errors.ImageError):
                    self._shares_content = ingests.shares_content(self.client)
        root = self._content_root
        if not isinstance(root, Path):
            return None
        source = {f"{content_mod.LABEL_DISTRIBUTION_SOURCE}{ref.domain}": ref.path}
        labels = {
            str(layer.digest): {**source, content_mod.LABEL_UNCOMPRESSED: str(diff_id)}
            for layer, diff_id in zip(manifest.layers, diff_ids, strict=True)
        }
        lease = self.leases.create(expire=self.lease_expire)
        return LayerIngests(
            content_mod.ContainerdContent(self.client, lease=lease), root, labels,
            lambda: self.leases.delete(lease), publish=self._shares_content,
        )

    async def unpack(self, job: backend_api.Unpacking) -> backend_api.Unpacked:
        """Import the image while its layers download: each layer is applied from its
        ingest as the bytes arrive — containerd's own ingest, when :meth:`layer_sink` gave
        one, else the service's, streamed into containerd's as it is read — verified before
        its snapshot or blob is committed; then any local layer copies are dropped."""

        on_layer = job.on_unpack_event

        attrs = {tracing.IMAGE_REF: str(job.ref)}
        with tracing.span(tracing.SERVICE_SPANS, "import_containerd", attrs):
            imported = await self.import_image(
                job.blobs,
                job.ref,
                job.target,
                job.manifest,
                job.manifest.config,
                job.config.diff_ids,
                manifest_desc=job.manifest_desc,
                pinned=job.pinned,
                sync_fs=job.sync_fs,
                concurrency=job.concurrency,
                turns=job.turns,
                on_layer=on_layer,
                max_uncompressed_bytes=job.max_uncompressed_bytes,
                max_image_uncompressed_bytes=job.max_image_uncompressed_bytes,
                stream_layers=not isinstance(job.sink, LayerIngests),
            )
        # containerd holds the layers now; the local copies would only duplicate them (a
        # concurrent pull of an image sharing a layer may still be about to read it).
        await asyncio.to_thread(job.discard_layers, job.manifest.layers)
        # The CRI plugin's image ID is the config's digest (what `crictl images` shows).
        return backend_api.Unpacked(str(imported.chain_id), str(job.manifest.config.digest))

    def is_unpacked(self, record: records.ImageRecord, blobs: store.BlobProvider) -> bool:
        if not record.chain_id:
            return False
        try:
            with blobs.open_blob(record.config_digest) as f:
                config = descriptors.ImageConfig.parse(f.read())
            return self.unpacked_depth(config.diff_ids) == len(config.diff_ids)
        except errors.ImageError:
            return False

    def release(self, record: records.ImageRecord) -> None:
        """Unpin the image's CRI records: kubelet's image GC may remove it from now on.

        Raises:
            Unavailable: containerd did not unpin a record (it names the record and the
                ``ctr`` command that unpins it by hand); calling again retries.
        """
        ref = references.parse(record.name)
        for name in images_mod.cri_names(ref, record.digest, record.config_digest):
            try:
                image = self.images.get(name)
                if image.labels.get(images_mod.LABEL_PINNED):
                    self.images.put(name, image.target, {images_mod.LABEL_PINNED: ""})
            except errors.NotFound:
                continue  # removed by someone else: nothing left to unpin
            except errors.ImageError as e:
                raise errors.Unavailable(
                    f"could not unpin {name} in containerd at {self.client.address}: {e}."
                    " kubelet's image GC will not remove it while it is pinned; unpin it by"
                    f" hand with `ctr -n {self.client.namespace} images label {name}"
                    f" {images_mod.LABEL_PINNED}=`"
                ) from e

    def mount(self, record: records.ImageRecord, target: str | os.PathLike[str]) -> None:
        raise errors.NotFound(
            f"{record.name} lives in containerd's snapshotter here; mount it with"
            f" `ctr -n {self.client.namespace} image mount {record.name} DIR`"
        )

    def unmount(self, target: str | os.PathLike[str]) -> None:
        raise errors.NotFound(
            f"images live in containerd here; unmount with `ctr -n {self.client.namespace}"
            f" image unmount {target}`"
        )

    # -- start-up ------------------------------------------------------------------------

    def check(self) -> checks.Report:
        """Run the start-up checks (:mod:`.checks`); adopts the CRI's layer discarding."""
        report = checks.run(self.client, snapshotter=self.snapshotter_name)
        self.version = report.version
        if self.copy_layers is None and report.cri:
            self.copy_layers = not report.discard_unpacked_layers
        return report

    def start(self) -> checks.Report:
        """:meth:`check` (raising :class:`InvalidConfiguration` on errors), then
        :meth:`cleanup`. Call once when the agent starts."""
        report = self.check()
        report.raise_for_errors()
        self.cleanup()
        return report

    def cleanup(self) -> list[str]:
        """Remove the active snapshots and leases of agent processes that died."""
        return self.snapshotter.cleanup() + self.leases.cleanup()

    # -- what containerd has -----------------------------------------------------------

    def unpacked_depth(self, diff_ids: Sequence[digests.Digest]) -> int:
        """How many bottom layers of an image containerd has committed (their blobs need
        not be downloaded unless containerd should also keep them as content)."""
        return chains.committed_depth(self.snapshotter, diff_ids)

    def image_status(self, reference: str) -> images_mod.CriImage | None:
        """What kubelet would learn about ``reference`` from the CRI (``None``: absent)."""
        return images_mod.cri_image_status(self.client, reference)

    def has_blob(self, digest: digests.Digest) -> bool:
        """Whether containerd's content store has ``digest`` in this namespace."""
        return self.content.exists(digest)

    # -- import --------------------------------------------------------------------------

    async def import_image(
        self,
        content: store.BlobProvider,
        name: str | references.Reference,
        target: descriptors.Descriptor,
        manifest: descriptors.Manifest,
        config_desc: descriptors.Descriptor,
        diff_ids: Sequence[digests.Digest],
        *,
        manifest_desc: descriptors.Descriptor | None = None,
        pinned: bool = False,
        sync_fs: bool = False,
        concurrency: int = unpacker_mod.DEFAULT_CONCURRENCY,
        turns: Turns | None = None,
        on_layer: unpacker_mod.OnProgress | None = None,
        max_uncompressed_bytes: int | None = None,
        max_image_uncompressed_bytes: int | None = None,
        stream_layers: bool = True,
    ) -> ImportResult:
        """Import one image into containerd; see the module doc for the steps.

        Args:
            content: where the blobs are read from (the image service's store). A layer
                missing there is read from containerd, which may have it.
            name: the reference the image was pulled as (normalised: ``docker.io/…``).
            target: the descriptor the reference resolved to (index or manifest).
            manifest: the platform manifest; ``config_desc`` is its config.
            diff_ids: the config's ``rootfs.diff_ids``.
            manifest_desc: the platform manifest's descriptor; needed when ``target`` is an
                index (otherwise it is ``target``).
            pinned: label the records ``io.cri-containerd.pinned=pinned`` (kubelet's image
                GC keeps them); ``False`` removes the label.
            sync_fs: ``syncfs`` each layer's filesystem before its snapshot is committed.
            concurrency: layers taken up at once (each into its own snapshot, moved onto its
                parent at commit: see :class:`~.snapshotter.ContainerdSnapshotter`).
            turns: the turns at writing layers' files (``None``: the process's).
            on_layer: called with each layer's :class:`UnpackEvent`, from worker threads.
            max_uncompressed_bytes, max_image_uncompressed_bytes: this import's limits
                (``None``: the backend's own; the image service passes its options).
            stream_layers: stream the layers containerd lacks into its content ingest as
                the unpacker reads them (``False``: they are being written there already,
                by the fetcher into :meth:`layer_sink`).

        Raises:
            DigestMismatch, UnsafeLayer, UnsupportedMediaType: a layer cannot be used; no
                snapshot of it or above it is committed, no record is written.
            NotFound: a blob is in neither ``content`` nor containerd.
            Unavailable: containerd is unreachable or busy.
        """
        started = time.monotonic()
        ref = name if isinstance(name, references.Reference) else references.parse(name)
        if target.media_type in mediatypes.INDEXES:
            if manifest_desc is None:
                raise errors.InvalidManifest(
                    f"{ref}: the target is an index; pass the platform manifest's descriptor"
                )
        else:
            manifest_desc = target
        if len(diff_ids) != len(manifest.layers):
            raise errors.InvalidManifest(
                f"{ref}: the manifest lists {len(manifest.layers)} layers but the config"
                f" {config_desc.digest} has {len(diff_ids)} diff IDs"
            )
        lease = await asyncio.to_thread(self.leases.create, expire=self.lease_expire)
        try:
            job = _Import(self, lease, content, ref, on_layer)
            # Where the import copies every layer it lacks, a successful import leaves
            # containerd with all of them: the config, manifest and index, which name them
            # (and the chain the layers make), are then written beside the unpack instead
            # of after it. Under the lease, and nothing names them before the image
            # records, written last: a failed import leaves them to containerd's collector.
            early = (
                asyncio.ensure_future(
                    asyncio.to_thread(
                        job.copy_metadata,
                        target,
                        manifest_desc,
                        manifest,
                        config_desc,
                        digests.chain_ids(diff_ids)[-1],
                        {str(layer.digest) for layer in manifest.layers},
                    )
                )
                if self.copy_layers is not False and diff_ids
                else None
            )
            try:
                chain_id = await job.unpack_and_copy_layers(
                    manifest,
                    diff_ids,
                    stream_layers=stream_layers,
                    sync_fs=sync_fs,
                    concurrency=concurrency,
                    turns=turns,
                    max_uncompressed_bytes=(
                        self.max_uncompressed_bytes
                        if max_uncompressed_bytes is None
                        else max_uncompressed_bytes
                    ),
                    max_image_uncompressed_bytes=(
                        self.max_image_uncompressed_bytes
                        if max_image_uncompressed_bytes is None
                        else max_image_uncompressed_bytes
                    ),
                )
            except BaseException:
                if early is not None:  # not left writing past the lease's deletion
                    with contextlib.suppress(Exception):
                        await asyncio.shield(early)
                raise
            if early is not None:
                await early
            else:
                await asyncio.to_thread(
                    job.copy_metadata,
                    target,
                    manifest_desc,
                    manifest,
                    config_desc,
                    chain_id,
                    job.layers_present,
                )
            names = images_mod.cri_names(ref, target.digest, config_desc.digest)
            labels = images_mod.cri_labels(pinned=pinned)
            for record in names:
                await asyncio.to_thread(job.images.put, record, target, labels)
        finally:
            with contextlib.suppress(errors.ImageError):
                await asyncio.shield(asyncio.to_thread(self.leases.delete, lease))
        return ImportResult(
            chain_id=chain_id,
            names=tuple(names),
            blobs_written=job.blobs_written,
            bytes_written=job.bytes_written,
            layers_unpacked=job.layers_unpacked,
            layers_skipped=job.layers_skipped,
            seconds=time.monotonic() - started,
        )


class LayerIngests(ingests.ContainerdIngests):
    """One pull's :class:`~.ingests.ContainerdIngests` under a lease of its own, which
    :meth:`close` deletes (after the import labelled the layers from the manifest)."""

    def __init__(
        self,
        content: content_mod.ContainerdContent,
        root: Path,
        labels: dict[str, dict[str, str]],
        release: Callable[[], None],
        *,
        publish: bool = False,
    ):
        super().__init__(content, root, labels, publish=publish)
        self._release = release

    def close(self) -> None:
        with contextlib.suppress(errors.ImageError):
            self._release()


class _Import:
    """The state of one import, under one lease."""

    def __init__(
        self,
        backend: ContainerdBackend,
        lease: str,
        provider: store.BlobProvider,
        ref: references.Reference,
        on_layer: unpacker_mod.OnProgress | None,
    ):
        self.backend = backend
        self.content = content_mod.ContainerdContent(backend.client, lease=lease)
        self.snapshotter = backend.snapshotter.with_lease(lease)
        self.images = images_mod.ContainerdImages(backend.client, lease=lease)
        self.provider = _Blobs(provider, self.content)
        self.source = {f"{content_mod.LABEL_DISTRIBUTION_SOURCE}{ref.domain}": ref.path}
        self.on_layer = on_layer
        self.cancel = threading.Event()
        self.lock = threading.Lock()
        self.blobs_written = 0
        self.bytes_written = 0
        self.layers_unpacked = 0
        self.layers_skipped = 0
        #: layer digests containerd has as content after the copy
        self.layers_present: set[str] = set()

    async def unpack_and_copy_layers(
        self,
        manifest: descriptors.Manifest,
        diff_ids: Sequence[digests.Digest],
        *,
        stream_layers: bool = True,
        sync_fs: bool,
        concurrency: int,
        turns: Turns | None,
        max_uncompressed_bytes: int,
        max_image_uncompressed_bytes: int,
    ) -> digests.Digest:
        copy_layers = self.backend.copy_layers is not False
        if copy_layers and stream_layers:
            streamed = await asyncio.to_thread(self._streamable, manifest.layers, diff_ids)
            blobs: store.BlobProvider = _StreamingBlobs(self, streamed)
        else:
            blobs = self.provider
        # Layers applied side by side start in empty snapshots prepared ahead, so no unpack
        # thread waits for a Prepare behind containerd's commit of the layer before.
        ahead = (
            prepared_ahead.PreparedAhead(self.snapshotter, diff_ids)
            if snapshots.CAP_REBASE in self.snapshotter.capabilities
            and concurrency > 1
            and len(diff_ids) > 1
            else None
        )
        unpacker = unpacker_mod.Unpacker(
            blobs,
            cast(snapshots.Snapshotter, ahead) if ahead is not None else self.snapshotter,
            sync_fs=sync_fs,
            max_uncompressed_bytes=max_uncompressed_bytes,
            max_image_uncompressed_bytes=max_image_uncompressed_bytes,
            concurrency=concurrency,
            turns=turns,
            on_progress=self._on_layer,
        )
        try:
            chain_id = await unpacker.unpack(manifest.layers, diff_ids)
        finally:
            if ahead is not None:
                await asyncio.shield(asyncio.to_thread(ahead.close))
        # What the unpack did not stream (layers unpacked already, a stream that failed):
        # copied from the store, or only labelled where containerd has it.
        await asyncio.to_thread(self._copy_layers, manifest.layers, diff_ids, copy_layers)
        return chain_id

    def _streamable(
        self, layers: Sequence[descriptors.Descriptor], diff_ids: Sequence[digests.Digest]
    ) -> dict[str, tuple[descriptors.Descriptor, dict[str, str]]]:
        """The layers containerd lacks as content, with the labels to commit them with."""
        out: dict[str, tuple[descriptors.Descriptor, dict[str, str]]] = {}
        for layer, diff_id in zip(layers, diff_ids, strict=True):
            if str(layer.digest) not in out and not self.content.exists(layer.digest):
                labels = {**self.source, content_mod.LABEL_UNCOMPRESSED: str(diff_id)}
                out[str(layer.digest)] = (layer, labels)
        return out

    def streamed(self, layer: descriptors.Descriptor, written: bool) -> None:
        """``layer``'s blob was streamed into containerd (``written``: by us)."""
        with self.lock:
            self.layers_present.add(str(layer.digest))
            if written:
                self.blobs_written += 1
                self.bytes_written += layer.size

    def copy_metadata(
        self,
        target: descriptors.Descriptor,
        manifest_desc: descriptors.Descriptor,
        manifest: descriptors.Manifest,
        config_desc: descriptors.Descriptor,
        chain_id: digests.Digest,
        layers: Collection[str],
    ) -> None:
        """Config, manifest and index, children first, each with its GC labels (the
        manifest's for the ``layers`` given by digest)."""
        snapshot_label = f"{content_mod.LABEL_REF_SNAPSHOT}{self.backend.snapshotter_name}"
        self._copy("config", config_desc, {**self.source, snapshot_label: str(chain_id)})
        labels = {**self.source, content_mod.LABEL_REF_CONFIG: str(config_desc.digest)}
        for i, layer in enumerate(manifest.layers):
            if str(layer.digest) in layers:
                labels[f"{content_mod.LABEL_REF_LAYER}{i}"] = str(layer.digest)
        self._copy("manifest", manifest_desc, labels)
        if target.digest != manifest_desc.digest:
            with self.provider.open_blob(target.digest) as f:
                index = descriptors.Index.parse(f.read(), target.media_type)
            labels = dict(self.source)
            for i, child in enumerate(index.manifests):
                if child.digest == manifest_desc.digest:
                    labels[f"{content_mod.LABEL_REF_MANIFEST}{i}"] = str(child.digest)
            self._copy("index", target, labels)

    # -- internals ----------------------------------------------------------------------

    def _on_layer(self, event: unpacker_mod.UnpackEvent) -> None:
        if event.kind == "done":
            with self.lock:
                self.layers_unpacked += 1
        elif event.kind == "skipped":
            with self.lock:
                self.layers_skipped += 1
        if self.on_layer is not None:
            self.on_layer(event)

    def _copy_layers(
        self,
        layers: Sequence[descriptors.Descriptor],
        diff_ids: Sequence[digests.Digest],
        copy: bool,
    ) -> None:
        def one(layer: descriptors.Descriptor, diff_id: digests.Digest) -> None:
            labels = {**self.source, content_mod.LABEL_UNCOMPRESSED: str(diff_id)}
            if self._copy("layer", layer, labels, optional=True, write=copy):
                with self.lock:
                    self.layers_present.add(str(layer.digest))

        # A streamed layer was committed into containerd with its labels already.
        unique = {
            str(layer.digest): (layer, d)
            for layer, d in zip(layers, diff_ids, strict=True)
            if str(layer.digest) not in self.layers_present
        }
        if not unique:
            return
        with ThreadPoolExecutor(COPY_CONCURRENCY, thread_name_prefix="ctrd-copy") as pool:
            futures = [pool.submit(one, layer, d) for layer, d in unique.values()]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                self.cancel.set()
                raise

    def _copy(
        self,
        kind: str,
        desc: descriptors.Descriptor,
        labels: dict[str, str],
        *,
        optional: bool = False,
        write: bool = True,
    ) -> bool:
        """Make containerd have ``desc`` with ``labels``. Returns whether it has it.

        ``optional``: a blob the provider lacks is fine (its snapshot may already exist).
        ``write=False``: only label it if present.
        """
        try:
            info = self.content.info(desc.digest)
        except errors.NotFound:
            pass
        else:
            changed = {k: v for k, v in labels.items() if info.labels.get(k) != v}
            self.content.ensure_labels(desc.digest, changed)
            return True
        if not write:
            return False
        try:
            blob = self.provider.open_blob(desc.digest)
        except errors.NotFound:
            if optional:
                return False
            raise
        ref = content_mod.ingest_ref(kind, desc.digest)
        with blob:
            try:
                return self._write(ref, desc, blob, labels)
            except errors.DigestMismatch:
                # Read while it downloaded: the bytes may be a corrupt copy the fetcher has
                # discarded and fetched again. Once the good one is committed, copy that.
                outcome = getattr(blob, "outcome", None)
                if outcome is None or not outcome():
                    raise
        self.content.abort(ref)  # containerd kept the bad bytes for a resume
        with self.provider.open_blob(desc.digest) as blob:
            return self._write(ref, desc, blob, labels)

    def _write(
        self, ref: str, desc: descriptors.Descriptor, blob: BinaryIO, labels: dict[str, str]
    ) -> bool:
        for attempt in range(_LOCKED_TRIES):
            try:
                if self.content.write(
                    ref, blob, desc.size, desc.digest, labels, cancel=self.cancel
                ):
                    with self.lock:
                        self.blobs_written += 1
                        self.bytes_written += desc.size
                return True
            except errors.Unavailable:
                # Another writer holds the ref (a concurrent import of a shared layer).
                if self.cancel.is_set() or attempt == _LOCKED_TRIES - 1:
                    raise
                time.sleep(min(0.05 * 2**attempt, 1.0))
        return True  # pragma: no cover - the loop returns or raises


class _Blobs:
    """The import's blobs: the image service's (arriving or in its store) first,
    containerd's second."""

    def __init__(self, first: store.BlobProvider, second: content_mod.ContainerdContent):
        self.first = first
        self.second = second

    def open_blob(self, digest: digests.Digest) -> BinaryIO:
        return self.open_either(digest)[0]

    def open_either(self, digest: digests.Digest) -> tuple[BinaryIO, bool]:
        """The blob, and whether it came from the first provider."""
        try:
            return self.first.open_blob(digest), True
        except (errors.NotFound, errors.Unavailable) as e:
            try:
                return self.second.open_blob(digest), False
            except errors.NotFound:
                raise e from None


class _StreamingBlobs:
    """The unpacker's blobs: a layer containerd lacks is streamed into its content ingest
    as the unpacker reads it (see :class:`_Teed`)."""

    def __init__(
        self,
        job: _Import,
        streamed: dict[str, tuple[descriptors.Descriptor, dict[str, str]]],
    ):
        self.job = job
        self.streamed = streamed

    def open_blob(self, digest: digests.Digest) -> BinaryIO:
        blob, ours = self.job.provider.open_either(digest)
        wanted = self.streamed.get(str(digest))
        if not ours or wanted is None:
            return blob
        layer, labels = wanted
        ingest = content_mod.Ingest(
            self.job.content, content_mod.ingest_ref("layer", digest), layer.size, digest
        )
        return cast(BinaryIO, _Teed(blob, ingest, layer, labels, self.job))


class _Teed:
    """A layer blob being read, its bytes also streamed into containerd's ingest.

    Leaving the ``with`` block normally (the unpacker read the layer and, for a blob still
    downloading, confirmed it) reads whatever the unpacker left and commits the ingest, which
    containerd verifies against the digest; leaving it with an error cancels the ingest. A
    failed commit is not the layer's failure: the blob is copied after the unpack instead.
    Other attributes (``confirm``, ``outcome``) are the blob's.
    """

    def __init__(
        self,
        blob: BinaryIO,
        ingest: content_mod.Ingest,
        layer: descriptors.Descriptor,
        labels: dict[str, str],
        job: _Import,
    ):
        self._blob = blob
        self._ingest = ingest
        self._layer = layer
        self._labels = labels
        self._job = job

    def __getattr__(self, name: str) -> Any:
        return getattr(self._blob, name)

    def read(self, size: int = -1, /) -> bytes:
        data = self._blob.read(size)
        self._ingest.write(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        self._blob.close()

    def __enter__(self) -> _Teed:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        try:
            if exc_type is not None:
                self._ingest.cancel()
                return
            try:
                while self.read(content_mod.CHUNK):
                    pass
                written = self._ingest.commit(self._labels)
            except errors.ImageError as e:
                tracing.set_attributes({"layer.stream_failed": str(e)})
                return
            self._job.streamed(self._layer, written)
        finally:
            self._blob.close()
