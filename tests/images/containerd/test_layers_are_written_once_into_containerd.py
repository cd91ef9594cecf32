"""Into containerd, a layer's bytes are written once, into containerd's own content ingest,
and unpacked from there while they arrive: the prefetcher's store never holds a copy (not
even while downloading). Bytes that fail the digest never become containerd content and leave
no ingest; a cancelled pull leaves no partial ingest either. Downloads still resume: with
``Range`` within a pull, and from what an interrupted pull left in containerd's ingest.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from fixtures import images
from fixtures import layers as L
from fixtures.faultproxy import FaultProxy, Rule
from fixtures.registries import Registry

from agent.images import containerd, digests, errors, service
from agent.images.containerd import content as content_mod
from agent.images.containerd import ingests
from agent.images.content import local
from agent.images.registry import client, hosts
from tests.images.containerd.test_layers_stream_into_containerd_as_they_download import (
    active_ingests,
    pull_into,
)
from tests.images.pulling import FAST_RETRY, stored_blobs
from tests.images.test_unpack_while_downloading import AMD64, PausingRegistry

from .conftest import Containerd


def one_layer_image() -> images.Image:
    """Small files, then incompressible data; unlike other tests' images."""
    layer = L.Layer().dir("opt")
    for i in range(30):
        layer.file(f"opt/once-{i}", f"written once {i}\n".encode() * 40)
    tar = layer.file("opt/blob.bin", L.random_bytes(2_000_000, seed=1306)).tar()
    return images.Image([images.Layer(images.compress(tar, "gzip"), images.sha256(tar))])


def active_snapshots(ctrd: Containerd) -> set[str]:
    return {k for k, kind in ctrd.snapshots().items() if kind == "Active"}


def containerd_blobs(ctrd: Containerd) -> set[str]:
    return set(ctrd.ctr("content", "ls", "-q").stdout.split())


async def test_a_layer_is_written_only_into_containerds_content_store(
    ctrd: Containerd, tmp_path: Path
) -> None:
    image = one_layer_image()
    layer = image.layers[0]
    backend = ctrd.backend()
    backend.start()
    seen: dict[str, object] = {}

    def go() -> bool:
        # Half the layer is in: containerd's ingest holds it, our store holds nothing.
        ref = content_mod.ingest_ref("layer", layer.digest)
        if ref not in active_ingests(ctrd):
            return False
        seen["our_ingests"] = local.LocalStore(tmp_path / "content").ingests()
        return True

    fake = PausingRegistry(image, first=layer.data, pause_at=len(layer.data) // 2,
                           end=layer.size, go=go)
    result = await pull_into(fake, tmp_path, backend)

    assert seen == {"our_ingests": []}
    assert fake.layer_gets == 1
    assert ctrd.snapshots().get(result.chain_id) == "Committed"
    # The layer is containerd's content, with the labels its own pull would set; our store
    # has only the manifest and the config.
    listed = [line for line in ctrd.ctr("content", "ls").stdout.splitlines()
              if line.startswith(str(layer.digest))]
    assert len(listed) == 1
    assert f"containerd.io/uncompressed={layer.diff_id}" in listed[0]
    assert "containerd.io/distribution.source." in listed[0]
    assert stored_blobs(tmp_path) == {str(result.manifest_digest), str(result.config_digest)}
    assert local.LocalStore(tmp_path / "content").ingests() == []
    assert active_ingests(ctrd) == []


