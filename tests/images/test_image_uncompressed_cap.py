"""Decompression bombs spread over many layers: each small layer passes the per-layer limit,
but the image as a whole stops at ``max_image_uncompressed_bytes``; what the failed pull
committed is removed, except what another image uses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy
from fixtures.registries import Registry

from agent.images import descriptors, errors, service
from agent.images.registry import client, hosts
from tests.images.pulling import FAST_RETRY, ingests, stored_blobs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay snapshots")
AMD64 = descriptors.Platform("linux", "amd64")
MiB = 1 << 20


def _zeros(index: int) -> images.Layer:
    """A 3 MiB file of zeros: a few KiB of gzip (over 1000:1)."""
    return images.layer({f"zeros/{index}": bytes(3 * MiB)})


async def test_many_small_high_ratio_layers_stop_at_the_image_cap_and_leave_nothing_unused(
    registry: Registry, tmp_root: Path
) -> None:
    base = images.layer({"etc/os-release": "ID=shared\n"})
    app = images.Image([base])
    bomb = images.Image([base, *(_zeros(i) for i in range(6))])
    assert all(layer.size < 64 * 1024 for layer in bomb.layers)
    images.push(registry, "cap/app", "1", app)
    images.push(registry, "cap/bomb", "1", bomb)
    options = service.ServiceOptions(max_image_uncompressed_bytes=8 * MiB)

    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, options)
        try:
            kept = await svc.pull(f"{registry.host}/cap/app:1", platform=AMD64)
            with pytest.raises(errors.UnsafeLayer) as failed:
                await svc.pull(f"{registry.host}/cap/bomb:1", platform=AMD64)
            assert svc.snapshotter is not None
            snapshots = {info.name: info.kind.name for info in svc.snapshotter.walk()}
            names = [r.name for r in svc.records]
        finally:
            svc.close()

    assert "more than 8.0 MiB in total (images.max_image_uncompressed_bytes)" in str(failed.value)
    # The shared base layer stays with the image that uses it; nothing of the bomb does.
    assert snapshots == {kept.chain_id: "COMMITTED"}
    assert names == [f"{registry.host}/cap/app:1"]
    assert stored_blobs(tmp_root) == {app.digest, app.config.digest, base.digest}
    assert ingests(tmp_root) == []



async def test_a_refused_images_partial_downloads_are_removed_with_it(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    """A layer still downloading when the cap refuses the image leaves no partial download
    (it would never be resumed: the image is refused again)."""
    slow = images.random_layer(300_000, seed=807)
    bomb = images.Image([*(_zeros(i) for i in range(6)), slow])
    images.push(fault_proxy.upstream, "cap/slow-bomb", "1", bomb)
    fault_proxy.stall(f"/blobs/{slow.digest}", after=100_000)
    options = service.ServiceOptions(max_image_uncompressed_bytes=8 * MiB)

    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, options)
        try:
            with pytest.raises(errors.UnsafeLayer):
                await svc.pull(f"{fault_proxy.host}/cap/slow-bomb:1", platform=AMD64)
        finally:
            svc.close()

    assert ingests(tmp_root) == []
    assert stored_blobs(tmp_root) == set()
