"""Tar streams that readers disagree on are read as Go's ``archive/tar`` (containerd) reads them.

Each case is a layer a Go-based scanner would list differently from an older version of
this reader: one digest must mean one tree. The Go behaviour named in each test is from
Go 1.19's ``src/archive/tar`` (``reader.go``, ``strconv.go``, ``format.go``).
"""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest
from fixtures import layers as L
from fixtures import rawtar as R
from fixtures.rawtar import END, pad

from agent.images import errors
from agent.images.unpack import archive, tar


def apply(data: bytes, tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir(mode=0o755)
    archive.apply(io.BytesIO(data), root)
    return root


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_a_numeric_field_with_a_leading_nul_is_read_past_the_nul(tmp_path: Path) -> None:
    """Go trims leading NULs: the size is 512 and the "hidden" header is file data."""
    hidden = L.header(b"hidden", size=0)
    block = R.patch(L.header(b"a", size=0), 124, b"\x000000001000\0")
    root = apply(block + hidden + END, tmp_path)
    assert listing(root) == ["a"]
    assert (root / "a").read_bytes() == hidden


def test_a_whiteout_of_an_unknown_type_has_its_data_skipped(tmp_path: Path) -> None:
    """Go skips the data of every type that is not header-only; containerd then sees a
    whiteout by its name, whatever its type."""
    root = tmp_path / "root"
    root.mkdir()
    archive.apply(io.BytesIO(L.Layer().file("x", b"lower").tar()), root)
    body = L.header(b"hidden", size=0)
    layer = L.header(b".wh.x", type=b"Z", size=len(body)) + body + END
    archive.apply(io.BytesIO(layer), root)
    assert listing(root) == []


def test_of_two_pax_headers_in_a_row_only_the_last_applies(tmp_path: Path) -> None:
    data = (R.pax({b"path": b"first", b"uid": b"7"}) + R.pax({b"path": b"second"})
            + L.header(b"ustar-name", size=0) + END)  # fmt: skip
    root = apply(data, tmp_path)
    assert listing(root) == ["second"]
    assert os.stat(root / "second").st_uid == 0  # the first header's uid is gone too


def test_a_global_header_drops_the_pending_pax_header(tmp_path: Path) -> None:
    data = R.pax({b"path": b"from-x"}) + R.pax(
        {b"comment": b"c"}, type=b"g", name=b"pax_global_header"
    )
    root = apply(data + L.header(b"plain", size=0) + END, tmp_path)
    assert listing(root) == ["plain"]


def test_typeflag_nul_with_a_trailing_slash_is_a_directory_without_data(tmp_path: Path) -> None:
    """Go turns it into a directory, whose "data" is the next header."""
    inner = L.header(b"d/inside", size=0)
    block = L.header(b"d/", type=b"\0", size=len(inner), mode=0o750)
    root = apply(block + inner + END, tmp_path)
    assert (root / "d").is_dir()
    assert stat.S_IMODE(os.stat(root / "d").st_mode) == 0o750
    assert listing(root) == ["d", "d/inside"]


def test_an_empty_pax_path_keeps_the_ustar_name(tmp_path: Path) -> None:
    data = R.pax({b"path": b""}) + L.header(b"keep", type=b"5", mode=0o700, uid=5) + END
    root = apply(data, tmp_path)
    assert listing(root) == ["keep"]
    assert stat.S_IMODE(os.stat(root / "keep").st_mode) == 0o700
    st = os.stat(root)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)


@pytest.mark.parametrize(
    ("offset", "field"),
    [(124, b"+0000000001\0"), (124, b"0000_000001\0"), (124, b" -000000001\0"),
     (124, b"00000000009\0"), (329, b"000000x\0")],
    ids=["size-plus-sign", "size-underscore", "size-minus", "size-not-octal",
         "devmajor-of-a-file"],
)  # fmt: skip
def test_numeric_fields_go_refuses_are_refused(
    tmp_path: Path, offset: int, field: bytes
) -> None:
    block = R.patch(L.header(b"f", size=0), offset, field)
    with pytest.raises(errors.UnsafeLayer, match="corrupt"):
        apply(block + bytes(512) + END, tmp_path)


