"""Applying one layer tar: entry types, metadata, replacement, whiteouts, diff ID."""

from __future__ import annotations

import io
import os
import stat
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import pytest
from fixtures import layers as L

from agent.images import errors
from agent.images.unpack import archive, compression, whiteouts


def apply(tar: bytes, root: Path, **kwargs: object) -> archive.ApplyResult:
    root.mkdir(exist_ok=True)
    return archive.apply(io.BytesIO(tar), root, **kwargs)  # type: ignore[arg-type]


def test_the_diff_id_covers_every_byte_including_padding_after_the_end(tmp_path: Path) -> None:
    tar = L.Layer().file("a", b"1").tar() + bytes(10240)
    result = apply(tar, tmp_path / "r")
    assert result.diff_id == L.sha256(tar)
    assert result.size == len(tar)
    assert result.entries == 1


def test_a_stream_without_an_end_of_archive_marker_is_accepted(tmp_path: Path) -> None:
    tar = L.Layer().file("a", b"1").tar(end=False)
    assert apply(tar, tmp_path / "r").diff_id == L.sha256(tar)
    assert (tmp_path / "r/a").read_bytes() == b"1"


def test_files_get_owner_mode_and_mtime_with_setuid_surviving_the_chown(tmp_path: Path) -> None:
    layer = (
        L.Layer()
        .file("suid", b"x", mode=0o4755, uid=1234, gid=5678)
        .file("sgid", b"x", mode=0o2711, uid=1, gid=2)
        .dir("sticky", mode=0o1777)
        .file("big-uid", b"", uid=3_000_000, gid=4_000_000)  # base-256 numbers
        .add(L.Entry(b"precise", pax={b"mtime": b"1700000000.123456789"}))
    )
    apply(layer.tar(), tmp_path / "r")
    st = os.stat(tmp_path / "r/suid")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o4755, 1234, 5678)
    assert stat.S_IMODE(os.stat(tmp_path / "r/sgid").st_mode) == 0o2711
    assert stat.S_IMODE(os.stat(tmp_path / "r/sticky").st_mode) == 0o1777
    assert os.stat(tmp_path / "r/big-uid").st_uid == 3_000_000
    assert os.stat(tmp_path / "r/precise").st_mtime_ns == 1_700_000_000_123_456_789
    assert st.st_mtime == L.MTIME


def test_directory_mtimes_are_set_after_their_children(tmp_path: Path) -> None:
    layer = L.Layer().dir("d", mtime=1000).dir("d/e", mtime=2000).file("d/e/f", b"", mtime=3000)
    apply(layer.tar(), tmp_path / "r")
    assert os.stat(tmp_path / "r/d").st_mtime == 1000
    assert os.stat(tmp_path / "r/d/e").st_mtime == 2000


def test_symlink_metadata_is_set_on_the_link_not_its_target(tmp_path: Path) -> None:
    layer = L.Layer().file("target", b"t", mtime=5000).symlink("link", "target", uid=7, gid=8)
    apply(layer.tar(), tmp_path / "r")
    lst = os.lstat(tmp_path / "r/link")
    assert (lst.st_uid, lst.st_gid, lst.st_mtime) == (7, 8, L.MTIME)
    st = os.stat(tmp_path / "r/target")
    assert (st.st_uid, st.st_mtime) == (0, 5000)


def test_devices_fifos_and_xattrs_are_created(tmp_path: Path) -> None:
    cap = bytes([1, 0, 0, 2, 0x20, 0, 0, 0] + [0] * 12)
    layer = (
        L.Layer()
        .char("null", 1, 3, mode=0o666)
        .block("sda", 8, 0)
        .fifo("pipe", mode=0o600)
        .file("ping", b"p", mode=0o755, xattrs={"security.capability": cap, "user.x": b"\0\1"})
        .dir("d", xattrs={"user.dir": b"yes"})
    )
    apply(layer.tar(), tmp_path / "r")
    st = os.lstat(tmp_path / "r/null")
    assert stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 1 and os.minor(st.st_rdev) == 3
    assert stat.S_ISBLK(os.lstat(tmp_path / "r/sda").st_mode)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "r/pipe").st_mode)
    assert os.getxattr(tmp_path / "r/ping", "security.capability") == cap
    assert os.getxattr(tmp_path / "r/ping", "user.x") == b"\0\1"
    assert os.getxattr(tmp_path / "r/d", "user.dir") == b"yes"


