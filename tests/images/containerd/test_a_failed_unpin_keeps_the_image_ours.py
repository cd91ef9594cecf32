"""An unpin that containerd does not carry out is never reported as done: the image's record
stays (it is still the prefetcher's, and still pinned), the error says what to do, and
forgetting it again once containerd answers unpins it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy
from fixtures.socketgate import SocketGate

from agent.images import containerd, errors, service
from agent.images.registry import client, hosts
from agent.node import collecting, reconciling

from .conftest import Containerd

pytestmark = pytest.mark.root
T = TypeVar("T")

MANAGED = {"prefetcher.dev/managed-by": "node-agent"}


async def eventually(attempt: Callable[[], Awaitable[T]], seconds: float = 30) -> T:
    """``attempt()`` until it does not raise Unavailable (gRPC waits out its reconnect
    backoff before it tries a socket that went away again), as a later collection would."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await attempt()
        except errors.Unavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


def labels_of(ctrd: Containerd, name: str) -> str:
    rows = ctrd.ctr("images", "ls").stdout.splitlines()
    return next(row for row in rows if row.startswith(name + " "))


async def test_an_unpin_containerd_does_not_answer_fails_and_is_retried(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path, tmp_path: Path
) -> None:
    image = images.Image([images.random_layer(20_000, files=2, seed=151)])
    images.push(fault_proxy.url, "ctrd/unpin", "1", image)
    reference = f"{fault_proxy.host}/ctrd/unpin:1"
    gate = SocketGate(tmp_path / "gate.sock", ctrd.address)
    backend = containerd.ContainerdBackend(str(gate.path))
    backend.client.timeout = 5.0
    backend.start()
    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        svc = service.ImageService(tmp_root, rc, backend=backend)
        try:
            await svc.pull(reference, pinned=True)
            gate.close()
            with pytest.raises(errors.Unavailable) as caught:
                await svc.forget(reference)
            assert "could not unpin" in str(caught.value)
            assert f"ctr -n k8s.io images label {reference} io.cri-containerd.pinned=" in str(
                caught.value
            )
            # Nothing half-done: still the prefetcher's, still pinned.
            assert [i.record.name for i in svc.list_images()] == [reference]
            assert "io.cri-containerd.pinned=pinned" in labels_of(ctrd, reference)

            gate.open()
            await eventually(lambda: svc.forget(reference))
            assert svc.list_images() == []
            assert "io.cri-containerd.pinned" not in labels_of(ctrd, reference)
        finally:
            svc.close()
            gate.close()


async def test_the_agents_collector_keeps_what_it_could_not_unpin_and_tries_again(
    ctrd: Containerd, fault_proxy: FaultProxy, tmp_root: Path, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    image = images.Image([images.random_layer(20_000, files=2, seed=152)])
    images.push(fault_proxy.url, "ctrd/unpin-agent", "1", image)
    reference = f"{fault_proxy.host}/ctrd/unpin-agent:1"
    gate = SocketGate(tmp_path / "gate.sock", ctrd.address)
    backend = containerd.ContainerdBackend(str(gate.path))
    backend.client.timeout = 5.0
    backend.start()
    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        svc = service.ImageService(tmp_root, rc, backend=backend)
        try:
            await svc.pull(reference, pinned=True, labels=MANAGED)
            collector = collecting.Collector(svc, reconciling.Budget())
            gate.close()
            with caplog.at_level(logging.WARNING, "agent.node"):
                removed = await collector.collect(wanted=[])
            assert removed == []
            assert [i.record.name for i in svc.list_images()] == [reference]
            assert any("could not release" in r.getMessage() and "retried" in r.getMessage()
                       for r in caplog.records)

            gate.open()

            async def collected() -> list[str]:
                removed = await collector.collect(wanted=[])
                if not removed:
                    raise errors.Unavailable("not yet")
                return removed

            assert await eventually(collected) == [reference]
            assert "io.cri-containerd.pinned" not in labels_of(ctrd, reference)
        finally:
            svc.close()
            gate.close()
