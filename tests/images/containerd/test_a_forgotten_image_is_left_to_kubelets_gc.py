"""When no prefetch wants an image any more, the agent forgets it: its containerd records
stay (pods may use it) but lose the pin, so kubelet's image GC may remove it later."""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import containerd, service
from agent.images.registry import client, hosts

from .conftest import Containerd

pytestmark = pytest.mark.root


def labels_of(ctrd: Containerd, name: str) -> str:
    rows = ctrd.ctr("images", "ls").stdout.splitlines()
    return next(row for row in rows if row.startswith(name + " "))


async def test_forgetting_an_image_unpins_its_records_and_keeps_them(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = images.Image([images.random_layer(30_000, files=2, seed=141)])
    images.push(fault_proxy.url, "ctrd/forget", "1", image)
    reference = f"{fault_proxy.host}/ctrd/forget:1"
    backend = containerd.ContainerdBackend(ctrd.address)
    backend.start()
    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        svc = service.ImageService(tmp_root, rc, backend=backend)
        try:
            result = await svc.pull(reference, pinned=True)
            digest_name = f"{fault_proxy.host}/ctrd/forget@{result.digest}"
            for name in (reference, digest_name):
                assert "io.cri-containerd.pinned=pinned" in labels_of(ctrd, name)
            await svc.forget(reference)
            assert svc.list_images() == []
        finally:
            svc.close()
    for name in (reference, digest_name):
        row = labels_of(ctrd, name)
        assert "io.cri-containerd.pinned" not in row
        assert "io.cri-containerd.image=managed" in row
