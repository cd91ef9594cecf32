"""Hostile layers: each is refused (or neutralised) without a byte written outside the root."""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from fixtures import layers as L

from agent.images import errors, snapshots
from agent.images.unpack import archive, compression, unpacker

from . import trees

UP = "../" * 8


def canary_path(tmp_path: Path) -> Path:
    return tmp_path / "canary"


def hostile_layers(canary: Path) -> dict[str, list[bytes]]:
    """Name -> uncompressed tars (bottom first) that must all be refused."""
    abs_canary = str(canary)
    return {
        "dotdot-file": [L.Layer().file(UP + "canary/pwned", b"x").tar()],
        "dotdot-inside-name": [L.Layer().dir("a").file("a/../../" + UP + "canary/pwned").tar()],
        "dotdot-dir": [L.Layer().dir(UP + "canary/newdir").tar()],
        "absolute-file": [L.Layer().file(abs_canary + "/pwned", b"x").tar()],
        "absolute-dir": [L.Layer().dir("/etc").tar()],
        "dotdot-in-pax-path": [
            L.Layer().add(L.Entry(b"innocent", pax={b"path": (UP + "canary/pwned").encode()})).tar()
        ],
        "symlink-escape-absolute": [
            L.Layer().symlink("esc", abs_canary).file("esc/pwned", b"x").tar()
        ],
        "symlink-escape-relative": [
            L.Layer().symlink("esc", UP + "canary").file("esc/pwned", b"x").tar()
        ],
        "symlink-chain-escape": [
            L.Layer().symlink("a", "b").symlink("b", UP + "canary").file("a/pwned", b"x").tar()
        ],
        "symlink-escape-across-layers": [
            L.Layer().symlink("esc", abs_canary).tar(),
            L.Layer().dir("esc").file("esc/pwned", b"x").tar(),
        ],
        "symlink-escape-across-layers-no-dir-entry": [
            L.Layer().symlink("esc", UP + "canary").tar(),
            L.Layer().file("esc/pwned", b"x").tar(),
        ],
        "symlink-then-replace-target": [
            L.Layer().symlink("secret", abs_canary + "/secret").file("secret", b"overwritten").tar()
        ],
        "hardlink-dotdot": [L.Layer().hardlink("h", UP + "canary/secret").tar()],
        "hardlink-absolute": [L.Layer().hardlink("h", abs_canary + "/secret").tar()],
        "hardlink-through-symlink": [
            L.Layer().symlink("s", abs_canary).hardlink("h", "s/secret").tar()
        ],
        "hardlink-through-symlink-across-layers": [
            L.Layer().symlink("s", UP + "canary").tar(),
            L.Layer().hardlink("h", "s/secret").tar(),
        ],
        "whiteout-dotdot-name": [L.Layer().add(L.Entry(b".wh...")).tar()],
        "whiteout-dotdot-parent": [L.Layer().whiteout(UP + "canary/secret").tar()],
        "whiteout-through-symlink": [
            L.Layer().symlink("s", abs_canary).tar(),
            L.Layer().whiteout("s/secret").tar(),
        ],
        "opaque-through-symlink": [
            L.Layer().symlink("s", abs_canary).tar(),
            L.Layer().opaque("s").tar(),
        ],
        "trusted-overlay-opaque-xattr": [
            L.Layer().dir("d", xattrs={"trusted.overlay.opaque": b"y"}).tar()
        ],
        "trusted-overlay-redirect-xattr": [
            L.Layer().dir("d", xattrs={"trusted.overlay.redirect": b"/etc"}).tar()
        ],
        "trusted-other-xattr": [L.Layer().file("f", b"", xattrs={"trusted.x": b"1"}).tar()],
        "nul-in-pax-path": [L.Layer().add(L.Entry(b"ok", pax={b"path": b"a\0b"})).tar()],
        "truncated-tar": [L.Layer().file("big", L.random_bytes(5000)).tar()[:2048]],
        "corrupt-header-checksum": [bytes([0x41]) + L.Layer().file("x", b"1").tar()[1:]],
        "sparse-file": [L.Layer().add(L.Entry(b"s", type=b"S")).tar()],
    }


def snapshot_of(path: Path) -> dict:
    return trees.describe(path)


@pytest.fixture
def canary(tmp_path: Path) -> Path:
    c = canary_path(tmp_path)
    c.mkdir()
    (c / "secret").write_bytes(b"do not touch")
    return c


