"""``LocalBackend``: the prefetcher's own store — layers unpacked into a local snapshotter.

The snapshots live under the store root (``snapshots/`` for overlayfs, ``snapshots-naive/``
for naive), managed by the service's garbage collector and mountable with
``prefetcher mount``. containerd and kubelet never read them: this is the cache-only mode.
Without a snapshotter the backend keeps content only (``--no-unpack``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from agent.images import descriptors, digests, errors, records, references, tracing
from agent.images.backends import backend
from agent.images.content import store
from agent.images.snapshots import chains
from agent.images.snapshots import snapshotter as snapshots
from agent.images.unpack import unpacker as unpacker_mod

#: The local snapshotters, by the name ``images.snapshotter`` uses.
SNAPSHOTTERS = ("overlayfs", "naive")


def open_store(root: str | os.PathLike[str], snapshotter: str) -> LocalBackend:
    """The local backend for ``root`` with the snapshotter named ``snapshotter`` (``""``:
    content only)."""
    base = Path(root)
    if not snapshotter:
        return LocalBackend(None)
    if snapshotter == "overlayfs":
        from agent.images.snapshots import overlay

        # syncfs is the unpacker's job (after each layer's files, before its commit).
        return LocalBackend(overlay.OverlaySnapshotter(base / "snapshots"), snapshotter)
    if snapshotter == "naive":
        from agent.images.snapshots import naive

        return LocalBackend(naive.NaiveSnapshotter(base / "snapshots-naive"), snapshotter)
    raise errors.InvalidConfiguration(
        f"unknown local snapshotter {snapshotter!r}: expected one of {', '.join(SNAPSHOTTERS)}"
    )


class LocalBackend:
    """Unpacks into ``snapshotter`` (named ``name``); ``None``: content only."""

    def __init__(self, snapshotter: snapshots.Snapshotter | None, name: str = ""):
        self._snapshotter = snapshotter
        self._info = backend.RuntimeInfo(mode="local", snapshotter=name if snapshotter else "")

    @property
    def info(self) -> backend.RuntimeInfo:
        return self._info

    @property
    def unpacks(self) -> bool:
        return self._snapshotter is not None

    @property
    def store_snapshotter(self) -> snapshots.Snapshotter | None:
        return self._snapshotter

    def cleanup(self) -> None:
        if self._snapshotter is not None:
            self._snapshotter.cleanup()

    def close(self) -> None:
        if self._snapshotter is not None:
            self._snapshotter.close()

    def layers_to_fetch(
        self, manifest: descriptors.Manifest, diff_ids: Sequence[digests.Digest]
    ) -> list[descriptors.Descriptor]:
        if self._snapshotter is None:
            return list(manifest.layers)
        return list(manifest.layers[chains.committed_depth(self._snapshotter, diff_ids):])

    def layer_sink(
        self,
        ref: references.Reference,
        manifest: descriptors.Manifest,
        diff_ids: Sequence[digests.Digest],
    ) -> None:
        """Layers go into the service's content store."""
        return None

    async def unpack(self, job: backend.Unpacking) -> backend.Unpacked:
        if self._snapshotter is None:
            return backend.Unpacked()

        on_progress = job.on_unpack_event

        unpacker = unpacker_mod.Unpacker(
            job.blobs,
            self._snapshotter,
            sync_fs=job.sync_fs,
            max_uncompressed_bytes=job.max_uncompressed_bytes,
            max_image_uncompressed_bytes=job.max_image_uncompressed_bytes,
            concurrency=job.concurrency,
            turns=job.turns,
            on_progress=on_progress,
        )
        attrs = {"image.layers": len(job.manifest.layers)}
        with tracing.span(tracing.SERVICE_SPANS, "unpack", attrs):
            top = await unpacker.unpack(job.manifest.layers, job.config.diff_ids)
        return backend.Unpacked(chain_id=str(top))

    def is_unpacked(self, record: records.ImageRecord, blobs: store.BlobProvider) -> bool:
        return self._snapshotter is not None and chains.is_committed(
            self._snapshotter, record.chain_id
        )

    def release(self, record: records.ImageRecord) -> None:
        """Nothing to do: the service's garbage collection removes what no record needs."""

    def mount(self, record: records.ImageRecord, target: str | os.PathLike[str]) -> None:
        if self._snapshotter is None or not chains.is_committed(
            self._snapshotter, record.chain_id
        ):
            raise errors.NotFound(
                f"{record.name} is not unpacked on this node; pull it without --no-unpack"
            )
        key = _mount_key(target)
        mounts = self._snapshotter.view(key, record.chain_id, {"prefetcher.dev/mount": key})
        try:
            snapshots.mount_all([m.with_options(*_INSPECT_OPTIONS) for m in mounts], target)
        except BaseException:
            self._snapshotter.remove(key)
            raise

    def unmount(self, target: str | os.PathLike[str]) -> None:
        if self._snapshotter is None:
            raise errors.NotFound("this store has no snapshotter")
        key = _mount_key(target)
        try:
            self._snapshotter.stat(key)
        except errors.NotFound as e:
            raise errors.NotFound(f"{target} is not a prefetcher mount") from e
        snapshots.unmount(target)
        self._snapshotter.remove(key)


#: Mount options of ``prefetcher mount``: an image is inspected, never run, from there, so
#: its setuid binaries and device nodes give nobody the host's privileges or devices.
_INSPECT_OPTIONS: Final = ("ro", "nosuid", "nodev")


def _mount_key(target: str | os.PathLike[str]) -> str:
    return f"mount:{os.path.realpath(target)}"



