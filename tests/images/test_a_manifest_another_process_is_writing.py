"""Two processes pulling into one store (the node agent and ``prefetcher pull``) may fetch the
same manifest at once: the one that finds its ingest held waits for the other, as it does for
a layer, instead of failing with "being written by another writer"."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import descriptors, digests
from agent.images.content import local
from tests.images.pulling import ingests, pull

AMD64 = descriptors.Platform("linux", "amd64")


async def test_a_pull_waits_for_a_manifest_ingest_another_process_holds(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = images.Image([images.layer({"etc/hostname": "shared\n"})])
    images.push(fault_proxy.upstream, "twoproc/app", "1", image)
    manifest = image.manifest.data
    # The other process: its own handle on the store, holding the manifest's ingest.
    other = local.LocalStore(tmp_root / "content").writer(image.digest, total=len(manifest))

    pulling = asyncio.create_task(
        pull(tmp_root, f"{fault_proxy.host}/twoproc/app:1", platform=AMD64)
    )
    while not any(r.done for r in fault_proxy.requests_to("/manifests/", "GET")):
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # the pull reaches the held ingest meanwhile
    assert not pulling.done()
    other.write(manifest)
    other.commit(len(manifest), digests.Digest(image.digest))
    other.close()

    result = await pulling
    assert result.digest == image.digest
    assert ingests(tmp_root) == []
