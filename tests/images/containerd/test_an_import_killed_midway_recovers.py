"""kill -9 an import at several points: containerd is left with no committed partial
snapshot and no image record; a rerun cleans up after the dead process and completes."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import layers as L

from agent.images import containerd, digests, errors, snapshots
from agent.images.containerd import leases
from tests.images.unpack import trees
from tests.images.unpack.test_unpacked_tree_matches_umoci import umoci_tree

from .conftest import Containerd
from .importing_process import image_tars

pytestmark = pytest.mark.root

SCRIPT = Path(__file__).with_name("importing_process.py")


def run(ctrd: Containerd, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), ctrd.address, name, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def umoci(tmp_path_factory: pytest.TempPathFactory) -> dict | None:
    """The tree ``umoci unpack`` makes of the image (``None`` without umoci)."""
    if shutil.which("umoci") is None:
        return None
    return umoci_tree(L.image(image_tars(), "gzip"), tmp_path_factory.mktemp("umoci"))


@pytest.fixture(scope="module")
def chain() -> list[str]:
    return [str(c) for c in digests.chain_ids([digests.of(t) for t in image_tars()])]


@pytest.mark.parametrize(
    ("kill_at", "committed"),
    [("started:0", 0), ("progress:0:3", 0), ("started:1", 1), ("progress:2:2", 2)],
)
def test_a_killed_import_leaves_no_partial_snapshot_and_a_rerun_completes(
    kill_at: str,
    committed: int,
    ctrd: Containerd,
    chain: list[str],
    umoci: dict | None,
    tmp_path: Path,
) -> None:
    # Each case starts from nothing: drop what earlier cases committed (and GC it).
    for key in reversed(chain):
        try:
            ctrd.backend().snapshotter.remove(key)
        except errors.NotFound:
            pass
    name = f"killed.test/app:{kill_at.replace(':', '-')}"

    killed = run(ctrd, name, "--kill-at", kill_at)

    assert killed.returncode == -signal.SIGKILL, killed.stderr
    backend = ctrd.backend()
    try:
        listed = ctrd.snapshots()
        # Layers are applied concurrently and committed in chain order: what is committed is
        # a bottom part of the chain, never more than the layers before the kill point.
        got = [c for c in chain if listed.get(c) == "Committed"]
        assert got == chain[: len(got)] and len(got) <= committed
        left = [i for i in backend.snapshotter.walk() if i.kind is snapshots.Kind.ACTIVE]
        assert left and all(snapshots.LABEL_OWNER in i.labels for i in left)
        assert any(leases.LABEL_OWNER in lease.labels for lease in backend.leases.list())
        with pytest.raises(errors.NotFound):
            backend.images.get(name)

        again = run(ctrd, name)

        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == chain[-1]
        listed = ctrd.snapshots()
        assert all(listed.get(c) == "Committed" for c in chain)
        assert not [i for i in backend.snapshotter.walk() if i.kind is snapshots.Kind.ACTIVE]
        assert backend.leases.list() == []
        assert backend.images.get(name).labels["io.cri-containerd.image"] == "managed"
        if umoci is not None:
            assert trees.diff(mounted_tree(backend, chain[-1], tmp_path), umoci) == []
    finally:
        backend.close()


def mounted_tree(backend: containerd.ContainerdBackend, top: str, tmp_path: Path) -> dict:
    target = tmp_path / "mnt"
    target.mkdir()
    key = f"test-view-{tmp_path.name}"
    mounts = backend.snapshotter.view(key, top, {"containerd.io/gc.root": "test"})
    snapshots.mount_all(mounts, target)
    try:
        return trees.describe(target)
    finally:
        snapshots.unmount(target)
        backend.snapshotter.remove(key)
