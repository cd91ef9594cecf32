"""Garbage collection in the service: in-flight pulls are leased; discard_unpacked_layers."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import descriptors, service
from agent.images.registry import client, hosts
from tests.images.pulling import pull, stored_blobs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay mounts")
AMD64 = descriptors.Platform("linux", "amd64")


async def test_gc_during_a_pull_keeps_everything_the_pull_has_fetched(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    fast = images.layer({"fast": "in first"})
    slow = images.random_layer(200_000, seed=61)
    image = images.Image([fast, slow])
    images.push(fault_proxy.upstream, "gc/inflight", "1", image)
    fault_proxy.drip(f"/blobs/{slow.digest}", chunk=40_000, interval=0.3)

    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        svc = service.ImageService(tmp_root, rc, service.ServiceOptions())
        try:
            pulling = asyncio.create_task(
                svc.pull(f"{fault_proxy.host}/gc/inflight:1", platform=AMD64)
            )
            while fast.digest not in stored_blobs(tmp_root):
                await asyncio.sleep(0.05)
            collected = await svc.gc()
            result = await pulling
            after = await svc.gc()
        finally:
            svc.close()

    assert collected.blobs == [] and collected.snapshots == []
    assert result.chain_id and after.blobs == [] and after.snapshots == []
    assert {b.digest for b in image.blobs} <= stored_blobs(tmp_root)


async def test_discard_unpacked_layers_keeps_only_manifest_and_config(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = images.Image([images.layer({"a": "1"}), images.random_layer(50_000, seed=62)])
    images.push(fault_proxy.upstream, "gc/discard", "1", image)
    ref = f"{fault_proxy.host}/gc/discard:1"

    first = await pull(tmp_root, ref, platform=AMD64, snapshotter="overlayfs",
                       discard_unpacked_layers=True)
    assert stored_blobs(tmp_root) == {image.digest, image.config.digest}
    fault_proxy.clear_requests()
    second = await pull(tmp_root, ref, platform=AMD64, snapshotter="overlayfs",
                        discard_unpacked_layers=True)
    # The snapshots are there, so the discarded layers are not fetched again.
    assert second.chain_id == first.chain_id and second.bytes_downloaded == 0
    assert fault_proxy.requests_to("/blobs/") == []
