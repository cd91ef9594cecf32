"""A multi-layer image prefetched through the containerd backend is, to containerd, an image
it pulled itself: listed, unpacked under the right chain IDs, not pulled or unpacked again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fixtures import images
from fixtures import layers as L
from fixtures.faultproxy import FaultProxy
from fixtures.registries import Registry

from agent.images import containerd, digests
from agent.images.containerd import content as content_mod
from agent.images.containerd import images as images_mod

from .conftest import Containerd
from .importing import image_of, prefetch

pytestmark = pytest.mark.root


def three_layers() -> images.Image:
    return image_of(
        [
            L.Layer().dir("etc").file("etc/os-release", b"ID=base\n").dir("bin").tar(),
            L.Layer().file("etc/os-release", b"ID=app\n").file("app/run", b"#!/bin/sh\n").tar(),
            L.Layer().whiteout("app/run").file("app/config.json", b"{}").tar(),
        ]
    )


def chain_of(image: images.Image) -> list[str]:
    return [str(c) for c in digests.chain_ids([layer.diff_id for layer in image.layers])]


async def test_a_prefetched_image_is_listed_with_the_names_and_labels_the_cri_gives_it(
    ctrd: Containerd, backend: containerd.ContainerdBackend, registry: Registry, tmp_root: Path
) -> None:
    image = three_layers()
    images.push(registry, "ctrd/listed", "1.0", image)
    reference = f"{registry.host}/ctrd/listed:1.0"

    result = await prefetch(backend, tmp_root, reference)

    expected = [reference, f"{registry.host}/ctrd/listed@{image.digest}", image.config.digest]
    assert list(result.names) == expected
    listed = ctrd.ctr("images", "ls").stdout
    for name in expected:
        assert name in listed
    record = backend.images.get(reference)
    assert record.target.digest == image.digest
    assert record.labels[images_mod.LABEL_CRI_IMAGE] == "managed"
    assert images_mod.LABEL_PINNED not in record.labels
    assert result.chain_id == chain_of(image)[-1]
    assert (result.layers_unpacked, result.layers_skipped) == (3, 0)
    assert ctrd.ctr("images", "check").stdout.count("complete") >= 1


async def test_its_snapshots_are_committed_under_the_chain_ids_with_containerds_labels(
    ctrd: Containerd, backend: containerd.ContainerdBackend, registry: Registry, tmp_root: Path
) -> None:
    image = three_layers()
    images.push(registry, "ctrd/chain", "1.0", image)

    await prefetch(backend, tmp_root, f"{registry.host}/ctrd/chain:1.0")

    listed = ctrd.snapshots()
    chain = chain_of(image)
    assert all(listed.get(c) == "Committed" for c in chain)
    for parent, child in zip(["", *chain], chain, strict=False):
        info = backend.snapshotter.stat(child)
        assert info.parent == parent
        assert info.labels["containerd.io/snapshot.ref"] == child
    assert not [k for k, kind in listed.items() if kind != "Committed"]
    assert not backend.leases.list(), "the import's lease outlived it"


async def test_its_blobs_carry_the_labels_containerds_gc_follows(
    backend: containerd.ContainerdBackend, registry: Registry, tmp_root: Path
) -> None:
    image = three_layers()
    images.push(registry, "ctrd/labels", "1.0", image)

    await prefetch(backend, tmp_root, f"{registry.host}/ctrd/labels:1.0")

    manifest = backend.content.info(digests.Digest(image.digest)).labels
    assert manifest[content_mod.LABEL_REF_CONFIG] == image.config.digest
    for i, layer in enumerate(image.layers):
        assert manifest[f"{content_mod.LABEL_REF_LAYER}{i}"] == layer.digest
        info = backend.content.info(digests.Digest(layer.digest))
        assert info.labels[content_mod.LABEL_UNCOMPRESSED] == layer.diff_id
    config = backend.content.info(digests.Digest(image.config.digest)).labels
    assert config["containerd.io/gc.ref.snapshot.overlayfs"] == chain_of(image)[-1]
    source = f"{content_mod.LABEL_DISTRIBUTION_SOURCE}{registry.host}"
    assert config[source] == "ctrd/labels"


async def test_ctr_pull_of_the_same_reference_downloads_no_layer_and_unpacks_nothing(
    ctrd: Containerd,
    backend: containerd.ContainerdBackend,
    fault_proxy: FaultProxy,
    tmp_root: Path,
) -> None:
    image = three_layers()
    images.push(fault_proxy.url, "ctrd/nopull", "1.0", image)
    reference = f"{fault_proxy.host}/ctrd/nopull:1.0"
    await prefetch(backend, tmp_root, reference)
    chain = chain_of(image)
    before = {c: backend.snapshotter.stat(c) for c in chain}
    snapshots_before = ctrd.snapshots()
    fault_proxy.clear_requests()

    ctrd.ctr("images", "pull", "--plain-http", reference)

    blob_gets = fault_proxy.requests_to(r"/blobs/", "GET")
    assert blob_gets == [], [r.path for r in blob_gets]
    assert fault_proxy.requests_to(r"/manifests/"), "ctr did not ask the registry at all"
    assert ctrd.snapshots() == snapshots_before
    assert {c: backend.snapshotter.stat(c) for c in chain} == before

    # The control: an image that was not prefetched is downloaded and unpacked by ctr.
    other = image_of([L.Layer().file("other", b"not prefetched").tar()])
    images.push(fault_proxy.url, "ctrd/control", "1.0", other)
    ctrd.ctr("images", "pull", "--plain-http", f"{fault_proxy.host}/ctrd/control:1.0")
    assert len(fault_proxy.requests_to(r"/blobs/", "GET")) == 2  # config and layer
    assert ctrd.snapshots().get(other.layers[0].diff_id) == "Committed"


async def test_the_cri_reports_the_image_present_as_kubelet_asks(
    ctrd: Containerd, backend: containerd.ContainerdBackend, registry: Registry, tmp_root: Path
) -> None:
    image = three_layers()
    images.push(registry, "ctrd/cri", "2.0", image)
    reference = f"{registry.host}/ctrd/cri:2.0"
    assert backend.image_status(reference) is None

    await prefetch(backend, tmp_root, reference, pinned=True)

    status = backend.image_status(reference)
    assert status is not None
    assert status.id == image.config.digest
    assert reference in status.repo_tags
    assert f"{registry.host}/ctrd/cri@{image.digest}" in status.repo_digests
    by_digest = backend.image_status(f"{registry.host}/ctrd/cri@{image.digest}")
    assert by_digest is not None and by_digest.id == image.config.digest
    record = backend.images.get(reference)
    assert record.labels[images_mod.LABEL_PINNED] == "pinned"


async def test_a_second_import_writes_and_unpacks_nothing(
    backend: containerd.ContainerdBackend, registry: Registry, tmp_root: Path
) -> None:
    image = three_layers()
    images.push(registry, "ctrd/again", "1.0", image)
    reference = f"{registry.host}/ctrd/again:1.0"
    await prefetch(backend, tmp_root, reference, pinned=True)

    again = await prefetch(backend, tmp_root, reference, pinned=False)

    assert (again.blobs_written, again.layers_unpacked, again.layers_skipped) == (0, 0, 3)
    assert images_mod.LABEL_PINNED not in backend.images.get(reference).labels


async def test_an_image_sharing_base_layers_unpacks_only_its_own(
    backend: containerd.ContainerdBackend, registry: Registry, tmp_root: Path
) -> None:
    base = three_layers()
    images.push(registry, "ctrd/base", "1.0", base)
    await prefetch(backend, tmp_root, f"{registry.host}/ctrd/base:1.0")
    top = image_of([L.Layer().file("extra", b"x").tar()])
    derived = images.Image([*base.layers, *top.layers])
    images.push(registry, "ctrd/derived", "1.0", derived)

    result = await prefetch(backend, tmp_root, f"{registry.host}/ctrd/derived:1.0")

    assert (result.layers_unpacked, result.layers_skipped) == (1, 3)
    assert result.blobs_written == 3  # the new layer, config and manifest
    assert json.loads(backend.content.open_blob(derived.config.digest).read())  # readable
