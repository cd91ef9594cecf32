"""What happens when pulls, garbage collection and other writers share one store at once:
nothing an in-flight pull found or fetched is collected under it (found by review; each
case failed before the lease fix)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import backends, descriptors, service
from agent.images.registry import client, hosts
from tests.images.pulling import ingests, stored_blobs

AMD64 = descriptors.Platform("linux", "amd64")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay mounts")


async def test_gc_while_a_pull_fetches_its_platform_manifest_keeps_the_index(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    amd = images.Image([images.layer({"a": "1"})])
    arm = images.Image([images.layer({"b": "2"})], architecture="arm64")
    index = images.index([amd, arm])
    images.push(fault_proxy.upstream, "shared/index", "1", index)
    fault_proxy.delay(f"/manifests/{amd.digest}", 1.0, method="GET")
    ref = f"{fault_proxy.host}/shared/index:1"

    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        svc = service.ImageService(tmp_root, rc, service.ServiceOptions(),
                                    backend=backends.LocalBackend(None))
        try:
            pulling = asyncio.create_task(svc.pull(ref, platform=AMD64))
            while index.digest not in stored_blobs(tmp_root):
                await asyncio.sleep(0.01)
            collected = await svc.gc()
            await pulling
        finally:
            svc.close()

    assert index.digest not in collected.blobs
    assert index.digest in stored_blobs(tmp_root)  # the record names it: it must be there


@needs_root
async def test_discarding_one_pulls_layers_keeps_a_layer_another_pull_still_needs(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    shared = images.random_layer(120_000, seed=72)
    x = images.Image([images.layer({"x1": "x"}), shared])
    y = images.Image([images.random_layer(200_000, seed=71), shared])
    images.push(fault_proxy.upstream, "shared/x", "1", x)
    images.push(fault_proxy.upstream, "shared/y", "1", y)
    fault_proxy.drip(f"/blobs/{shared.digest}", chunk=40_000, interval=0.3)
    fault_proxy.drip(f"/blobs/{y.layers[0].digest}", chunk=40_000, interval=0.5)

    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        options = service.ServiceOptions(discard_unpacked_layers=True, unpack_concurrency=1)
        svc = service.ImageService(tmp_root, rc, options)
        try:
            px = asyncio.create_task(svc.pull(f"{fault_proxy.host}/shared/x:1", platform=AMD64))
            while not ingests(tmp_root):
                await asyncio.sleep(0.01)
            py = asyncio.create_task(svc.pull(f"{fault_proxy.host}/shared/y:1", platform=AMD64))
            rx, ry = await px, await py
        finally:
            svc.close()
    assert rx.chain_id and ry.chain_id  # y unpacked the shared layer x had discarded


@needs_root
async def test_a_blob_another_writer_publishes_meanwhile_does_not_fail_the_unpack(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    big = images.random_layer(200_000, seed=81)
    image = images.Image([big])
    images.push(fault_proxy.upstream, "shared/published", "1", image)
    fault_proxy.drip(f"/blobs/{big.digest}", chunk=40_000, interval=0.3)

    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        svc = service.ImageService(tmp_root, rc, service.ServiceOptions())
        try:
            pulling = asyncio.create_task(
                svc.pull(f"{fault_proxy.host}/shared/published:1", platform=AMD64)
            )
            while not ingests(tmp_root):
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.4)
            # Another process sharing the store publishes the same (verified) blob first.
            target = tmp_root / "content/blobs/sha256" / big.digest.split(":")[1]
            target.write_bytes(big.data)
            result = await pulling
        finally:
            svc.close()
    assert result.chain_id
