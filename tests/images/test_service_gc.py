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


def test_leftovers_are_swept_only_when_no_other_process_has_the_store_open(
    tmp_root: Path,
) -> None:
    import subprocess
    import sys

    from agent.images.registry import client as registry_client

    def open_and_close() -> None:
        svc = service.ImageService(
            tmp_root, registry_client.RegistryClient(hosts.RegistryHosts(None))
        )
        svc.close()

    open_and_close()
    starting = tmp_root / "content/ingest/starting"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import time; from agent.images import service;"
         " from agent.images.registry import client, hosts;"
         f" s = service.ImageService({str(tmp_root)!r},"
         " client.RegistryClient(hosts.RegistryHosts()));"
         " print('open', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        # What the holder's writer looks like between creating its ingest and its data.
        starting.mkdir(parents=True)
        (starting / "ref").write_text("sha256:" + "0" * 64)
        open_and_close()
        assert starting.exists()  # the other process may be about to write it
    finally:
        holder.kill()
        holder.wait()
    open_and_close()
    assert not starting.exists()  # nobody has the store open: a true leftover
