"""The ``Backend`` protocol: where an image's unpacked layers and its record go.

The image service resolves a reference, fetches what it needs into its content store and
records the image; the backend decides which layers need fetching at all, and what
"unpacked" means:

* :class:`~agent.images.backends.local.LocalBackend` — the prefetcher's own store: the
  layers are unpacked into a local snapshotter (overlayfs or naive) that containerd never
  reads; without a snapshotter, content only (``--no-unpack``).
* :class:`~agent.images.containerd.backend.ContainerdBackend` — the node's containerd:
  layers are unpacked into containerd's snapshotter and the image is registered as the CRI
  plugin would have registered its own pull, so kubelet starts pods without pulling.
* :class:`~agent.images.cri.backend.CriBackend` — any CRI runtime (CRI-O, …): the runtime
  pulls the layers itself through ``ImageService.PullImage``; no byte progress.

The backend is built at the edge (the CLI, the node agent) and handed to
:class:`~agent.images.service.ImageService`, which owns it from then on (it calls
:meth:`Backend.cleanup` once at start, under the store's exclusive lock, and
:meth:`Backend.close` when it closes). The service never asks which backend it has.

Lifecycle of one pull, as the service drives it::

    needed = backend.layers_to_fetch(manifest, config.diff_ids)   # after the config
    sink = backend.layer_sink(ref, manifest, config.diff_ids)     # None: the content store
    # fetch `needed` into the sink (or the content store), and meanwhile:
    unpacked = await backend.unpack(Unpacking(..., sink=sink))    # blobs as they arrive
    sink.close()                                                  # after the unpack
    # the image record (name → digest, unpacked.chain_id, unpacked.image_id) goes into
    # the service's records
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from agent.images import descriptors, digests, records, references
from agent.images.content import sinks, store
from agent.images.turns import Turns

if TYPE_CHECKING:
    from agent.images.content import local
    from agent.images.progress import tracker
    from agent.images.registry import client as registry_client
    from agent.images.snapshots import snapshotter as snapshotter_api
    from agent.images.unpack import unpacker


@dataclass(frozen=True)
class RuntimeInfo:
    """What a backend puts images into, for logs and the node's status.

    Attributes:
        mode: ``"local"``, ``"containerd"`` or ``"cri"``.
        runtime: the runtime's name (``"containerd"``, ``"cri-o"``; ``""`` for local).
        version: the runtime's version, as it reports it.
        address: the socket the backend talks to (``""`` for local).
        snapshotter: the snapshotter layers are unpacked into (``""``: not unpacked).
        namespace: containerd's namespace (``""`` elsewhere).
        byte_progress: whether pulls report bytes as they arrive (not through the CRI).
        pins: whether kubelet's image GC sees the images the agent pins as pinned
            (containerd ≥ 1.7 reports ``io.cri-containerd.pinned`` through the CRI; 1.6
            ignores the label, the CRI has no call to pin, the local store is not kubelet's).
    """

    mode: str
    runtime: str = ""
    version: str = ""
    address: str = ""
    snapshotter: str = ""
    namespace: str = ""
    byte_progress: bool = True
    pins: bool = False

    def to_json(self) -> dict[str, str | bool]:
        return {
            "mode": self.mode,
            "runtime": self.runtime,
            "version": self.version,
            "address": self.address,
            "snapshotter": self.snapshotter,
            "namespace": self.namespace,
            "byteProgress": self.byte_progress,
            "pinning": self.pins,
        }

    def describe(self) -> str:
        """One line for the start-up log."""
        if self.mode == "local":
            where = f"snapshotter {self.snapshotter}" if self.snapshotter else "content only"
            return f"local store ({where})"
        parts = [f"{self.runtime or self.mode} {self.version}".strip(), f"at {self.address}"]
        if self.namespace:
            parts.append(f"namespace {self.namespace}")
        if self.snapshotter:
            parts.append(f"snapshotter {self.snapshotter}")
        if not self.byte_progress:
            parts.append("no byte progress")
        parts.append("images pinned against kubelet's image GC" if self.pins else
                     "no pinning against kubelet's image GC")
        return f"{self.mode}: " + ", ".join(parts)


@dataclass(frozen=True)
class Unpacked:
    """What :meth:`Backend.unpack` made of an image.

    Attributes:
        chain_id: the top snapshot the prefetcher committed the layers as (the image's chain
            ID); ``""`` when it unpacked nothing itself (content only, or a runtime that
            pulled the layers through the CRI).
        image_id: the node runtime's ID of the image (the CRI's ``Image.id``, what
            ``crictl images`` shows); ``""`` outside a runtime (the prefetcher's store).
    """

    chain_id: str = ""
    image_id: str = ""


@dataclass
class Unpacking:
    """One image for :meth:`Backend.unpack`: what the service resolved and is fetching.

    ``blobs`` opens a layer as it arrives (waiting for its download to start; a reader of a
    blob still downloading must be confirmed before what was read from it is committed, as
    the :class:`~agent.images.unpack.unpacker.Unpacker` does); ``content`` is the service's
    store (only committed blobs); ``layer_unpacked(digest)`` may be called from any thread.
    """

    ref: references.Reference
    target: descriptors.Descriptor
    manifest_desc: descriptors.Descriptor
    manifest: descriptors.Manifest
    config: descriptors.ImageConfig
    blobs: store.BlobProvider
    content: local.LocalStore
    layer_unpacked: Callable[[digests.Digest], None]
    #: ``(layer digest, uncompressed bytes written so far)``, from any thread (the agent's
    #: disk budget counts what unpacking writes)
    layer_written: Callable[[digests.Digest, int], None]
    progress: tracker.PullProgress
    registry: registry_client.RegistryClient
    progress_timeout: float = 0.0
    pinned: bool = False
    sync_fs: bool = False
    max_uncompressed_bytes: int = 32 * 1024**3
    max_image_uncompressed_bytes: int = 0
    concurrency: int = 3
    #: the service's turns at writing layers (None: the process's, one at a time)
    turns: Turns | None = None
    labels: dict[str, str] = field(default_factory=dict)
    #: delete these local layer blobs, except those another pull in flight or an image
    #: that is not unpacked still needs (blocking; a backend that keeps the layers itself)
    discard_layers: Callable[[Sequence[descriptors.Descriptor]], None] = lambda layers: None
    #: where the layers were fetched to when the backend supplied it (:meth:`Backend.layer_sink`)
    sink: LayerSink | None = None

    def on_unpack_event(self, event: unpacker.UnpackEvent) -> None:
        """An unpacker's ``on_progress`` (called from worker threads): bytes written go to
        :attr:`layer_written`, finished layers to :attr:`layer_unpacked`."""
        if event.kind == "progress":
            self.layer_written(event.layer.digest, event.uncompressed_bytes)
        elif event.kind in ("done", "skipped"):
            self.layer_unpacked(event.layer.digest)


class LayerSink(sinks.BlobSink, Protocol):
    """A backend's own place for one pull's layer blobs (see :meth:`Backend.layer_sink`)."""

    def close(self) -> None:
        """The pull is over (after the unpack): release what kept its blobs (a lease)."""
        ...


class Backend(Protocol):
    """Where unpacked layers and the image go. See the module doc."""

    @property
    def info(self) -> RuntimeInfo:
        """What this backend puts images into."""
        ...

    @property
    def unpacks(self) -> bool:
        """Whether a pull unpacks (``False``: content only, nothing to wait for)."""
        ...

    @property
    def store_snapshotter(self) -> snapshotter_api.Snapshotter | None:
        """Snapshots the service's garbage collector manages (``None``: none of ours)."""
        ...

    def cleanup(self) -> object:
        """Remove what killed agent processes left (active snapshots, leases)."""
        ...

    def close(self) -> None: ...

    def layers_to_fetch(
        self, manifest: descriptors.Manifest, diff_ids: Sequence[digests.Digest]
    ) -> list[descriptors.Descriptor]:
        """The layers the service must download for :meth:`unpack` (blocking)."""
        ...

    def layer_sink(
        self,
        ref: references.Reference,
        manifest: descriptors.Manifest,
        diff_ids: Sequence[digests.Digest],
    ) -> LayerSink | None:
        """Where this pull's layer blobs are written, if the backend keeps them itself
        (blocking); ``None``: the service's content store."""
        ...

    async def unpack(self, job: Unpacking) -> Unpacked:
        """Unpack ``job``'s image; says what it made. Runs while the fetches run."""
        ...

    def is_unpacked(self, record: records.ImageRecord, blobs: store.BlobProvider) -> bool:
        """Whether ``record``'s image is unpacked here (blocking)."""
        ...

    def release(self, record: records.ImageRecord) -> None:
        """The prefetcher no longer wants ``record``'s image (its record goes next): leave
        it to the runtime's own garbage collection (containerd: drop the pin). Idempotent;
        raises an :class:`~agent.images.errors.ImageError` saying what to do when the
        runtime refuses (the service then keeps the record, and a later call retries)."""
        ...

    def mount(self, record: records.ImageRecord, target: str | os.PathLike[str]) -> None:
        """Mount the image read-only at ``target``, or explain why this backend cannot."""
        ...

    def unmount(self, target: str | os.PathLike[str]) -> None: ...
