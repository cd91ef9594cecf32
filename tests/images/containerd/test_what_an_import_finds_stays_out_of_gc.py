"""What an import finds already in containerd (a committed snapshot, a blob) joins its lease
before it is used, so containerd's GC cannot take it away mid-import: a failed import's
leftovers are unreferenced, and collected as soon as the failed import's lease ends."""

from __future__ import annotations

import io

import pytest

from agent.images import containerd, digests, errors

pytestmark = pytest.mark.root


def test_a_snapshot_an_import_stats_survives_the_gc_of_its_makers_lease(
    backend: containerd.ContainerdBackend,
) -> None:
    name = "test-found-" + digests.of(b"snapshot").hex[:12]
    maker = backend.leases.create()
    made = backend.snapshotter.with_lease(maker)
    made.prepare("test-found-active", "")
    made.commit(name, "test-found-active")

    with backend.leases.held() as lease:
        assert backend.snapshotter.with_lease(lease).stat(name).kind.name == "COMMITTED"
        backend.leases.delete(maker, sync=True)  # a synchronous GC run
        assert backend.snapshotter.stat(name).kind.name == "COMMITTED"
    backend.leases.delete(backend.leases.create(), sync=True)
    with pytest.raises(errors.NotFound):
        backend.snapshotter.stat(name)  # unprotected, the snapshot is collected


def test_a_blob_an_import_finds_survives_the_gc_of_its_makers_lease(
    backend: containerd.ContainerdBackend,
) -> None:
    data = b"a blob no image references"
    digest = digests.of(data)
    maker = backend.leases.create()
    containerd.ContainerdContent(backend.client, lease=maker).write(
        f"test-{digest}", io.BytesIO(data), len(data), digest
    )

    with backend.leases.held() as lease:
        assert containerd.ContainerdContent(backend.client, lease=lease).exists(digest)
        backend.leases.delete(maker, sync=True)
        assert backend.content.exists(digest)
    # Unprotected, the same blob is collected.
    backend.leases.delete(backend.leases.create(), sync=True)
    with pytest.raises(errors.NotFound):
        backend.content.info(digest)
