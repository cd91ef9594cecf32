"""Layers apply as containerd's ``archive.Apply`` applies them (and, for two OCI whiteout
cases it gets wrong on overlayfs, as the OCI layer spec says).

containerd's behaviour named here is from containerd 1.6's ``archive/tar.go`` (``applyNaive``,
``createTarFile``, ``hardlinkRootPath``) and ``tar_opts_linux.go`` (``OverlayConvertWhiteout``).
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
from pathlib import Path

import pytest
from fixtures import layers as L

from agent.images import errors, snapshots
from agent.images.unpack import archive, tar, unpacker, whiteouts

from . import trees
from .conftest import MountView


def apply(data: bytes, root: Path, **kwargs: object) -> archive.ApplyResult:
    root.mkdir(mode=0o755, exist_ok=True)
    return archive.apply(io.BytesIO(data), root, **kwargs)  # type: ignore[arg-type]


def gnu_tar(src: Path, *args: str) -> bytes:
    """``tar -C src <args> .`` by GNU tar, as image build scripts run it."""
    return subprocess.run(
        ["tar", "-C", str(src), "--numeric-owner", *args, "-cf", "-", "."],
        check=True,
        capture_output=True,
    ).stdout


def test_a_tar_of_dot_does_not_change_the_containers_root(tmp_path: Path) -> None:
    """``tar -C dir .`` writes a ``./`` entry with dir's mode and owner (0700 for a
    private build dir); containerd ignores entries naming the root."""
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    (src / "etc/hostname").write_text("box\n")
    os.chmod(src, 0o700)
    os.chown(src, 1234, 1234)
    root = tmp_path / "root"
    apply(gnu_tar(src), root)
    st = os.stat(root)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o755, 0, 0)
    assert (root / "etc/hostname").read_text() == "box\n"


@pytest.mark.parametrize("target", ["/a/file", "../a/file", "/s/file", "./a/../a/file"])
def test_hardlink_targets_resolve_inside_the_root(tmp_path: Path, target: str) -> None:
    layer = L.Layer().file("a/file", b"data").symlink("s", "/a").hardlink("h", target)
    root = tmp_path / "root"
    apply(layer.tar(), root)
    assert os.stat(root / "h").st_ino == os.stat(root / "a/file").st_ino


def test_a_hardlink_replacing_the_directory_of_its_target_is_refused(tmp_path: Path) -> None:
    """containerd removes ``a`` (and ``a/a`` with it) before linking ``a`` to ``a/a``, which
    then fails: a layer error, not an internal one (it was EBADF here)."""
    layer = L.Layer().file("a/a", b"x").add(L.Entry(b"a", L.HARDLINK, linkname=b"a/a"))
    with pytest.raises(errors.UnsafeLayer, match="not in this layer's root"):
        apply(layer.tar(), tmp_path / "root")


def test_a_hardlink_to_a_symlink_links_the_symlink_itself(tmp_path: Path) -> None:
    layer = L.Layer().file("a/file", b"data").symlink("a/s", "file").hardlink("h", "/a/s")
    root = tmp_path / "root"
    apply(layer.tar(), root)
    assert os.lstat(root / "h").st_ino == os.lstat(root / "a/s").st_ino
    assert os.readlink(root / "h") == "file"


def test_a_hardlink_header_sets_the_owner_mode_and_mtime_of_the_shared_inode(
    tmp_path: Path,
) -> None:
    """containerd's createTarFile goes on after the link: Lchown, lchmod and chtimes."""
    link = L.Entry(b"b", L.HARDLINK, mode=0o4750, uid=5, gid=6, mtime=1, linkname=b"a")
    layer = L.Layer().file("a", b"shared", mode=0o755, uid=3, gid=3).add(link)
    root = tmp_path / "root"
    apply(layer.tar(), root)
    st = os.stat(root / "a")
    assert (st.st_nlink, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime) == (
        2, 0o4750, 5, 6, 1
    )


def test_a_directory_replaced_later_in_its_layer_leaves_no_mtime_behind(tmp_path: Path) -> None:
    """Beyond containerd, whose last pass sets each directory header's mtime on whatever
    its name resolves to then: the file that replaced the directory would get the
    directory's mtime, and a dangling symlink that replaced it would fail the layer."""
    root = tmp_path / "root"
    apply(L.Layer().dir("d", mtime=1000).file("d", b"x", mtime=2000).tar(), root)
    assert os.stat(root / "d").st_mtime == 2000
    other = tmp_path / "other"
    apply(L.Layer().dir("e", mtime=1000).dir("e/sub").symlink("e", "nowhere").tar(), other)
    assert os.readlink(other / "e") == "nowhere"


