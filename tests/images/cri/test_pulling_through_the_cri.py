"""The CRI backend against containerd's real CRI endpoint: the runtime pulls with the
prefetch's credentials, and a stalled registry is cancelled by the progress timeout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy
from fixtures.registries import Registry

from agent.images import containerd, cri, errors, service
from agent.images.progress import events
from agent.images.registry import client, hosts
from tests.images.containerd.conftest import Containerd
from tests.images.pulling import keychain_for

pytestmark = pytest.mark.root


@pytest.fixture
def runtime(ctrd: Containerd) -> Iterator[cri.CriBackend]:
    """A CRI client of the test's own, to ask the runtime what kubelet would ask."""
    b = cri.CriBackend(ctrd.address)
    b.check()
    yield b
    b.close()


async def pull_through(
    ctrd: Containerd,
    root: Path,
    reference: str,
    keychain: object = None,
    progress_timeout: float = 30.0,
) -> tuple[service.PullResult, list[events.ProgressEvent]]:
    seen: list[events.ProgressEvent] = []
    backend = cri.CriBackend(ctrd.address)  # the service owns and closes it
    backend.check()
    async with client.RegistryClient(hosts.RegistryHosts(None), keychain) as rc:  # type: ignore[arg-type]
        svc = service.ImageService(
            root, rc, service.ServiceOptions(progress_timeout=progress_timeout), backend=backend
        )
        try:
            return await svc.pull(reference, on_event=seen.append), seen
        finally:
            svc.close()


async def listed_images(ctrd: Containerd, root: Path) -> list[dict[str, object]]:
    """What ``prefetcher images ls --json`` prints for the store (the CRI backend's view)."""
    backend = cri.CriBackend(ctrd.address)
    backend.check()
    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        svc = service.ImageService(root, rc, backend=backend)
        try:
            return [i.to_json() for i in svc.list_images()]
        finally:
            svc.close()


async def test_a_private_image_is_pulled_by_the_runtime_with_the_pull_secrets_credentials(
    ctrd: Containerd, runtime: cri.CriBackend, basic_registry: Registry, tmp_root: Path
) -> None:
    assert basic_registry.auth is not None
    image = images.Image([images.random_layer(80_000, files=3, seed=131)])
    images.push(basic_registry.url, "cri/private", "1", image, auth=basic_registry.auth)
    reference = f"{basic_registry.host}/cri/private:1"
    assert runtime.image_status(reference) is None

    keychain = keychain_for(basic_registry.host, *basic_registry.auth)
    result, seen = await pull_through(ctrd, tmp_root, reference, keychain)

    status = runtime.image_status(reference)
    assert status is not None, "the runtime does not report the image present"
    assert reference in status.repo_tags
    assert status.id == image.config.digest
    # The runtime's image ID is recorded as such; no chain ID: the runtime unpacked the
    # layers into snapshots of its own.
    assert result.image_id == status.id and result.chain_id == ""
    listed = await listed_images(ctrd, tmp_root)
    assert [(i["name"], i["image_id"], i["chain_id"], i["unpacked"]) for i in listed] == [
        (reference, status.id, "", True)
    ]
    # The status says what this mode cannot report, and still reports the phases.
    phases = [(e.phase, e.message) for e in seen if isinstance(e, events.PhaseChanged)]
    assert (events.Phase.UNPACKING, cri.NO_BYTE_PROGRESS) in phases
    assert phases[-1][0] is events.Phase.READY
    # No layer bytes are claimed: only the config, which the service fetched itself.
    assert seen[-1].snapshot.layers_total == 0
    assert seen[-1].snapshot.bytes_total == seen[-1].snapshot.bytes_done == len(image.config.data)
    assert runtime.info.byte_progress is False
    assert runtime.info.runtime == "containerd"


async def test_a_stalled_registry_is_cancelled_by_the_progress_timeout(
    ctrd: Containerd, runtime: cri.CriBackend, fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = images.Image([images.random_layer(200_000, files=2, seed=133)])
    images.push(fault_proxy.url, "cri/stalls", "1", image)
    reference = f"{fault_proxy.host}/cri/stalls:1"
    rule = fault_proxy.stall(f"/blobs/{image.layers[0].digest}", after=1000)
    try:
        with pytest.raises(errors.PullStalled, match="progress timeout") as caught:
            _, seen = await pull_through(ctrd, tmp_root, reference, progress_timeout=2.0)
    finally:
        rule.release()
    assert "CRI PullImage" in str(caught.value)
    assert fault_proxy.requests_to(f"/blobs/{image.layers[0].digest}", "GET")
    assert runtime.image_status(reference) is None


async def test_containerd_1_6_does_not_report_a_pinned_image_as_pinned(
    ctrd: Containerd, runtime: cri.CriBackend, registry: Registry, tmp_root: Path
) -> None:
    """What the agent's start-up warning and ``status.agent.runtime.pinning: false`` say on
    containerd 1.6: an image the containerd backend labels pinned is not pinned for kubelet."""
    image = images.Image([images.random_layer(10_000, files=1, seed=171)])
    images.push(registry.url, "cri/pinned", "1", image)
    reference = f"{registry.host}/cri/pinned:1"
    backend = containerd.ContainerdBackend(ctrd.address)
    backend.start()
    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        svc = service.ImageService(tmp_root, rc, backend=backend)
        try:
            await svc.pull(reference, pinned=True)
            info = svc.backend.info
        finally:
            svc.close()
    assert "io.cri-containerd.pinned=pinned" in ctrd.ctr("images", "ls").stdout
    status = runtime.image_status(reference)
    assert status is not None
    assert info.version.startswith("1.6") and info.pins is False
    assert status.pinned is False  # kubelet's image GC would take it
