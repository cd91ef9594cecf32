"""The chain the backend commits in containerd, mounted as containerd mounts it, holds the
same tree as ``umoci unpack`` of the same image."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import layers as L

from agent.images import containerd, snapshots
from tests.images.unpack import trees
from tests.images.unpack.test_unpacked_tree_matches_umoci import rich_image_tars, umoci_tree

from .importing import import_tars

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is missing"),
]


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[tuple[Path, containerd.ContainerdSnapshotter, str]]]:
    done: list[tuple[Path, containerd.ContainerdSnapshotter, str]] = []
    yield done
    for target, sn, key in reversed(done):
        snapshots.unmount(target)
        sn.remove(key)


async def test_the_mounted_containerd_chain_is_the_tree_umoci_unpacks(
    backend: containerd.ContainerdBackend,
    mounted: list[tuple[Path, containerd.ContainerdSnapshotter, str]],
    tmp_path: Path,
) -> None:
    tars = rich_image_tars()
    result = await import_tars(backend, "umoci.test/rich:1", tars)

    target = tmp_path / "mnt"
    target.mkdir()
    key = f"test-view-{tmp_path.name}"
    # An unleased view is garbage to containerd's GC unless it is a root.
    mounts = backend.snapshotter.view(key, result.chain_id, {"containerd.io/gc.root": "test"})
    assert [m.type for m in mounts] == ["overlay"]  # containerd's own mount of the chain
    snapshots.mount_all(mounts, target)
    mounted.append((target, backend.snapshotter, key))

    ours = trees.describe(target)
    theirs = umoci_tree(L.image(tars), tmp_path)
    assert trees.diff(ours, theirs) == []
