"""Manifests and configs are size-capped before they are read, and a layer is never read
into memory whole: a tenant naming ``x@sha256:<a big layer on the node>`` as an image, or a
registry announcing a huge config, costs the agent an error, not the blob's size in RAM.

Memory is measured with ``tracemalloc`` (Python allocations, which is where a ``read()``
of the blob would land).
"""

from __future__ import annotations

import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy
from fixtures.registries import Registry

from agent.images import descriptors, digests, errors, mediatypes
from agent.images.content import local
from tests.images.pulling import pull

AMD64 = descriptors.Platform("linux", "amd64")
BIG = 48 * 1024 * 1024
#: What the refusal may allocate at most: a fraction of the blob.
SMALL = 2 * 1024 * 1024


def _store_big_blob(root: Path) -> digests.Digest:
    """Commit a BIG-byte blob into the content store under ``root`` (as a layer lands)."""
    store = local.LocalStore(root)
    chunk = bytes(range(256)) * 4096  # 1 MiB
    hasher = digests.Hasher()
    for _ in range(BIG // len(chunk)):
        hasher.update(chunk)
    digest = hasher.digest()
    with store.writer(str(digest), total=BIG) as writer:
        for _ in range(BIG // len(chunk)):
            writer.write(chunk)
        writer.commit(BIG, digest)
    return digest


@pytest.fixture
def traced() -> Iterator[Callable[[], int]]:
    """``peak()``: the most Python memory allocated at once since the test started."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        yield lambda: tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_reading_a_layer_sized_blob_as_a_manifest_is_refused_before_it_is_read(
    tmp_path: Path, traced: Callable[[], int]
) -> None:
    digest = _store_big_blob(tmp_path)
    store = local.LocalStore(tmp_path)
    tracemalloc.reset_peak()

    with pytest.raises(errors.InvalidManifest, match=f"{digest} is {BIG} bytes.*not read"):
        store.read_blob(digest)

    assert traced() < SMALL


async def test_an_image_named_by_the_digest_of_a_layer_on_the_node_is_refused_cheaply(
    registry: Registry, tmp_root: Path, traced: Callable[[], int]
) -> None:
    digest = _store_big_blob(tmp_root / "content")
    tracemalloc.reset_peak()

    with pytest.raises(errors.InvalidManifest, match=f"{digest} is {BIG} bytes"):
        await pull(tmp_root, f"{registry.host}/tenant/app@{digest}", platform=AMD64)

    assert traced() < SMALL


async def test_a_config_larger_than_the_limit_is_refused_before_it_is_downloaded(
    registry: Registry,
    fault_proxy_factory: Callable[..., FaultProxy],
    tmp_root: Path,
) -> None:
    limit = descriptors.MAX_MANIFEST_BYTES
    config = images.Blob(mediatypes.OCI_CONFIG, b"{" + b" " * limit + b"}")
    layer = images.layer({"a": "b"})
    manifest = images.Blob(mediatypes.OCI_MANIFEST, images.canonical_json({
        "schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
        "config": config.descriptor(), "layers": [layer.blob().descriptor()],
    }))
    pusher = images.Pusher(registry.url, "limits/config", None)
    try:
        pusher.blob(config)
        pusher.blob(layer)
        pusher.manifest(manifest, "1")
    finally:
        pusher.close()
    proxy = fault_proxy_factory(registry.url)

    with pytest.raises(errors.InvalidManifest, match=f"{config.size} bytes.*image configs"):
        await pull(tmp_root, f"{proxy.host}/limits/config:1", platform=AMD64)

    assert proxy.requests_to(f"/blobs/{config.digest}") == []
