"""containerd fixes a snapshot's parent when it is prepared; the snapshotter still lets the
unpacker apply several layers at once: a layer applied into a snapshot prepared without a
parent is moved (renamed, not copied) onto its parent when it is committed."""

from __future__ import annotations

import os
from pathlib import Path

from agent.images import containerd, snapshots
from tests.images.containerd.conftest import Containerd


def upper(mounts: list[snapshots.Mount]) -> Path:
    m = mounts[0]
    return Path(m.source if m.type == "bind" else m.option("upperdir") or "")


def test_a_layer_prepared_without_parent_is_committed_onto_its_parent(
    ctrd: Containerd, tmp_path: Path
) -> None:
    client = containerd.Client(ctrd.address, "side-by-side")
    leases = containerd.Leases(client)
    try:
        with leases.held() as lease:
            sn = containerd.ContainerdSnapshotter(client, "overlayfs").with_lease(lease)
            assert snapshots.CAP_REBASE in sn.capabilities
            (upper(sn.prepare("extract-a sha256:" + "a" * 64)) / "bottom").write_text("A")
            # The second layer is applied before the first is committed.
            staged = upper(sn.prepare("extract-b sha256:" + "b" * 64))
            (staged / "top").write_text("B")
            inode = os.stat(staged / "top").st_ino
            sn.commit("A", "extract-a sha256:" + "a" * 64)
            sn.commit("B", "extract-b sha256:" + "b" * 64, parent="A")

            assert sn.stat("B").parent == "A"
            assert [i.name for i in sn.walk() if i.kind is snapshots.Kind.ACTIVE] == []
            assert sn.stat("B").labels["containerd.io/snapshot.ref"] == "B"
            target = tmp_path / "mnt"
            target.mkdir()
            snapshots.mount_all(sn.view("v", "B"), target)
            try:
                assert (target / "bottom").read_text() == "A"
                assert (target / "top").read_text() == "B"
                assert os.stat(target / "top").st_ino == inode  # moved, not copied
            finally:
                snapshots.unmount(target)
                sn.remove("v")
    finally:
        client.close()