def run(sn: snapshots.Snapshotter, tars: list[bytes], **kwargs: object) -> None:
    img = L.image(tars)
    u = unpacker.Unpacker(L.MemoryProvider(img.blobs), sn, **kwargs)  # type: ignore[arg-type]
    u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))


def assert_nothing_left(sn: snapshots.Snapshotter, committed_below: int) -> None:
    infos = list(sn.walk())
    assert [i for i in infos if i.kind is not snapshots.Kind.COMMITTED] == []
    assert len(infos) == committed_below
    root = Path(sn.root)  # type: ignore[attr-defined]
    ids = sorted(os.listdir(root / "snapshots"))
    assert len(ids) == committed_below


HOSTILE = sorted(hostile_layers(Path("/x")))

#: Cases that may also succeed harmlessly: a layer that does not see the lower layer's
#: symlink (overlay upper dirs are separate), or an entry that replaces the symlink itself.
NEUTRALISED_OK = {
    "symlink-escape-across-layers",
    "symlink-escape-across-layers-no-dir-entry",
    "symlink-then-replace-target",
    "whiteout-through-symlink",
    "opaque-through-symlink",
}


@pytest.mark.parametrize("snapshotter", ["overlay", "naive"])
@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_layer_is_refused_and_nothing_escapes(
    case: str, snapshotter: str, canary: Path, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    sn = request.getfixturevalue(f"{snapshotter}_sn")
    tars = hostile_layers(canary)[case]
    before = snapshot_of(tmp_path / "canary")
    try:
        run(sn, tars, concurrency=2)
    except errors.UnsafeLayer:
        assert_nothing_left(sn, committed_below=len(tars) - 1)
    else:
        assert case in NEUTRALISED_OK, "the layer was applied"
        assert_nothing_left(sn, committed_below=len(tars))
    assert snapshot_of(tmp_path / "canary") == before
    assert sorted(os.listdir(tmp_path)) == sorted(["canary", snapshotter])


def test_a_symlink_parent_inside_the_root_is_followed_inside_the_root(
    overlay_sn: snapshots.OverlaySnapshotter, canary: Path
) -> None:
    layer = L.Layer().dir("usr").dir("usr/lib").symlink("lib", "/usr/lib").file("lib/x", b"in")
    run(overlay_sn, [layer.tar()])
    (info,) = overlay_sn.walk()
    fs = Path(overlay_sn.mounts(info.name)[0].source)
    assert (fs / "usr/lib/x").read_bytes() == b"in"
    assert os.path.islink(fs / "lib")


def test_a_whiteout_of_a_lower_symlink_removes_the_link_not_its_target(
    naive_sn: snapshots.NaiveSnapshotter, canary: Path
) -> None:
    tars = [L.Layer().symlink("s", str(canary)).tar(), L.Layer().whiteout("s").tar()]
    run(naive_sn, tars)
    assert (canary / "secret").read_bytes() == b"do not touch"


def layer_blob(data: bytes) -> tuple[L.Image, bytes]:
    return L.image([data]), data


def unpack_blob(sn: snapshots.Snapshotter, blob: bytes, diff_id: str, **kwargs: object) -> None:
    from agent.images import descriptors, digests

    desc = descriptors.Descriptor(L.MEDIA_TYPES["gzip"], digests.Digest(L.sha256(blob)), len(blob))
    provider = L.MemoryProvider({desc.digest: blob})
    u = unpacker.Unpacker(provider, sn, **kwargs)  # type: ignore[arg-type]
    u.unpack_blocking([desc], [digests.Digest(diff_id)])


def test_a_gzip_bomb_is_refused_at_the_size_limit(
    overlay_sn: snapshots.OverlaySnapshotter, tmp_path: Path
) -> None:
    bomb = L.gzip_bomb(32 << 20)
    assert len(bomb) < 64 << 10
    with pytest.raises(errors.UnsafeLayer, match="decompression bomb"):
        unpack_blob(overlay_sn, bomb, L.sha256(b""), max_uncompressed_bytes=4 << 20)
    assert_nothing_left(overlay_sn, 0)
    assert sum(f.stat().st_size for f in tmp_path.rglob("*") if f.is_file()) < 8 << 20


def test_a_zstd_bomb_is_refused_by_the_ratio_check(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compression, "RATIO_GRACE_BYTES", 1 << 20)
    blob = L.compress(bytes(16 << 20), "zstd")
    stream = compression.open_layer(L.io.BytesIO(blob), L.MEDIA_TYPES["zstd"], max_ratio=100)
    with pytest.raises(errors.UnsafeLayer, match="ratio"):
        while stream.read(1 << 20):
            pass


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda b: b[: len(b) // 2], id="truncated-gzip"),
        pytest.param(lambda b: b[:-4], id="gzip-without-its-size-trailer"),
        pytest.param(lambda b: b + b"trailing garbage", id="trailing-garbage"),
        pytest.param(lambda b: b + b"\x1f", id="trailing-half-magic"),
        pytest.param(lambda b: b[:40] + bytes(16) + b[56:], id="corrupt-deflate-data"),
    ],
)
def test_a_broken_gzip_stream_fails_cleanly(
    mangle: Callable[[bytes], bytes], overlay_sn: snapshots.OverlaySnapshotter, canary: Path
) -> None:
    tar = L.Layer().file("f", L.random_bytes(100_000)).tar()
    blob = mangle(gzip.compress(tar))
    with pytest.raises((errors.UnsafeLayer, errors.DigestMismatch)):
        unpack_blob(overlay_sn, blob, L.sha256(tar))
    assert_nothing_left(overlay_sn, 0)


