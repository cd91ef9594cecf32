"""Hostile layers imported into containerd are refused as in the built-in store: nothing is
written outside the snapshot, no snapshot of them is committed, no image record appears."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures import layers as L

from agent.images import containerd, descriptors, digests, errors, mediatypes, references, snapshots
from tests.images.unpack.test_hostile_layers_are_refused import (
    HOSTILE,
    NEUTRALISED_OK,
    hostile_layers,
    snapshot_of,
)

from .conftest import Containerd
from .importing import import_tars

pytestmark = pytest.mark.root


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    c = tmp_path / "canary"
    c.mkdir()
    (c / "secret").write_bytes(b"do not touch")
    return c


@pytest.mark.parametrize("case", HOSTILE)
async def test_a_hostile_layer_is_refused_and_nothing_escapes(
    case: str, ctrd: Containerd, backend: containerd.ContainerdBackend, canary: Path
) -> None:
    tars = hostile_layers(canary)[case]
    before = snapshot_of(canary)
    name = f"hostile.test/{case}:1"
    top = digests.chain_ids([digests.of(t) for t in tars])[-1]

    try:
        await import_tars(backend, name, tars)
    except errors.UnsafeLayer:
        with pytest.raises(errors.NotFound):
            backend.snapshotter.stat(top)
        with pytest.raises(errors.NotFound):
            backend.images.get(name)
    else:
        assert case in NEUTRALISED_OK, "the layer was applied"
    assert snapshot_of(canary) == before
    left = [
        i.name
        for i in backend.snapshotter.walk()
        if i.kind is not snapshots.Kind.COMMITTED and snapshots.LABEL_OWNER in i.labels
    ]
    assert left == []
    assert backend.leases.list() == []


async def test_a_layer_whose_diff_id_lies_is_not_committed(
    backend: containerd.ContainerdBackend,
) -> None:
    img = L.image([L.Layer().file("f", b"real").tar()])
    manifest = descriptors.Manifest.parse(img.manifest, mediatypes.OCI_MANIFEST)
    lie = digests.of(b"another tar")
    target = descriptors.Descriptor(
        manifest.media_type, digests.of(img.manifest), len(img.manifest)
    )
    with pytest.raises(errors.DigestMismatch):
        await backend.import_image(
            L.MemoryProvider(img.blobs),  # type: ignore[arg-type]
            references.parse("liar.test/app:1"),
            target,
            manifest,
            manifest.config,
            [lie],
        )
    with pytest.raises(errors.NotFound):
        backend.snapshotter.stat(lie)
    with pytest.raises(errors.NotFound):
        backend.images.get("liar.test/app:1")
    # The config and manifest, written beside the unpack, were written under the import's
    # lease and before it ended: the next collection leaves nothing of the import.
    backend.leases.delete(backend.leases.create(), sync=True)
    for blob in (manifest.config.digest, target.digest, manifest.layers[0].digest):
        with pytest.raises(errors.NotFound):
            backend.content.info(blob)
