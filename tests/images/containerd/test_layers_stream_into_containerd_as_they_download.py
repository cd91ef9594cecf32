"""Into containerd, a layer is unpacked and streamed into containerd's content ingest while
its blob is still downloading — not fetched whole first and copied afterwards — and nothing
whose bytes were not verified becomes visible in containerd.

The registry is the in-process fake of ``registry/test_client_faults.py``; its answer for the
layer pauses mid-body until the test has seen containerd's active snapshot and ingest.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from fixtures import images
from fixtures import layers as L

from agent.images import containerd, errors, service
from agent.images.containerd import content as content_mod
from agent.images.content import local
from agent.images.registry import client, hosts
from tests.images.containerd.conftest import Containerd
from tests.images.registry.test_client_faults import HOST
from tests.images.test_unpack_while_downloading import AMD64, PausingRegistry


def one_layer_image() -> images.Image:
    """Small files first (applied from the first bytes), then incompressible data; unlike
    other tests' images, so containerd has none of it yet."""
    layer = L.Layer().dir("srv")
    for i in range(40):
        layer.file(f"srv/small-{i}", f"streamed {i}\n".encode() * 50)
    tar = layer.file("blob.bin", L.random_bytes(3_000_000, seed=1313)).tar()
    return images.Image([images.Layer(images.compress(tar, "gzip"), images.sha256(tar))])


async def pull_into(
    fake: PausingRegistry, root: Path, backend: containerd.ContainerdBackend
) -> service.PullResult:
    async with client.RegistryClient(
        hosts.RegistryHosts(None), None, transport=httpx.MockTransport(fake.handler),
        retry=client.RetryPolicy(attempts=2, base=0.001, cap=0.001),
    ) as rc:
        svc = service.ImageService(
            root, rc, service.ServiceOptions(progress_timeout=5.0), backend=backend
        )
        try:
            return await svc.pull(f"{HOST}/stream:1", platform=AMD64)
        finally:
            svc.close()


def active_ingests(ctrd: Containerd) -> list[str]:
    out = ctrd.ctr("content", "active").stdout.splitlines()[1:]
    return [line.split()[0] for line in out if line.strip()]


async def test_a_layer_streams_into_containerd_while_its_blob_downloads(
    ctrd: Containerd, tmp_path: Path
) -> None:
    image = one_layer_image()
    layer = image.layers[0]
    backend = ctrd.backend()
    backend.start()
    seen: dict[str, object] = {}

    def go() -> bool:
        # Let the body go on once containerd holds the layer's active snapshot and ingest.
        active = [k for k, kind in ctrd.snapshots().items() if kind == "Active"]
        ingests = active_ingests(ctrd)
        if not active or content_mod.ingest_ref("layer", layer.digest) not in ingests:
            return False
        seen["blob_in_containerd"] = backend.has_blob(layer.digest)
        seen["blob_in_our_store"] = local.LocalStore(tmp_path / "content").exists(layer.digest)
        return True

    fake = PausingRegistry(image, first=layer.data, pause_at=len(layer.data) // 2,
                           end=layer.size, go=go)
    result = await pull_into(fake, tmp_path, backend)

    assert seen == {"blob_in_containerd": False, "blob_in_our_store": False}
    assert fake.layer_gets == 1
    assert ctrd.snapshots().get(result.chain_id) == "Committed"
    listed = [line for line in ctrd.ctr("content", "ls").stdout.splitlines()
              if line.startswith(str(layer.digest))]
    assert len(listed) == 1
    assert f"containerd.io/uncompressed={layer.diff_id}" in listed[0]
    assert active_ingests(ctrd) == []


async def test_bytes_that_are_not_the_blob_never_become_containerd_content(
    ctrd: Containerd,
) -> None:
    """The ingest is committed with the expected digest; containerd refuses other bytes."""
    layer = images.random_layer(300_000, files=3, seed=131)
    backend = ctrd.backend()
    try:
        ingest = content_mod.Ingest(
            backend.content, content_mod.ingest_ref("layer", layer.digest), layer.size,
            layer.digest,
        )
        bad = bytearray(layer.data)
        bad[1000] ^= 0xFF
        ingest.write(bytes(bad))
        with pytest.raises(errors.DigestMismatch):
            ingest.commit({content_mod.LABEL_UNCOMPRESSED: str(layer.diff_id)})
        assert not backend.has_blob(layer.digest)
        # The same ref then takes the right bytes from offset 0.
        again = content_mod.Ingest(
            backend.content, content_mod.ingest_ref("layer", layer.digest), layer.size,
            layer.digest,
        )
        again.write(layer.data)
        assert again.commit() is True
        assert backend.has_blob(layer.digest)
        assert active_ingests(ctrd) == []
    finally:
        backend.close()
