"""A pull downloads its layers in the manifest's order, the order its unpack applies them in
(into containerd too: ``containerd/test_layers_download_in_their_order.py``); and a layer
another pull is downloading does not hold up the layers behind it.

The registry is the real one, behind the fault proxy, which records the requests in the
order they arrive.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import backends, service
from agent.images.registry import client, hosts
from tests.images.containerd.test_layers_download_in_their_order import (
    LAYERS,
    layer_requests,
    many_layer_image,
)
from tests.images.pulling import FAST_RETRY
from tests.images.test_image_uncompressed_cap import AMD64

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay mounts")


@needs_root
async def test_layers_download_into_the_local_store_in_the_manifests_order(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = many_layer_image(seed=90)
    order, result = await layer_requests(
        fault_proxy, image, "order/local", tmp_root,
        backends.open_store(tmp_root, "overlayfs"), 1,
    )
    assert order == list(range(LAYERS))
    assert result.chain_id


async def test_a_layer_another_pull_is_downloading_does_not_hold_up_the_next_ones(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    shared = images.random_layer(300_000, seed=95)
    own = [images.random_layer(50_000, seed=96 + i) for i in range(2)]
    first = images.Image([shared])
    second = images.Image([shared, *own])
    images.push(fault_proxy.upstream, "order/first", "1", first)
    images.push(fault_proxy.upstream, "order/second", "1", second)
    # The first pull's download of the shared layer goes silent until released.
    stalled = fault_proxy.stall(f"/blobs/{shared.digest}", after=1000, times=1)

    def gets(digest: str) -> int:
        return len(fault_proxy.requests_to(f"/blobs/{digest}", "GET"))

    async def until(condition: object, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while not condition():  # type: ignore[operator]
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        options = service.ServiceOptions(max_concurrent_downloads=1, progress_timeout=30.0)
        svc = service.ImageService(tmp_root, rc, options, backend=backends.open_store(tmp_root, ""))
        try:
            one = asyncio.create_task(svc.pull(f"{fault_proxy.host}/order/first:1", platform=AMD64))
            assert await until(lambda: gets(shared.digest) == 1, 10)
            two = asyncio.create_task(
                svc.pull(f"{fault_proxy.host}/order/second:1", platform=AMD64)
            )
            # The second pull waits for the first one's download of the shared layer, and
            # meanwhile downloads its own layers, one at a time, in their order.
            went_on = await until(lambda: all(gets(layer.digest) for layer in own), 10)
            still_stalled = gets(shared.digest) == 1 and not two.done()
            stalled.release()
            results = await asyncio.gather(one, two)
        finally:
            svc.close()

    assert went_on and still_stalled
    order = [r.path.rsplit(":", 1)[1] for r in fault_proxy.requests_to("/blobs/", "GET")]
    hexes = [layer.digest.split(":")[1] for layer in own]
    assert [h for h in order if h in hexes] == hexes
    assert [r.digest for r in results] == [first.digest, second.digest]
    assert results[1].bytes_downloaded == second.config.size + sum(layer.size for layer in own)
