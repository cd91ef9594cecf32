"""The store size the disk budget compares with ``runtime.max_store_bytes`` counts what is on
disk: committed blobs, partial downloads, and the unpacked snapshots (not a guess from the
compressed size)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures import images
from fixtures.registries import Registry

from agent.images import descriptors, service
from agent.images.registry import client, hosts
from agent.node import collecting, reconciling
from tests.images.pulling import FAST_RETRY

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay snapshots")
AMD64 = descriptors.Platform("linux", "amd64")
MiB = 1 << 20


async def test_the_budget_counts_blobs_partial_downloads_and_unpacked_layers(
    registry: Registry, tmp_root: Path
) -> None:
    # 2 MiB of zeros: a few KiB compressed, 2 MiB on disk once unpacked.
    image = images.Image([images.layer({"zeros": bytes(2 * MiB)})])
    images.push(registry, "budget/size", "1", image)
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, service.ServiceOptions())
        try:
            await svc.pull(f"{registry.host}/budget/size:1", platform=AMD64)
            with svc.content.writer("a-cancelled-download") as partial:
                partial.write(bytes(300_000))
            collector = collecting.Collector(svc, reconciling.Budget(max_store_bytes=2 * MiB))
            stats = await collector.measure()
            usage = collector.usage()
            problem = collector.check(0)
        finally:
            svc.close()

    blobs = image.manifest.size + image.config.size + image.layers[0].size
    assert stats.size_bytes == blobs + 300_000
    assert usage.size >= blobs + 300_000 + 2 * MiB
    assert problem is not None and "runtime.max_store_bytes" in problem
