"""A pull into containerd downloads its layers in the manifest's order, as one into the local
store does (``tests/images/test_layers_download_in_their_order.py``): the unpack applies them
in that order, so on a network slower than the unpack a layer fetched out of turn holds it up.
``images.max_concurrent_downloads`` blobs at once: the first that many start together, each
next one when a download ends. Before the fix the order was whichever of containerd's answers
to "do you have this blob?" came back first ([1, 2, 0, 4, 3, 5] with one download at once).

The registry is the real one, behind the fault proxy, which records the requests in the
order they arrive.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import backends as backend_api
from agent.images import service
from agent.images.registry import client, hosts
from tests.images.pulling import FAST_RETRY
from tests.images.test_image_uncompressed_cap import AMD64

from .conftest import Containerd

pytestmark = pytest.mark.root

LAYERS = 6


def many_layer_image(seed: int) -> images.Image:
    return images.Image([
        images.random_layer(60_000 + 7_000 * i, files=3, seed=seed * 100 + i)
        for i in range(LAYERS)
    ])


async def layer_requests(
    proxy: FaultProxy, image: images.Image, repo: str, root: Path,
    backend: backend_api.Backend, slots: int,
) -> tuple[list[int], service.PullResult]:
    """Pull ``image`` with ``slots`` downloads at once: the indices of its layers in the order
    their blob requests reached the registry, and the pull's result."""
    images.push(proxy.upstream, repo, "1", image)
    proxy.clear_requests()
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(
            root, rc, service.ServiceOptions(max_concurrent_downloads=slots), backend=backend
        )
        try:
            result = await svc.pull(f"{proxy.host}/{repo}:1", platform=AMD64)
        finally:
            svc.close()
    index = {layer.digest.split(":")[1]: i for i, layer in enumerate(image.layers)}
    got = [r.path.rsplit(":", 1)[1] for r in proxy.requests_to("/blobs/", "GET")]
    return [index[h] for h in got if h in index], result


@pytest.mark.parametrize("slots", [1, 2])
async def test_layers_download_into_containerd_in_the_manifests_order(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path, slots: int
) -> None:
    for attempt in range(3):  # the order was lost by chance before: ask more than once
        backend = ctrd.backend()  # the service closes it
        backend.start()
        image = many_layer_image(seed=40 + 10 * slots + attempt)
        order, result = await layer_requests(
            fault_proxy, image, f"order/ctrd{slots}-{attempt}", tmp_root / str(attempt),
            backend, slots,
        )
        assert sorted(order) == list(range(LAYERS)), order  # each downloaded once
        # One at a time: exactly in order. With more, the blobs take their slots in order,
        # but those that get one at the same moment may send their requests crosswise.
        assert all(abs(order.index(i) - i) < slots for i in range(LAYERS)), order
        assert ctrd.snapshots().get(result.chain_id) == "Committed"

