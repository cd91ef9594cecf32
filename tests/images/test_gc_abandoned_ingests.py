"""Garbage collection bounds partial downloads: the ingest of a pull that was cancelled (a
spec edit, a delete, a stall) goes once it sat unwritten for the expiry; the ingest of a
pull still downloading stays, however old, and so does one just abandoned (it may be
resumed by the next attempt)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import descriptors, gc, service
from agent.images.backends import local as local_backend
from agent.images.registry import client, hosts
from tests.images.pulling import FAST_RETRY, ingests

AMD64 = descriptors.Platform("linux", "amd64")


def _age(ingest: Path, seconds: float) -> None:
    """Make the ingest look unwritten for ``seconds`` (its data's mtime is its last write)."""
    then = time.time() - seconds
    os.utime(ingest / "data", (then, then))


async def _stalled(root: Path, digest: str, size: int) -> None:
    """Wait until the ingest of ``digest`` holds ``size`` bytes (where the proxy stalls)."""
    def written() -> int:
        for ingest in ingests(root):
            try:
                if (ingest / "ref").read_text() == digest:
                    return (ingest / "data").stat().st_size
            except FileNotFoundError:  # an ingest being set up: its ref is not written yet
                continue
        return 0

    while written() < size:
        await asyncio.sleep(0.02)


async def test_gc_removes_a_cancelled_pulls_partial_download_but_not_an_active_ones(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    cancelled = images.Image([images.random_layer(300_000, seed=801)])
    active = images.Image([images.random_layer(300_000, seed=802)])
    images.push(fault_proxy.upstream, "ingest/cancelled", "1", cancelled)
    images.push(fault_proxy.upstream, "ingest/active", "1", active)
    for image in (cancelled, active):
        fault_proxy.stall(f"/blobs/{image.layers[0].digest}", after=100_000)

    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(
                tmp_root, rc, backend=local_backend.open_store(tmp_root, "")
            )
        try:
            doomed = asyncio.create_task(
                svc.pull(f"{fault_proxy.host}/ingest/cancelled:1", platform=AMD64)
            )
            running = asyncio.create_task(
                svc.pull(f"{fault_proxy.host}/ingest/active:1", platform=AMD64)
            )
            await _stalled(tmp_root, cancelled.layers[0].digest, 100_000)
            await _stalled(tmp_root, active.layers[0].digest, 100_000)
            doomed.cancel()  # as the agent does when the entry is edited or deleted
            await asyncio.gather(doomed, return_exceptions=True)
            assert len(ingests(tmp_root)) == 2

            fresh = await svc.gc()  # just abandoned: a retry may resume it
            for ingest in ingests(tmp_root):
                _age(ingest, gc.INGEST_EXPIRY + 60)
            collected = await svc.gc()

            assert fresh.ingests == []
            assert collected.ingests == [cancelled.layers[0].digest]
            assert collected.bytes_freed >= 100_000
            [kept] = ingests(tmp_root)
            assert (kept / "ref").read_text() == active.layers[0].digest

            fault_proxy.clear()  # the stall ends: the active pull resumes its ingest
            result = await running
        finally:
            svc.close()

    assert result.bytes_downloaded == active.layers[0].size + active.config.size
    assert ingests(tmp_root) == []