def test_device_numbers_are_cut_to_32_bits_as_containerd_cuts_them(tmp_path: Path) -> None:
    block = bytearray(L.header(b"c", type=L.CHAR, devmajor=1, devminor=3))
    block[329:337] = b"\x80\0\0\x01\0\0\0\x01"  # base-256 major 2**32 + 1
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    root = tmp_path / "root"
    apply(bytes(block) + bytes(1024), root)
    rdev = os.lstat(root / "c").st_rdev
    assert (os.major(rdev), os.minor(rdev)) == (1, 3)


def sparse_source(tmp_path: Path) -> tuple[Path, bytes]:
    src = tmp_path / "src"
    src.mkdir()
    content = bytearray(8 << 20)
    content[1 << 20 : (1 << 20) + 5] = b"hello"
    content[-3:] = b"end"
    with open(src / "sparse", "wb") as f:
        f.truncate(len(content))
        f.seek(1 << 20)
        f.write(b"hello")
        f.seek(len(content) - 3)
        f.write(b"end")
    return src, bytes(content)


@pytest.mark.parametrize("version", ["0.0", "0.1", "1.0"])
def test_gnu_sparse_files_are_applied_with_their_holes_kept(tmp_path: Path, version: str) -> None:
    src, content = sparse_source(tmp_path)
    data = gnu_tar(src, "--sparse", "--format=posix", f"--sparse-version={version}")
    root = tmp_path / "root"
    apply(data, root)
    assert (root / "sparse").read_bytes() == content
    assert os.stat(root / "sparse").st_blocks * 512 < 1 << 20  # holes, not written zeros


def test_old_gnu_sparse_entries_are_refused_as_containerd_refuses_them(tmp_path: Path) -> None:
    """Go reads the ``S`` type; containerd's createTarFile has no case for it."""
    src, _ = sparse_source(tmp_path)
    with pytest.raises(errors.UnsafeLayer, match="type b'S'.*containerd"):
        apply(gnu_tar(src, "--sparse", "--format=gnu"), tmp_path / "root")


def test_a_sparse_map_that_does_not_match_the_data_is_refused(tmp_path: Path) -> None:
    records = {b"GNU.sparse.major": b"0", b"GNU.sparse.minor": b"1", b"GNU.sparse.size": b"100",
               b"GNU.sparse.numblocks": b"1", b"GNU.sparse.map": b"10,20"}  # fmt: skip
    pax = L.pax_records(records)
    data = (L.header(b"x", type=b"x", size=len(pax)) + pax + bytes(-len(pax) % 512)
            + L.header(b"f", size=5) + b"short" + bytes(507) + bytes(1024))  # fmt: skip
    with pytest.raises(errors.UnsafeLayer, match="sparse map does not match"):
        apply(data, tmp_path / "root")


def test_contiguous_files_are_refused_as_containerd_refuses_them(tmp_path: Path) -> None:
    with pytest.raises(errors.UnsafeLayer, match="type b'7'"):
        apply(L.Layer().add(L.Entry(b"c", type=b"7")).tar(), tmp_path / "root")


def test_a_global_header_removes_what_is_at_its_name(tmp_path: Path) -> None:
    """containerd removes the existing path of every entry before creating it, and a
    global header then creates nothing."""
    glob = L.pax_records({b"comment": b"x"})
    data = L.Layer().file("etc/motd", b"hi").tar(end=False)
    data += L.header(b"etc/motd", type=b"g", size=len(glob)) + glob + bytes(-len(glob) % 512)
    root = tmp_path / "root"
    apply(data + bytes(1024), root)
    assert os.listdir(root / "etc") == []


def test_an_overlay_whiteout_over_an_entry_of_its_own_layer_is_refused(tmp_path: Path) -> None:
    """containerd's mknod of the whiteout fails with EEXIST."""
    layer = L.Layer().file("x", b"").whiteout("x")
    with pytest.raises(errors.UnsafeLayer, match="File exists"):
        apply(layer.tar(), tmp_path / "root", whiteouts=whiteouts.OVERLAY)


