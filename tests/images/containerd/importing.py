"""Test helpers: prefetch an image into containerd as the agent will — fetch it with the
image service (content only), then hand it to :class:`ContainerdBackend.import_image`."""

from __future__ import annotations

from pathlib import Path

from fixtures import images
from fixtures import layers as L

from agent.images import containerd, descriptors, digests, references
from agent.images.content import local
from tests.images.pulling import pull

Parts = tuple[
    descriptors.Descriptor, descriptors.Descriptor, descriptors.Manifest, list[digests.Digest]
]


def manifest_parts(
    store: local.LocalStore, top: digests.Digest, manifest_digest: digests.Digest
) -> Parts:
    """(target, manifest descriptor, manifest, diff IDs) of a fetched image."""
    top_data = store.read_blob(top)
    target = descriptors.Descriptor(descriptors.media_type_of(top_data), top, len(top_data))
    data = store.read_blob(manifest_digest)
    manifest_desc = descriptors.Descriptor(
        descriptors.media_type_of(data), manifest_digest, len(data)
    )
    manifest = descriptors.Manifest.parse(data, manifest_desc.media_type)
    config = descriptors.ImageConfig.parse(store.read_blob(manifest.config.digest))
    return target, manifest_desc, manifest, list(config.diff_ids)


async def prefetch(
    backend: containerd.ContainerdBackend,
    root: Path,
    reference: str,
    **kwargs: object,
) -> containerd.ImportResult:
    """Fetch ``reference`` into ``root`` and import it; ``kwargs`` go to ``import_image``."""
    pulled = await pull(root, reference, snapshotter="")
    store = local.LocalStore(root / "content")
    target, manifest_desc, manifest, diff_ids = manifest_parts(
        store, pulled.digest, pulled.manifest_digest
    )
    return await backend.import_image(
        store,
        reference,
        target,
        manifest,
        manifest.config,
        diff_ids,
        manifest_desc=manifest_desc,
        **kwargs,  # type: ignore[arg-type]
    )


async def import_tars(
    backend: containerd.ContainerdBackend, name: str, tars: list[bytes], **kwargs: object
) -> containerd.ImportResult:
    """Import an image of uncompressed layer ``tars`` from memory (no registry)."""
    img = L.image(tars)
    manifest_digest = digests.Digest(L.sha256(img.manifest))
    manifest = descriptors.Manifest.parse(img.manifest, L_OCI_MANIFEST)
    target = descriptors.Descriptor(L_OCI_MANIFEST, manifest_digest, len(img.manifest))
    return await backend.import_image(
        L.MemoryProvider(img.blobs),  # type: ignore[arg-type]
        references.parse(name),
        target,
        manifest,
        manifest.config,
        L.diff_ids_of(img),
        **kwargs,  # type: ignore[arg-type]
    )


L_OCI_MANIFEST = images.OCI_MANIFEST


def image_of(tars: list[bytes], **kwargs: object) -> images.Image:
    """A registry-pushable image of uncompressed layer ``tars`` (gzip)."""
    return images.Image(
        [images.Layer(images.compress(t, "gzip"), images.sha256(t), "gzip") for t in tars],
        **kwargs,  # type: ignore[arg-type]
    )