async def test_a_blob_that_is_corrupt_every_time_never_reaches_containerd(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    base = images.layer({"etc/hostname": "twice corrupt\n"})
    victim = images.random_layer(400_000, files=4, seed=1307)
    image = images.Image([base, victim])
    images.push(fault_proxy.upstream, "ctrdonce/corrupt", "1", image)
    fault_proxy.add(Rule(f"/blobs/{victim.digest}", "GET", corrupt=(150_000, 3),
                         drip=(50_000, 0.02)))
    backend = ctrd.backend()
    backend.start()
    actives = active_snapshots(ctrd)
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, backend=backend)
        try:
            with pytest.raises(errors.DigestMismatch):
                await svc.pull(f"{fault_proxy.host}/ctrdonce/corrupt:1", platform=AMD64)
        finally:
            svc.close()

    assert len(fault_proxy.requests_to(f"/blobs/{victim.digest}", "GET")) == 2  # once more
    assert str(victim.digest) not in containerd_blobs(ctrd)
    assert content_mod.ingest_ref("layer", victim.digest) not in active_ingests(ctrd)
    top = digests.chain_ids([base.diff_id, victim.diff_id])[-1]
    assert str(top) not in ctrd.snapshots()
    assert str(victim.digest) not in stored_blobs(tmp_root)
    assert active_snapshots(ctrd) == actives  # nothing prepared for it is left


