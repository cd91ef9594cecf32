"""In containerd mode a layer is applied into containerd's snapshotter while its blob is
still downloading (as in the local store): the import does not wait for every blob first."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from agent.images import containerd, service, snapshots
from agent.images.content import local
from agent.images.registry import client, hosts
from tests.images.registry.test_client_faults import HOST
from tests.images.test_unpack_while_downloading import AMD64, PausingRegistry, one_layer_image

from .conftest import Containerd

pytestmark = pytest.mark.root


async def test_a_layer_is_applied_into_containerd_before_its_blob_has_arrived(
    ctrd: Containerd, tmp_root: Path
) -> None:
    image = one_layer_image()
    layer = image.layers[0]
    watcher = containerd.Client(ctrd.address, "k8s.io")
    containerds = containerd.ContainerdSnapshotter(watcher, "overlayfs")
    seen: dict[str, object] = {}

    def go() -> bool:
        # Let the body go on once containerd holds an active snapshot of this layer, and
        # note whether the blob was complete at that moment.
        active = [i.name for i in containerds.walk() if i.kind is snapshots.Kind.ACTIVE
                  and i.name.startswith("extract-")]
        if not active:
            return False
        seen["blob_committed"] = local.LocalStore(tmp_root / "content").exists(layer.digest)
        return True

    fake = PausingRegistry(image, first=layer.data, pause_at=len(layer.data) // 2,
                           end=layer.size, go=go)
    backend = containerd.ContainerdBackend(ctrd.address)
    backend.start()
    try:
        async with client.RegistryClient(
            hosts.RegistryHosts(None), None, transport=httpx.MockTransport(fake.handler),
        ) as rc:
            svc = service.ImageService(tmp_root, rc, backend=backend)
            try:
                result = await svc.pull(f"{HOST}/overlap:1", platform=AMD64, pinned=True)
            finally:
                svc.close()
    finally:
        watcher.close()

    assert seen["blob_committed"] is False
    assert ctrd.snapshots().get(result.chain_id) == "Committed"
    assert f"{HOST}/overlap:1" in ctrd.ctr("images", "ls", "-q").stdout.split()
    assert fake.layer_gets == 1
