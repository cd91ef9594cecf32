"""containerd's snapshotter, driven through :class:`ContainerdSnapshotter`, passes the same
conformance checks as the local overlayfs and naive snapshotters (each check in a namespace
of its own on the session's real containerd, so it starts from an empty snapshotter, and
under a lease, as an import works: containerd's GC collects unreferenced snapshots)."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.images import containerd
from tests.images.containerd.conftest import Containerd
from tests.images.snapshots import suite


@pytest.mark.parametrize("name", sorted(suite.CHECKS))
def test_containerd_snapshotter_conforms(name: str, ctrd: Containerd, tmp_path: Path) -> None:
    client = containerd.Client(ctrd.address, f"conformance-{name.replace('_', '-')}")
    leases = containerd.Leases(client)
    try:
        with leases.held() as lease:
            sn = containerd.ContainerdSnapshotter(client, "overlayfs").with_lease(lease)
            suite.CHECKS[name](sn, tmp_path)
    finally:
        client.close()
