"""``ctr run`` starts a container from the prefetched snapshots: nothing is pulled or unpacked."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fixtures import images
from fixtures import layers as L
from fixtures.faultproxy import FaultProxy

from agent.images import containerd

from .conftest import Containerd
from .importing import image_of, prefetch

BUSYBOX = Path("/bin/busybox")

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is missing"),
]


def busybox_image() -> images.Image:
    """One layer: Debian's static busybox and the applet links a shell needs."""
    layer = (
        L.Layer()
        .dir("bin")
        .file("bin/busybox", BUSYBOX.read_bytes(), mode=0o755)
        .symlink("bin/sh", "busybox")
        .symlink("bin/echo", "busybox")
        .symlink("bin/cat", "busybox")
        .dir("etc")
        .file("etc/greeting", b"hello from the prefetched snapshot\n")
        .dir("tmp", mode=0o1777)
    )
    return image_of(
        [layer.tar()],
        config_extra={"config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/sh"]}},
    )


async def test_ctr_run_uses_the_prefetched_snapshot_and_pulls_nothing(
    ctrd: Containerd,
    backend: containerd.ContainerdBackend,
    fault_proxy: FaultProxy,
    tmp_root: Path,
) -> None:
    image = busybox_image()
    images.push(fault_proxy.url, "ctrd/busybox", "1.0", image)
    reference = f"{fault_proxy.host}/ctrd/busybox:1.0"
    await prefetch(backend, tmp_root, reference)
    snapshots_before = {k for k, kind in ctrd.snapshots().items() if kind == "Committed"}
    fault_proxy.clear_requests()

    container = f"prefetch-run-{os.getpid()}"
    echoed = ctrd.ctr("run", "--rm", reference, container, "echo", "prefetched", timeout=120)
    cat = ctrd.ctr("run", "--rm", reference, container, "cat", "/etc/greeting", timeout=120)

    assert echoed.stdout.strip() == "prefetched"
    assert cat.stdout == "hello from the prefetched snapshot\n"
    assert fault_proxy.requests == []
    committed = {k for k, kind in ctrd.snapshots().items() if kind == "Committed"}
    assert committed == snapshots_before, "ctr unpacked layers of its own"