# Found in review: places where this reader could see another tree than Go's archive/tar
# (what containerd and most scanners use), and metadata that cost memory or CPU unbounded.


def _apply_raw(tar: bytes, tmp_path: Path) -> Path:
    root = tmp_path / "r"
    root.mkdir()
    archive.apply(io.BytesIO(tar), root)
    return root


def test_entries_hidden_in_a_directorys_size_are_read_as_go_reads_them(tmp_path: Path) -> None:
    evil, benign = b"EVIL", b"benign"
    hidden = L.header(b"bin/sh", size=len(benign)) + benign + bytes(-len(benign) % 512)
    tar = (L.header(b"bin/sh", size=len(evil)) + evil + bytes(-len(evil) % 512)
           + L.header(b"x", type=b"5", size=len(hidden)) + hidden + bytes(1024))
    root = _apply_raw(tar, tmp_path)
    assert (root / "bin/sh").read_bytes() == benign  # as GNU tar and Go see it
    assert (root / "x").is_dir()


def test_a_gnu_long_name_together_with_a_pax_path_is_refused(tmp_path: Path) -> None:
    long_name = b"a" * 120
    pax = L.pax_records({b"path": b"b"})
    tar = (L.header(b"././@LongLink", type=b"L", size=len(long_name) + 1) + long_name + b"\0"
           + bytes(-(len(long_name) + 1) % 512)
           + L.header(b"pax", type=b"x", size=len(pax)) + pax + bytes(-len(pax) % 512)
           + L.header(b"short", size=0) + bytes(1024))
    with pytest.raises(errors.UnsafeLayer, match="GNU long name and a PAX path"):
        _apply_raw(tar, tmp_path)


def test_piled_up_pax_headers_are_bounded_in_total(tmp_path: Path) -> None:
    tar = b""
    for i in range(3):
        rec = L.pax_records({f"SCHILY.xattr.user.k{i}".encode(): b"A" * 400_000})
        tar += L.header(b"pax", type=b"x", size=len(rec)) + rec + bytes(-len(rec) % 512)
    tar += L.header(b"f", size=0) + bytes(1024)
    with pytest.raises(errors.UnsafeLayer, match="bytes of tar metadata for one entry"):
        _apply_raw(tar, tmp_path)


@pytest.mark.parametrize(
    "records",
    [{b"uid": b"99999999999999"}, {b"mtime": b"100000000000000000000"},
     {b"linkpath": b"a\0b"}],
    ids=["uid-out-of-range", "mtime-out-of-range", "nul-in-linkpath"],
)
def test_fields_out_of_range_are_unsafe_not_internal_errors(
    tmp_path: Path, records: dict[bytes, bytes]
) -> None:
    pax = L.pax_records(records)
    kind = b"2" if b"linkpath" in records else b"0"
    tar = (L.header(b"pax", type=b"x", size=len(pax)) + pax + bytes(-len(pax) % 512)
           + L.header(b"f", type=kind, size=0) + bytes(1024))
    with pytest.raises(errors.UnsafeLayer):
        _apply_raw(tar, tmp_path)


def test_a_path_deeper_than_linux_allows_is_unsafe(tmp_path: Path) -> None:
    deep = b"/".join([b"d"] * 3000) + b"/f"
    pax = L.pax_records({b"path": deep})
    tar = (L.header(b"pax", type=b"x", size=len(pax)) + pax + bytes(-len(pax) % 512)
           + L.header(b"f", size=0) + bytes(1024))
    with pytest.raises(errors.UnsafeLayer, match="deep"):
        _apply_raw(tar, tmp_path)
