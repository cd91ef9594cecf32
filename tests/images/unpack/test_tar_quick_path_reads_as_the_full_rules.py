"""The reader's quick path for plain regular-file headers reads exactly what the full rules
read, and leaves every other header to them.

``tar.Reader`` reads the common header (a regular file in a USTAR block as Go, Python and
GNU tar write one) without :func:`tar._parse_block`. A layer digest must mean one tree, so
for any header, and any header patched in the places where the quick path and the full
rules could part (terminators, type, link name, device numbers, prefix, magic, trailer,
checksum), both readings must give the same entries, the same error, and the same diff ID.
"""

from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import pytest
from fixtures import layers as L
from fixtures import rawtar as R
from fixtures.rawtar import END, pad
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.images import errors
from agent.images.unpack import tar

Reading = tuple[list[object], int, str]


def read_all(data: bytes, *, quick: bool) -> Reading:
    """Every entry (or the error that stopped the reading), the bytes read, the diff ID."""
    reader = tar.Reader(io.BytesIO(data))  # type: ignore[arg-type]
    if not quick:
        reader.next_plain = lambda: None  # type: ignore[method-assign]
    entries: list[object] = []
    try:
        while (h := reader.next()) is not None:
            entries.append(h)
    except errors.UnsafeLayer as e:
        entries.append(("refused", str(e)))
    return entries, reader.total, str(reader.digest())


def quick_headers(data: bytes) -> int:
    """How many headers of ``data`` the quick path read."""
    reader = tar.Reader(io.BytesIO(data))  # type: ignore[arg-type]
    taken = 0
    plain = reader.next_plain

    def counting() -> tuple[bytes, int, int, int, int, int] | None:
        nonlocal taken
        fields = plain()
        taken += fields is not None
        return fields

    reader.next_plain = counting  # type: ignore[method-assign]
    while reader.next() is not None:
        pass
    return taken


# Byte patches at the places the quick path looks at (the checksum is then recomputed,
# kept stale, made Sun tar's signed sum, or put one off).
PATCHES = [
    (156, b"\0"),  # old regular file type
    (156, b"5"),  # a directory
    (156, b"2"),
    (156, b"x"),  # a PAX header: its data is records
    (157, b"target\0"),  # a link name on a regular file
    (329, b"0000001\0"),  # device numbers
    (337, b"\0\0\0\0\0\0\0\0"),
    (329, bytes(16)),
    (345, b"prefix\0"),  # a USTAR prefix
    (508, b"tar\0"),  # a STAR trailer
    (257, b"ustar  \0"),  # GNU magic
    (263, b"  "),  # another version
    (100, b"000644 \0"),  # a space before the terminator
    (100, b"0000644 "),  # a space as the terminator
    (108, b" 000017\0"),  # a leading space
    (116, b"\x80\0\0\0\0\0\0\x07"),  # base-256
    (124, b"00000000010 "),
    (124, b"0000000001\0\0"),
    (136, b"1452477040 \0"),
    (136, b"\xff" * 12),  # a negative base-256 mtime
    (100, b"0000898\0"),  # not octal
    (0, b"\0"),  # an empty name
    (0, b"a/b/../c\0"),
    (0, b"/abs\0"),
]
CHECKSUMS = ["fresh", "stale", "signed", "one off"]


def patched(block: bytes, patches: list[tuple[int, bytes]], how: str) -> bytes:
    b = bytearray(block)
    for offset, value in patches:
        b[offset : offset + len(value)] = value
    if how == "stale":
        return bytes(b)
    fresh = bytearray(R.checksum(b))
    if how == "signed":
        fresh[148:156] = b" " * 8
        fresh[148:156] = b"%06o\0 " % (sum(c - 256 if c > 127 else c for c in fresh) & 0o777777)
    elif how == "one off":
        fresh[148:156] = b"%06o\0 " % (int(fresh[148:154], 8) + 1)
    return bytes(fresh)


names = st.binary(min_size=1, max_size=100).filter(lambda n: b"\0" not in n)
numbers = st.integers(min_value=0, max_value=0o7777777)
big = st.integers(min_value=0, max_value=0o77777777777)


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(
    name=names,
    mode=numbers,
    uid=numbers,
    gid=numbers,
    size=st.integers(min_value=0, max_value=1500),
    mtime=big,
    patches=st.lists(st.sampled_from(PATCHES), max_size=3),
    how=st.sampled_from(CHECKSUMS),
)
def test_any_header_reads_the_same_through_the_quick_path(
    name: bytes, mode: int, uid: int, gid: int, size: int, mtime: int,
    patches: list[tuple[int, bytes]], how: str,
) -> None:  # fmt: skip
    block = L.header(name, size=size, mode=mode, uid=uid, gid=gid, mtime=mtime)
    # A plain entry first (the quick path reads a header only once the reader's buffer
    # holds it: the first one never), then this one, then another after its data.
    data = R.entry(b"first", b"head") + patched(block, patches, how)
    data += pad(bytes(range(256)) * (size // 256 + 1))[: -(-size // 512) * 512]
    data += R.entry(b"next", b"tail") + END
    assert read_all(data, quick=True) == read_all(data, quick=False)


def test_the_headers_tar_writers_write_for_regular_files_take_the_quick_path(
    tmp_path: Path,
) -> None:
    """Python's tarfile (USTAR, and PAX with whole-second mtimes, as image builders write
    layers) and GNU tar's ``ustar`` write regular-file headers the quick path reads. GNU
    tar's ``posix`` (a PAX header with atime and ctime before every file) and its own
    format (``ustar  `` magic) go to the full rules. Either way, the same entries."""
    src = tmp_path / "src"
    (src / "dir").mkdir(parents=True)
    for i in range(5):
        (src / "dir" / f"f{i}").write_bytes(b"x" * (i * 300))

    def whole_seconds(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.mtime = int(info.mtime)
        return info

    archives = {}
    for fmt in (tarfile.USTAR_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
            t.add(src / "dir", arcname="dir", filter=whole_seconds)
        archives[f"tarfile {fmt}"] = buf.getvalue()
    for fmt in ("ustar", "posix", "gnu"):
        out = tmp_path / f"{fmt}.tar"
        subprocess.run(["tar", "-cf", str(out), f"--format={fmt}", "-C", str(src), "dir"],
                       check=True)  # fmt: skip
        archives[f"GNU tar {fmt}"] = out.read_bytes()
    quick = {label: quick_headers(data) for label, data in archives.items()}
    assert quick == {
        f"tarfile {tarfile.USTAR_FORMAT}": 5,
        f"tarfile {tarfile.PAX_FORMAT}": 5,
        "GNU tar ustar": 5,
        "GNU tar posix": 0,
        "GNU tar gnu": 0,
    }
    for label, data in archives.items():
        entries, _, _ = read_all(data, quick=True)
        assert sorted(h.name for h in entries) == [  # type: ignore[attr-defined]
            b"dir/", *(b"dir/f%d" % i for i in range(5))
        ], label
        assert entries == read_all(data, quick=False)[0], label


@pytest.mark.parametrize("patches, how", [([], "one off"), ([(100, b"0000755\0")], "stale")])
def test_a_plain_header_with_a_bad_checksum_is_still_refused(
    patches: list[tuple[int, bytes]], how: str
) -> None:
    data = patched(L.header(b"file", size=0), patches, how) + END
    entries, _, _ = read_all(data, quick=True)
    assert entries == [("refused", "layer: tar header checksum mismatch (corrupt archive)")]