@pytest.mark.parametrize("size", [b"1_0", b" 10", b"0x10"])
def test_pax_sizes_go_refuses_are_refused(tmp_path: Path, size: bytes) -> None:
    with pytest.raises(errors.UnsafeLayer, match="size"):
        apply(R.pax({b"size": size}) + L.header(b"f", size=0) + bytes(512) + END, tmp_path)


def test_a_star_header_has_a_131_byte_prefix(tmp_path: Path) -> None:
    prefix = b"p" * 131  # fills the field: no NUL before STAR's atime
    block = bytearray(L.header(b"f", size=0))
    block[345:476] = prefix
    block[476:488] = b"00000000000\0"  # atime
    block[488:500] = b"00000000000\0"  # ctime
    block[508:512] = b"tar\0"
    root = apply(R.checksum(block) + END, tmp_path)
    assert listing(root) == ["p" * 131, "p" * 131 + "/f"]


def gnu_header(name: bytes, atime: bytes) -> bytes:
    block = bytearray(L.header(name, size=0))
    block[257:265] = b"ustar  \0"
    block[345:357] = atime.ljust(12, b"\0")
    return R.checksum(block)


def test_a_gnu_header_with_a_non_numeric_atime_is_read_as_a_prefixed_name(
    tmp_path: Path,
) -> None:
    """Go reads such headers (written by Go before 1.8) as ustar prefix + name."""
    root = apply(gnu_header(b"f", b"pre\0") + gnu_header(b"g", b"00000000001\0") + END, tmp_path)
    assert listing(root) == ["g", "pre", "pre/f"]


def test_a_zero_block_followed_by_a_header_is_refused(tmp_path: Path) -> None:
    with pytest.raises(errors.UnsafeLayer, match="zero block"):
        apply(bytes(512) + L.header(b"after-the-end", size=0) + END, tmp_path)


def test_the_reader_lists_what_go_lists() -> None:
    """The reader on its own: names, types and sizes of a mixed stream."""
    data = (
        R.pax({b"path": b"long/" + b"n" * 120, b"mtime": b"1.5"})
        + L.header(b"short", size=3)
        + pad(b"abc")
        + L.header(b"dir/", type=b"\0")
        + L.header(b"link", type=b"1", linkname=b"/short")
        + END
    )
    reader = tar.Reader(io.BytesIO(data))  # type: ignore[arg-type]
    entries = []
    while (h := reader.next()) is not None:
        entries.append((h.name, h.typeflag, h.size, h.mtime_ns, h.linkname))
    assert entries == [
        (b"long/" + b"n" * 120, b"0", 3, 1_500_000_000, b""),
        (b"dir/", b"5", 0, L.MTIME * 10**9, b""),
        (b"link", b"1", 0, L.MTIME * 10**9, b"/short"),
    ]
    assert reader.total == len(data)


def test_a_header_full_of_high_bytes_has_its_checksum_checked_as_go_does(
    tmp_path: Path,
) -> None:
    """Go's checksum is the unsigned byte sum (Sun tar's signed sum is accepted too): a
    header with bytes >= 0x80 all through both halves of the block is read, and a
    checksum one off is refused."""
    name = bytes(range(0x80, 0xE4))  # 100 high bytes: the name field
    link = b"\xff" * 99  # the link name, ending at byte 256
    prefix = b"\xfe" * 154  # the ustar prefix, in the second half
    block = bytearray(L.header(b"x", type=b"2", size=0))
    block[0:100] = name
    block[157:256] = link
    block[345:499] = prefix
    unsigned = R.checksum(block)
    root = apply(unsigned + END, tmp_path)
    path = os.fsdecode(prefix + b"/" + name)
    assert os.readlink(root / path) == os.fsdecode(link)

    off = bytearray(unsigned)
    off[148:156] = b"%06o\0 " % (int(unsigned[148:154], 8) + 1)
    (tmp_path / "off").mkdir()
    with pytest.raises(errors.UnsafeLayer, match="checksum"):
        apply(bytes(off) + END, tmp_path / "off")

    signed = bytearray(L.header(b"caf\xe9-\xe0-la-cr\xe8me", size=0))
    signed[148:156] = b" " * 8
    signed[148:156] = b"%06o\0 " % sum(c - 256 if c > 127 else c for c in signed)
    root = tmp_path / "signed"
    root.mkdir()
    archive.apply(io.BytesIO(bytes(signed) + END), root)
    assert os.listdir(os.fsencode(root)) == [b"caf\xe9-\xe0-la-cr\xe8me"]
