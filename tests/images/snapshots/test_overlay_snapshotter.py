from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import pytest

from agent.images import snapshots
from agent.images.snapshots import directory

from . import suite

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for overlay mounts")


@pytest.mark.parametrize("name", sorted(suite.CHECKS.keys() | suite.STORE_CHECKS.keys()))
def test_overlay_snapshotter_conforms(name: str, tmp_path: Path) -> None:
    sn = snapshots.OverlaySnapshotter(tmp_path / "root")
    try:
        (suite.CHECKS | suite.STORE_CHECKS)[name](sn, tmp_path)
    finally:
        sn.close()


def test_mounts_stack_parents_nearest_first(tmp_path: Path) -> None:
    sn = snapshots.OverlaySnapshotter(tmp_path)
    assert sn.prepare("a") == [
        snapshots.Mount("bind", f"{tmp_path}/snapshots/1/fs", ("rw", "rbind"))
    ]
    sn.commit("A", "a")
    sn.prepare("b", "A")
    sn.commit("B", "b")
    (m,) = sn.prepare("c", "B")
    assert m.type == "overlay"
    assert m.options == (
        f"workdir={tmp_path}/snapshots/3/work",
        f"upperdir={tmp_path}/snapshots/3/fs",
        f"lowerdir={tmp_path}/snapshots/2/fs:{tmp_path}/snapshots/1/fs",
    )
    assert sn.view("one", "A") == [
        snapshots.Mount("bind", f"{tmp_path}/snapshots/1/fs", ("ro", "rbind"))
    ]
    (v,) = sn.view("two", "B")
    assert v == snapshots.Mount(
        "overlay", "overlay", (f"lowerdir={tmp_path}/snapshots/2/fs:{tmp_path}/snapshots/1/fs",)
    )


def test_a_snapshot_prepared_without_parent_can_be_rebased_at_commit(tmp_path: Path) -> None:
    sn = snapshots.OverlaySnapshotter(tmp_path)
    sn.prepare("a")
    sn.commit("A", "a")
    sn.prepare("b")
    sn.commit("B", "b", parent="A")
    assert sn.stat("B").parent == "A"
    assert "lowerdir=" in sn.view("v", "B")[0].options[0]


def test_commit_with_sync_fs_calls_syncfs_before_the_metadata_commit(tmp_path: Path) -> None:
    sn = snapshots.OverlaySnapshotter(tmp_path, sync_fs=True)
    sn.prepare("a")
    calls: list[str] = []
    real_transaction = sn._meta.transaction

    def transaction(*, write: bool = True):  # type: ignore[no-untyped-def]
        if write:
            calls.append("metadata")
        return real_transaction(write=write)

    with (
        mock.patch.object(directory, "syncfs", side_effect=lambda p: calls.append(f"syncfs {p}")),
        mock.patch.object(sn._meta, "transaction", side_effect=transaction),
    ):
        sn.commit("A", "a")
    assert calls == [f"syncfs {tmp_path}/snapshots/1/fs", "metadata"]


def test_commit_without_sync_fs_does_not_call_syncfs(tmp_path: Path) -> None:
    sn = snapshots.OverlaySnapshotter(tmp_path)
    sn.prepare("a")
    with mock.patch.object(directory, "syncfs") as syncfs:
        sn.commit("A", "a")
    syncfs.assert_not_called()


def test_syncfs_flushes_the_filesystem_of_a_path(tmp_path: Path) -> None:
    snapshots.syncfs(tmp_path)
    with pytest.raises(OSError):
        snapshots.syncfs(tmp_path / "missing")


def test_usage_of_an_overlay_layer_counts_only_its_own_changes(tmp_path: Path) -> None:
    sn = snapshots.OverlaySnapshotter(tmp_path)
    (m,) = sn.prepare("a")
    Path(m.source, "big").write_bytes(b"x" * 100_000)
    sn.commit("A", "a")
    (m,) = sn.prepare("b", "A")
    Path(m.option("upperdir") or "", "small").write_bytes(b"s")
    assert sn.usage("b").inodes == 1
    assert sn.usage("b").size < sn.usage("A").size