async def test_a_cancelled_pull_leaves_no_partial_ingest_in_containerd(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    victim = images.random_layer(600_000, files=3, seed=1308)
    image = images.Image([victim])
    images.push(fault_proxy.upstream, "ctrdonce/cancel", "1", image)
    stall = Rule(f"/blobs/{victim.digest}", "GET", stall_after=200_000)
    fault_proxy.add(stall)
    ref = content_mod.ingest_ref("layer", victim.digest)
    backend = ctrd.backend()
    backend.start()
    try:
        async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
            svc = service.ImageService(
                tmp_root, rc, service.ServiceOptions(progress_timeout=60.0), backend=backend
            )
            try:
                pull = asyncio.ensure_future(
                    svc.pull(f"{fault_proxy.host}/ctrdonce/cancel:1", platform=AMD64)
                )
                # Until containerd lists the layer's ingest ("0B" passes too: the pull may
                # be cancelled right after it opened the ingest, before its first byte).
                for _ in range(200):
                    await asyncio.sleep(0.05)
                    listed = await asyncio.to_thread(ctrd.ctr, "content", "active")
                    rows = [r.split() for r in listed.stdout.splitlines()[1:]]
                    if any(r[0] == ref and r[1] != "0" for r in rows if r):
                        break
                else:
                    pytest.fail("the layer's ingest never appeared in containerd")
                pull.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await pull
            finally:
                svc.close()
    finally:
        stall.release()

    assert ref not in active_ingests(ctrd)
    assert str(victim.digest) not in containerd_blobs(ctrd)
    assert local.LocalStore(tmp_root / "content").ingests() == []


async def test_a_pull_cancelled_just_after_it_opened_the_ingest_leaves_none(
    ctrd: Containerd, registry: Registry, tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fetcher asks containerd once more whether the blob appeared while it opened the
    # ingest; the pull is cancelled during that question (as a loaded machine let happen).
    victim = images.random_layer(300_000, files=2, seed=1310)
    images.push(registry, "ctrdonce/cancel-open", "1", images.Image([victim]))
    asked = threading.Event()
    hold = threading.Event()
    exists = ingests.ContainerdIngests.exists
    opened: list[str] = []
    writer = ingests.ContainerdIngests.writer

    def opening(self: ingests.ContainerdIngests, ref: str, **kwargs: object) -> object:
        opened.append(ref)
        return writer(self, ref, **kwargs)  # type: ignore[arg-type]

    def slow_exists(self: ingests.ContainerdIngests, digest: digests.Digest) -> bool:
        if opened:  # the question after the ingest was opened
            asked.set()
            hold.wait(10)
        return exists(self, digest)

    monkeypatch.setattr(ingests.ContainerdIngests, "exists", slow_exists)
    monkeypatch.setattr(ingests.ContainerdIngests, "writer", opening)
    backend = ctrd.backend()
    backend.start()
    try:
        async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
            svc = service.ImageService(tmp_root, rc, backend=backend)
            try:
                pull = asyncio.ensure_future(
                    svc.pull(f"{registry.host}/ctrdonce/cancel-open:1", platform=AMD64)
                )
                assert await asyncio.to_thread(asked.wait, 10)
                assert content_mod.ingest_ref("layer", victim.digest) in active_ingests(ctrd)
                pull.cancel()
                hold.set()
                with pytest.raises(asyncio.CancelledError):
                    await pull
            finally:
                hold.set()
                svc.close()
    finally:
        hold.set()
    assert active_ingests(ctrd) == []
    assert str(victim.digest) not in containerd_blobs(ctrd)


async def pull_through(
    backend: containerd.ContainerdBackend, root: Path, ref: str
) -> service.PullResult:
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(root, rc, backend=backend)
        try:
            return await svc.pull(ref, platform=AMD64)
        finally:
            svc.close()


async def test_an_interrupted_download_into_containerd_resumes_with_range(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    blob = images.random_layer(500_000, seed=1309)
    images.push(fault_proxy.upstream, "ctrdonce/resume", "1", images.Image([blob]))
    fault_proxy.cut(f"/blobs/{blob.digest}", after=200_000, times=1)
    backend = ctrd.backend()
    backend.start()

    result = await pull_through(backend, tmp_root, f"{fault_proxy.host}/ctrdonce/resume:1")

    gets = fault_proxy.requests_to(f"/blobs/{blob.digest}", "GET")
    assert [g.range for g in gets] == [None, "bytes=200000-"]
    assert sum(g.bytes_sent for g in gets) == blob.size
    assert str(blob.digest) in containerd_blobs(ctrd)
    assert ctrd.snapshots().get(result.chain_id) == "Committed"
    assert str(blob.digest) not in stored_blobs(tmp_root)


async def test_an_ingest_a_killed_pull_left_in_containerd_is_resumed_not_refetched(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    blob = images.random_layer(400_000, seed=1310)
    images.push(fault_proxy.upstream, "ctrdonce/killed", "1", images.Image([blob]))
    backend = ctrd.backend()
    backend.start()
    # A previous process got 150000 bytes into containerd's ingest before it died.
    root = ingests.content_root(backend.client)
    assert root is not None
    left = ingests.ContainerdIngests(content_mod.ContainerdContent(backend.client), root, {})
    writer = left.writer(str(blob.digest), total=blob.size)
    writer.write(blob.data[:150_000])
    writer.close()
    assert content_mod.ingest_ref("layer", blob.digest) in active_ingests(ctrd)

    result = await pull_through(backend, tmp_root, f"{fault_proxy.host}/ctrdonce/killed:1")

    gets = fault_proxy.requests_to(f"/blobs/{blob.digest}", "GET")
    assert [g.range for g in gets] == ["bytes=150000-"]
    assert result.bytes_downloaded < blob.size
    assert str(blob.digest) in containerd_blobs(ctrd)
    assert ctrd.snapshots().get(result.chain_id) == "Committed"
    assert active_ingests(ctrd) == []


async def test_a_many_layer_image_lands_whole_with_no_snapshot_left_active(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    layers = [images.random_layer(120_000 + 10_000 * i, files=20, seed=1320 + i)
              for i in range(5)]
    image = images.Image(layers)
    images.push(fault_proxy.upstream, "ctrdonce/many", "1", image)
    backend = ctrd.backend()
    backend.start()
    actives = active_snapshots(ctrd)

    result = await pull_through(backend, tmp_root, f"{fault_proxy.host}/ctrdonce/many:1")

    chain = digests.chain_ids([layer.diff_id for layer in layers])
    snapshots = ctrd.snapshots()
    assert [snapshots.get(str(c)) for c in chain] == ["Committed"] * len(layers)
    assert result.chain_id == str(chain[-1])
    assert active_snapshots(ctrd) == actives
    assert {str(layer.digest) for layer in layers} <= containerd_blobs(ctrd)
    assert not {str(layer.digest) for layer in layers} & stored_blobs(tmp_root)
