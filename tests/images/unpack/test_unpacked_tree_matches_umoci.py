"""Unpack images into snapshots, mount the chain, and compare with ``umoci unpack``."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from fixtures import layers as L

from agent.images import snapshots
from agent.images.unpack import unpacker

from . import trees
from .conftest import MountView

pytestmark = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci is missing")

CAP = bytes([1, 0, 0, 2, 0x20, 0, 0, 0] + [0] * 12)  # cap_net_bind_service, effective
BIG = L.random_bytes(300_000, seed=1)


def hard_link(name: str) -> L.Entry:
    """A hardlink to ``hard/a`` whose header carries the target's mode, as tar writers
    (GNU tar, Go) write it: containerd applies a link header's metadata to the shared
    inode, umoci does not, so only such headers have one answer."""
    return L.Entry(name.encode(), L.HARDLINK, mode=0o600, linkname=b"hard/a")


def rich_image_tars() -> list[bytes]:
    """Several layers exercising every entry type and every kind of deletion."""
    base = (
        L.Layer()
        .dir("etc")
        .file("etc/os-release", b"ID=test\n")
        .file("etc/shadow", b"root:*:1::::::\n", mode=0o640, gid=42)
        .dir("usr", mode=0o755)
        .dir("usr/bin")
        .file("usr/bin/sh", b"#!sh" * 100, mode=0o755)
        .file(
            "usr/bin/ping", b"ping", mode=0o4755, uid=0, gid=0, xattrs={"security.capability": CAP}
        )
        .file("usr/bin/newgrp", b"ng", mode=0o2755, uid=1000, gid=1000)
        .symlink("bin", "usr/bin")
        .symlink("sh-abs", "/usr/bin/sh")
        .symlink("chain1", "chain2")
        .symlink("chain2", "chain3")
        .symlink("chain3", "etc/os-release")
        .symlink("dangling", "does/not/exist")
        .dir("tmp", mode=0o1777)
        .dir("dev")
        .char("dev/null", 1, 3)
        .char("dev/tty", 5, 0, mode=0o620, uid=0)
        .block("dev/loop0", 7, 0)
        .fifo("dev/initctl", mode=0o600)
        .dir("var")
        .dir("var/cache")
        .dir("var/cache/apt")
        .file("var/cache/apt/pkgcache.bin", BIG)
        .file("var/cache/keep", b"keep")
        .dir("var/lib", xattrs={"user.note": b"lib"})
        .file(
            "var/lib/data", b"data", uid=33, gid=33, xattrs={"user.a": b"1", "user.b": b"\x00\xff"}
        )
        .dir("opt")
        .file("opt/old1", b"old")
        .dir("opt/sub")
        .file("opt/sub/old2", b"old")
        .file("becomes-dir", b"file first")
        .dir("becomes-file")
        .file("becomes-file/child", b"child")
        .file("hard/a", b"shared inode", mode=0o600)
        .add(hard_link("hard/b"))
        .add(hard_link("hard/c"))
        .file("deep/" + "d" * 120 + "/" + "f" * 120, b"long name")
        .file("unicode/h\u00e9llo-\u2603", b"snow")
    )
    empty = L.Layer()
    change = (
        L.Layer()
        .whiteout("var/cache/apt")
        .whiteout("etc/shadow")
        .opaque("opt")
        .dir("opt")
        .file("opt/new", b"new")
        .whiteout("becomes-dir")
        .dir("becomes-dir")
        .file("becomes-dir/inside", b"now a dir")
        .whiteout("becomes-file")
        .file("becomes-file", b"now a file")
        .file("etc/os-release", b"ID=changed\n", mode=0o600)
        .add(hard_link("hard/d"))  # a hardlink to a file from a lower layer: re-added
        .file("hard/a", b"shared inode", mode=0o600)
    )
    # hard/d links to hard/a, which this layer must carry itself; reorder so the target comes first.
    change.entries = [e for e in change.entries if e.name != b"hard/d"] + [
        hard_link("hard/d")
    ]
    back = (
        L.Layer()
        .whiteout("becomes-dir")
        .file("becomes-dir", b"a file again")
        .file("usr/bin/sh", b"#!new-sh", mode=0o755)
        .symlink("bin", "usr/local/bin")  # a symlink replaced by another
        .dir("var/cache/apt")  # re-created after its whiteout, empty
        .file("tmp/.wh..wh..opq", b"", mode=0o600)  # opaque on a sticky dir
        .file("tmp/fresh", b"f")
    )
    return [base.tar(), empty.tar(), change.tar(), back.tar()]


def umoci_tree(img: L.Image, tmp_path: Path) -> dict:
    layout = L.write_oci_layout(img, tmp_path / "layout")
    bundle = tmp_path / "bundle"
    subprocess.run(
        ["umoci", "unpack", "--image", f"{layout}:latest", str(bundle)],
        check=True,
        capture_output=True,
    )
    return trees.describe(bundle / "rootfs")


def unpack(sn: snapshots.Snapshotter, img: L.Image, **kwargs: object) -> str:
    u = unpacker.Unpacker(L.MemoryProvider(img.blobs), sn, **kwargs)  # type: ignore[arg-type]
    return u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_overlay_chain_mounts_the_same_tree_as_umoci(
    compression: str,
    overlay_sn: snapshots.OverlaySnapshotter,
    mount_view: MountView,
    tmp_path: Path,
) -> None:
    tars = rich_image_tars()
    img = L.image(tars, compression)
    top = unpack(overlay_sn, img, concurrency=3)
    ours = trees.describe(mount_view(overlay_sn, top))
    # umoci 0.4 reads no zstd layers: it unpacks the same tars gzip-compressed.
    theirs = umoci_tree(img if compression != "zstd" else L.image(tars, "gzip"), tmp_path)
    assert trees.diff(ours, theirs) == []


def test_naive_snapshot_holds_the_same_tree_as_umoci(
    naive_sn: snapshots.NaiveSnapshotter, mount_view: MountView, tmp_path: Path
) -> None:
    img = L.image(rich_image_tars(), "gzip")
    top = unpack(naive_sn, img)
    ours = trees.describe(mount_view(naive_sn, top))
    theirs = umoci_tree(img, tmp_path)
    assert trees.diff(ours, theirs) == []


def test_sequential_and_concurrent_overlay_unpacks_give_the_same_tree(
    tmp_path: Path, mount_view: MountView
) -> None:
    img = L.image(rich_image_tars(), "gzip")
    results = []
    for concurrency in (1, 4):
        sn = snapshots.OverlaySnapshotter(tmp_path / f"sn-{concurrency}")
        results.append(trees.describe(mount_view(sn, unpack(sn, img, concurrency=concurrency))))
    assert trees.diff(*results) == []


def test_gnu_long_names_unpack_like_pax_long_names(
    overlay_sn: snapshots.OverlaySnapshotter, mount_view: MountView, tmp_path: Path
) -> None:
    layer = L.Layer(long_names="gnu").dir("x" * 150).file("x" * 150 + "/" + "y" * 150, b"gnu")
    layer.symlink("link", "t" * 200)
    img = L.image([layer.tar()])
    ours = trees.describe(mount_view(overlay_sn, unpack(overlay_sn, img)))
    assert trees.diff(ours, umoci_tree(img, tmp_path)) == []
