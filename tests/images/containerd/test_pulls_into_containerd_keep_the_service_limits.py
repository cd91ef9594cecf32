"""A pull through the image service into containerd keeps the service's limits and uses what
containerd already has: the per-image uncompressed cap of ``ServiceOptions`` refuses a bomb
spread over small layers, as in the local store; a layer blob containerd holds as content
(without its snapshot) is not downloaded again and is applied from containerd; the local
copy of a layer another pull in flight holds is not deleted after the import; what the
import unpacks reaches the pull's progress (the agent's disk budget); a blob corrupted once
is fetched again, and containerd gets the good copy."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy, Rule
from fixtures.registries import Registry

from agent.images import errors, service
from agent.images.progress import events
from agent.images.registry import client, hosts
from tests.images.pulling import FAST_RETRY, stored_blobs
from tests.images.test_image_uncompressed_cap import AMD64, MiB, _zeros
from tests.images.test_unpacked_bytes_reach_the_pull_progress import (
    assert_every_layer_counted,
    two_layer_image,
)

from .conftest import Containerd

pytestmark = pytest.mark.root


async def test_the_per_image_cap_refuses_an_image_in_containerd_mode(
    ctrd: Containerd, registry: Registry, tmp_root: Path
) -> None:
    bomb = images.Image([*(_zeros(100 + i) for i in range(4))])
    images.push(registry, "ctrdcap/bomb", "1", bomb)
    ref = f"{registry.host}/ctrdcap/bomb:1"
    # The backend built without a cap of its own: the service's option is the one that counts.
    backend = ctrd.backend()
    backend.start()
    options = service.ServiceOptions(max_image_uncompressed_bytes=8 * MiB)
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, options, backend=backend)
        try:
            with pytest.raises(errors.UnsafeLayer) as failed:
                await svc.pull(ref, platform=AMD64)
        finally:
            svc.close()

    assert "images.max_image_uncompressed_bytes" in str(failed.value)
    assert ref not in ctrd.ctr("images", "ls", "-q").stdout.split()


async def test_a_layer_containerd_has_as_content_only_is_applied_from_there(
    ctrd: Containerd, registry: Registry, tmp_root: Path
) -> None:
    layer = images.layer({"srv/only-in-containerd": "kept\n"})
    image = images.Image([layer])
    images.push(registry, "ctrdcap/content", "1", image)
    ref = f"{registry.host}/ctrdcap/content:1"
    backend = ctrd.backend()
    backend.start()
    # containerd has the blob (fetched without unpacking, or for another snapshotter).
    backend.content.write(
        "test-content-only", io.BytesIO(layer.data), layer.size, layer.digest,
        {"containerd.io/gc.root": "test"},
    )
    assert layer.diff_id not in ctrd.snapshots()  # a one-layer chain ID is its diff ID
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, backend=backend)
        try:
            result = await svc.pull(ref, platform=AMD64)
        finally:
            svc.close()

    assert ctrd.snapshots().get(result.chain_id) == "Committed"
    assert result.bytes_downloaded == image.config.size


async def test_a_local_layer_another_pull_still_needs_is_kept_after_an_import(
    ctrd: Containerd, registry: Registry, tmp_root: Path
) -> None:
    shared = images.layer({"srv/shared": "base\n"})
    own = images.layer({"srv/own": "app\n"})
    image = images.Image([shared, own])
    images.push(registry, "ctrdcap/shared", "1", image)
    backend = ctrd.backend()
    backend.start()
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, backend=backend)
        try:
            # The shared layer is in our store (an earlier pull left it there: layers pulled
            # into containerd are written into containerd's content store only), and another
            # pull in flight has found it there (it holds it in its lease) and has yet to
            # read it.
            with svc.content.writer(str(shared.digest)) as w:
                w.write(shared.data)
                w.commit(shared.size, shared.digest)
            with svc.leases.held() as other:
                svc.leases.hold(other, shared.digest)
                await svc.pull(f"{registry.host}/ctrdcap/shared:1", platform=AMD64)
                kept = stored_blobs(tmp_root)
        finally:
            svc.close()

    assert shared.digest in kept
    assert own.digest not in kept  # the layer nothing else needs is containerd's alone


async def test_what_an_import_unpacks_reaches_the_pull_progress(
    ctrd: Containerd, registry: Registry, tmp_root: Path
) -> None:
    image = two_layer_image(72)
    images.push(registry, "ctrdcap/written", "1", image)
    backend = ctrd.backend()
    backend.start()
    seen: list[events.ProgressEvent] = []
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, backend=backend)
        try:
            await svc.pull(f"{registry.host}/ctrdcap/written:1", platform=AMD64,
                           on_event=seen.append)
        finally:
            svc.close()

    assert_every_layer_counted(image, seen)


async def test_a_blob_corrupted_once_is_fetched_again_and_lands_in_containerd(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    victim = images.random_layer(400_000, files=4, seed=403)
    image = images.Image([images.layer({"etc/hostname": "corrupt\n"}), victim])
    images.push(fault_proxy.upstream, "ctrdcap/corrupt", "1", image)
    # Corrupt, and slow enough that containerd's copy reads it while it downloads.
    fault_proxy.add(Rule(f"/blobs/{victim.digest}", "GET", times=1, corrupt=(150_000, 3),
                         drip=(50_000, 0.05)))
    backend = ctrd.backend()
    backend.start()
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, backend=backend)
        try:
            result = await svc.pull(f"{fault_proxy.host}/ctrdcap/corrupt:1", platform=AMD64)
        finally:
            svc.close()

    assert result.retries == 1
    assert len(fault_proxy.requests_to(f"/blobs/{victim.digest}", "GET")) == 2
    assert ctrd.snapshots().get(result.chain_id) == "Committed"
    # containerd keeps the good copy of the layer as content, as after its own pull.
    assert victim.digest in ctrd.ctr("content", "ls", "-q").stdout.split()