def test_aufs_metadata_names_are_whiteouts_of_their_tail_as_containerd_writes_them(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    apply(L.Layer().dir(".wh..wh.plnk").tar(), root, whiteouts=whiteouts.OVERLAY)
    assert os.listdir(root) == [".wh.plnk"]
    assert (root / ".wh.plnk").is_char_device()


# -- OCI whiteouts on overlayfs, beyond containerd ------------------------------------

LOWER = (
    L.Layer()
    .dir("etc")
    .file("etc/passwd", b"lower")
    .dir("d")
    .file("d/old", b"old")
    .file("top", b"t")
    .symlink("bin", "usr/bin")
)


def unpack_and_view(
    sn: snapshots.Snapshotter, mount_view: MountView, tars: list[bytes], kind: str
) -> Path:
    img = L.image(tars)
    u = unpacker.Unpacker(L.MemoryProvider(img.blobs), sn)  # type: ignore[arg-type]
    top = u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
    if kind == "overlay":
        return mount_view(sn, top)
    return Path(sn.mounts(top)[0].source)


@pytest.mark.parametrize("kind", ["overlay", "naive"])
def test_an_opaque_marker_at_the_layer_root_hides_every_lower_entry(
    kind: str,
    overlay_sn: snapshots.OverlaySnapshotter,
    naive_sn: snapshots.NaiveSnapshotter,
    mount_view: MountView,
) -> None:
    sn = overlay_sn if kind == "overlay" else naive_sn
    upper = L.Layer().opaque("").dir("etc", mode=0o700).file("etc/hosts", b"h").file("new", b"n")
    upper.entries[0].name = b".wh..wh..opq"
    view = unpack_and_view(sn, mount_view, [LOWER.tar(), upper.tar()], kind)
    assert sorted(os.listdir(view)) == ["etc", "new"]
    assert os.listdir(view / "etc") == ["hosts"]
    assert stat.S_IMODE(os.stat(view / "etc").st_mode) == 0o700


@pytest.mark.parametrize("kind", ["overlay", "naive"])
def test_a_directory_whited_out_and_recreated_in_one_layer_shows_no_lower_content(
    kind: str,
    overlay_sn: snapshots.OverlaySnapshotter,
    naive_sn: snapshots.NaiveSnapshotter,
    mount_view: MountView,
) -> None:
    sn = overlay_sn if kind == "overlay" else naive_sn
    upper = L.Layer().whiteout("d").dir("d").file("d/new", b"n")
    view = unpack_and_view(sn, mount_view, [LOWER.tar(), upper.tar()], kind)
    assert os.listdir(view / "d") == ["new"]
    assert sorted(os.listdir(view)) == ["bin", "d", "etc", "top"]


def test_overlay_and_naive_snapshots_agree_on_a_root_opaque_stack(
    overlay_sn: snapshots.OverlaySnapshotter,
    naive_sn: snapshots.NaiveSnapshotter,
    mount_view: MountView,
) -> None:
    """Three layers, the middle one opaque at its root with an implicit parent."""
    middle = L.Layer().opaque("").file("etc/only", b"o").whiteout("gone")
    middle.entries[0].name = b".wh..wh..opq"
    third = L.Layer().file("etc/third", b"3").file("top", b"again")
    tars = [LOWER.tar(), middle.tar(), third.tar()]
    views = [unpack_and_view(sn, mount_view, tars, k)
             for sn, k in ((overlay_sn, "overlay"), (naive_sn, "naive"))]  # fmt: skip
    assert trees.diff(trees.describe(views[0]), trees.describe(views[1])) == []
    assert sorted(os.listdir(views[0])) == ["etc", "top"]
    assert sorted(os.listdir(views[0] / "etc")) == ["only", "third"]


@pytest.mark.parametrize("fmt", ["--format=gnu", "--format=posix"])
def test_the_reader_expands_gnu_sparse_members_as_go_does(tmp_path: Path, fmt: str) -> None:
    """The reader on its own, for old GNU (``S``) and PAX sparse members alike: the logical
    size, the data fragments, and the bytes with the holes read back as zeros."""
    src, content = sparse_source(tmp_path)
    reader = tar.Reader(io.BytesIO(gnu_tar(src, "--sparse", fmt)))  # type: ignore[arg-type]
    while (h := reader.next()) is not None and h.name != b"./sparse":
        pass
    assert h is not None
    assert h.size == len(content) and h.sparse is not None
    # GNU tar records the data at the filesystem's block granularity.
    assert sum(n for _, n in h.sparse) <= 4 * 4096
    for offset in (1 << 20, len(content) - 1):
        assert any(o <= offset < o + n for o, n in h.sparse)
    fd = os.memfd_create("sparse")
    try:
        reader.write_to(fd, h)
        assert os.pread(fd, len(content) + 1, 0) == content
    finally:
        os.close(fd)
    assert reader.next() is None