def test_entries_replace_what_is_there(tmp_path: Path) -> None:
    root = tmp_path / "r"
    apply(
        L.Layer()
        .file("f2d", b"file")
        .dir("d2f")
        .file("d2f/child", b"c")
        .symlink("l2f", "nowhere")
        .dir("merge", mode=0o700)
        .file("merge/old", b"o")
        .tar(),
        root,
    )
    apply(
        L.Layer()
        .dir("f2d")
        .file("d2f", b"now a file")
        .file("l2f", b"now a file")
        .dir("merge", mode=0o755)
        .file("merge/new", b"n")
        .tar(),
        root,
    )
    assert (root / "f2d").is_dir()
    assert (root / "d2f").read_bytes() == b"now a file"
    assert not (root / "l2f").is_symlink()
    assert sorted(os.listdir(root / "merge")) == ["new", "old"]
    assert stat.S_IMODE(os.stat(root / "merge").st_mode) == 0o755


def test_a_directory_repeated_in_a_layer_takes_the_last_owner(tmp_path: Path) -> None:
    """Found by test_fuzz: the second header of an existing directory, owned by root, left
    the first one's owner (its chown was skipped as if the directory were new)."""
    root = tmp_path / "r"
    apply(L.Layer().dir("d/a", uid=1000, gid=1000).dir("d/a", uid=0, gid=0).tar(), root)
    st = os.stat(root / "d" / "a")
    assert (st.st_uid, st.st_gid) == (0, 0)


def test_implicit_parents_are_0755_even_under_a_setgid_directory(tmp_path: Path) -> None:
    """Found by test_fuzz: containerd chmods the parents it creates to exactly 0755; ours
    inherited the setgid bit of a setgid parent from the kernel."""
    root = tmp_path / "r"
    apply(L.Layer().dir("s", mode=0o2750).file("s/a/f", b"x").tar(), root)
    assert stat.S_IMODE(os.stat(root / "s").st_mode) == 0o2750
    assert stat.S_IMODE(os.stat(root / "s" / "a").st_mode) == 0o755


def test_a_new_directory_in_a_copied_up_setgid_parent_takes_its_group(tmp_path: Path) -> None:
    """Found by test_fuzz: containerd copies a lower setgid directory's metadata to the
    implicit parent before creating the next component in it, which the kernel gives the
    parent's group; ours kept root's group."""
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    apply(L.Layer().dir("d", mode=0o2750, uid=1000, gid=1000).tar(), lower)
    result = apply(L.Layer().char("d/a/c", 1, 3).tar(), upper)
    archive.copy_up_parents(upper, [str(lower)], result.implicit_dirs)
    d, a = os.stat(upper / "d"), os.stat(upper / "d" / "a")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid) == (0o2750, 1000, 1000)
    assert (stat.S_IMODE(a.st_mode), a.st_uid, a.st_gid) == (0o755, 0, 1000)


def test_hardlinks_share_an_inode_and_need_a_target_in_the_root(tmp_path: Path) -> None:
    apply(L.Layer().file("a", b"x").hardlink("b", "a").hardlink("c", "./a").tar(), tmp_path / "r")
    inodes = {os.stat(tmp_path / "r" / n).st_ino for n in "abc"}
    assert len(inodes) == 1
    with pytest.raises(errors.UnsafeLayer, match="not in this layer"):
        apply(L.Layer().hardlink("b", "missing").tar(), tmp_path / "r2")


def test_pax_global_headers_are_skipped_as_containerd_skips_them(tmp_path: Path) -> None:
    glob = L.pax_records({b"uid": b"99", b"path": b"elsewhere"})
    tar = L.header(b"pax_global", type=b"g", size=len(glob)) + glob + bytes(-len(glob) % 512)
    tar += L.Layer().dir("./", mode=0o711).file("f", b"1").tar()
    apply(tar, tmp_path / "r")
    assert os.stat(tmp_path / "r/f").st_uid == 0  # the global uid did not apply
    assert sorted(os.listdir(tmp_path / "r")) == ["f"]
    assert stat.S_IMODE(os.stat(tmp_path / "r").st_mode) == 0o755  # "./" is ignored too


def test_remove_whiteouts_delete_targets_and_opaque_keeps_the_layers_own_children(
    tmp_path: Path,
) -> None:
    root = tmp_path / "r"
    apply(
        L.Layer().file("gone", b"").file("d/x", b"").file("d/y", b"").file("o/old", b"").tar(), root
    )
    apply(
        L.Layer().whiteout("gone").whiteout("d/x").file("o/new", b"n").opaque("o").tar(),
        root,
        whiteouts=whiteouts.REMOVE,
    )
    assert sorted(os.listdir(root)) == ["d", "o"]
    assert os.listdir(root / "d") == ["y"]
    assert os.listdir(root / "o") == ["new"]


def test_overlay_whiteouts_are_char_devices_and_opaque_xattrs(tmp_path: Path) -> None:
    root = tmp_path / "r"
    apply(L.Layer().whiteout("gone").dir("o").opaque("o").tar(), root, whiteouts=whiteouts.OVERLAY)
    st = os.lstat(root / "gone")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(root / "o", "trusted.overlay.opaque") == b"y"
    assert not (root / "o/.wh..wh..opq").exists()


def test_aufs_metadata_entries_are_skipped(tmp_path: Path) -> None:
    apply(L.Layer().file(".wh..wh.aufs", b"").file("d/.wh..wh.plnk", b"").tar(), tmp_path / "r")
    assert os.listdir(tmp_path / "r") == ["d"]
    assert os.listdir(tmp_path / "r/d") == []


def test_progress_is_reported_and_cancel_stops_between_entries(tmp_path: Path) -> None:
    tar = L.Layer().file("a", L.random_bytes(3 << 20)).file("b", b"").tar()
    seen: list[int] = []
    apply(tar, tmp_path / "r", on_progress=seen.append)
    assert seen[-1] == len(tar) and seen == sorted(seen) and len(seen) >= 3
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(CancelledError):
        apply(tar, tmp_path / "r2", cancel=cancel)


@pytest.mark.parametrize("kind", ["gzip", "zstd", "none"])
def test_compression_is_detected_by_magic_bytes(kind: str) -> None:
    tar = L.Layer().file("a", b"1").tar()
    stream = compression.open_layer(io.BytesIO(L.compress(tar, kind)), L.MEDIA_TYPES[kind])
    assert stream.compression == kind
    data = b""
    while chunk := stream.read(100):
        data += chunk
    assert data == tar and stream.uncompressed_bytes == len(tar)


def test_gzip_with_zero_padding_or_several_members_is_accepted() -> None:
    tar = L.Layer().file("a", b"1").tar()
    for blob in (L.compress(tar) + bytes(100), L.compress(tar[:1024]) + L.compress(tar[1024:])):
        stream = compression.open_layer(io.BytesIO(blob))
        assert stream.read(1 << 20) + stream.read(1 << 20) == tar


def test_a_media_type_that_is_no_layer_is_refused() -> None:
    with pytest.raises(errors.UnsupportedMediaType):
        compression.open_layer(io.BytesIO(b""), "application/vnd.oci.image.config.v1+json")
