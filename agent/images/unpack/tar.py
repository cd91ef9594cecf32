"""Read a tar stream exactly as Go's ``archive/tar`` reads it (the reader containerd uses).

A layer digest must mean one filesystem: if this reader saw other entries than Go's, a
Go-based scanner would approve one tree while the node runs another. So every rule here is
Go 1.19's (``reader.go``, ``strconv.go``, ``format.go``, ``common.go``):

* Formats by magic: ``ustar\\0`` (USTAR/PAX: 155-byte prefix), ``ustar\\0`` with the
  ``tar\\0`` trailer (STAR: 131-byte prefix; its atime/ctime must parse), ``ustar `` +
  `` \\0`` (GNU: atime/ctime; if they do not parse, the 155 bytes are taken as a prefix,
  as pre-1.8 Go wrote it), anything else V7 (no prefix, no device numbers).
* Numbers: base-256 when the first byte has its top bit set (two's complement); otherwise
  octal after trimming spaces and NULs on both ends and cutting at the next NUL. Only the
  digits 0-7 are accepted (no sign, no ``_``). Every numeric field of the header must
  parse, device numbers included, or the archive is refused.
* One zero block ends the archive only if the next block is zero too or the stream ends.
* PAX ``x`` records apply to the next entry; a second ``x`` replaces the first; a ``g``
  (global) header is returned as an entry of its own and drops what was pending. Records
  with an empty value leave the ustar field as it was. GNU ``L``/``K`` long names override
  (an empty one does not).
* Typeflag ``\\0``: a directory if the name ends in ``/``, else a regular file.
* Header-only types (hard/symbolic links, devices, directories, fifos) have no data,
  whatever their size field says; every other type's data is skipped when not read.
* Sparse files: old GNU ``S`` maps (in the header and its extension blocks) and the PAX
  GNU sparse formats 0.0, 0.1 and 1.0, validated as Go validates them.

Stricter than Go, to bound memory: all special data (PAX records, long names, a 1.0 sparse
map) pending for one entry is capped at 1 MiB in total, and an entry with both a GNU long
name and a PAX ``path`` (or long link and ``linkpath``) is refused.
"""

from __future__ import annotations

import functools
import os
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, cast

from agent.images import digests, errors
from agent.images.unpack import compression, readahead

BLOCK: Final = 512
_ZERO_BLOCK: Final = bytes(BLOCK)
_CHUNK: Final = 1 << 20
#: The size of the reads from the decompressed stream.
CHUNK: Final = _CHUNK
#: PAX records, GNU long names and sparse maps, in all for one entry.
MAX_META_BYTES: Final = 1 << 20

# Type flags.
REG, REGA, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO, CONT = (
    b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"
)
XHEADER, XGLOBAL, GNU_SPARSE, GNU_LONGNAME, GNU_LONGLINK = b"x", b"g", b"S", b"L", b"K"
#: Types that never have data (Go's ``isHeaderOnlyType``).
HEADER_ONLY: Final = frozenset({LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO})
#: Types that take no special handling (no special header, never sparse).
_PLAIN_TYPES: Final = frozenset({REG, REGA, LINK, SYMLINK, CHAR, BLOCKDEV, DIR, FIFO, CONT})

XATTR_PREFIX: Final = b"SCHILY.xattr."
_SPARSE_PREFIX: Final = b"GNU.sparse."
_SPARSE_MAP: Final = b"GNU.sparse.map"

_V7, _USTAR, _STAR, _GNU = "v7", "ustar", "star", "gnu"
_OCTAL: Final = re.compile(rb"[0-7]+")
_PLAIN_OCTAL: Final = re.compile(rb"[ \0]*([0-7]{0,21})[ \0]*")
_DECIMAL: Final = re.compile(rb"[+-]?[0-9]+")
_DIGITS: Final = re.compile(rb"[0-9]*")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(slots=True)
class Header:
    """One entry, as Go's ``tar.Reader.Next`` returns it.

    Attributes:
        size: the logical size (of a sparse file: with its holes).
        mtime_ns: the modification time in nanoseconds since the epoch (unbounded).
        pax: the PAX records that applied to this entry (for a ``g`` entry, its own).
        sparse: for a sparse file, its data fragments ``(offset, length)`` in order; the
            rest of its ``size`` is holes. ``None`` for every other entry.
    """

    name: bytes
    typeflag: bytes
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime_ns: int = 0
    linkname: bytes = b""
    devmajor: int = 0
    devminor: int = 0
    pax: dict[bytes, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None

    @property
    def xattrs(self) -> dict[str, bytes]:
        """``SCHILY.xattr.*`` records, empty values included (containerd sets those too)."""
        if not self.pax:
            return {}
        n = len(XATTR_PREFIX)
        return {
            k[n:].decode("utf-8", "surrogateescape"): v
            for k, v in self.pax.items()
            if k.startswith(XATTR_PREFIX)
        }


class Reader:
    """Iterate over the entries of a tar stream; the bytes are hashed as they pass.

    :meth:`next` returns the next entry (skipping whatever data of the previous one was
    not read); :meth:`write_to` writes the current entry's data to a file.
    """

    def __init__(
        self,
        stream: compression.Readable,
        on_progress: Callable[[int], None] | None = None,
        name: str = "layer",
    ):
        self.input = _Input(stream, on_progress, name)
        self.name = name
        self._remaining = 0  # data bytes of the current entry still in the stream
        self._pad = 0

    @property
    def total(self) -> int:
        """The number of bytes read so far."""
        return self.input.total

    def digest(self) -> digests.Digest:
        """The sha256 of every byte read (all of them, once :meth:`next` returned None)."""
        return self.input.digest()

    def _error(self, what: str) -> errors.UnsafeLayer:
        return errors.UnsafeLayer(f"{self.name}: {what}")

    # -- entries ------------------------------------------------------------------

    def next(self) -> Header | None:
        """The next entry, or ``None`` at the end of the archive (the rest is drained)."""
        plain = self.next_plain()
        if plain is not None:
            name, mode, uid, gid, size, mtime_ns = plain
            return Header(name, REG, mode, uid, gid, size, mtime_ns)
        return self.next_by_full_rules()

    def next_by_full_rules(self) -> Header | None:
        """:meth:`next` for a reader that asked :meth:`next_plain` already and got ``None``
        (it does not ask again)."""
        skip = self._remaining + self._pad
        self._remaining = self._pad = 0
        pax: dict[bytes, bytes] = {}
        long_name = long_link = b""
        meta = 0
        while True:
            block = self._header_block(skip)
            skip = 0
            if block is None:
                return None
            h, fmt = _parse_block(block, self._error)
            t = h.typeflag
            if meta == 0 and t in _PLAIN_TYPES:
                # The common entry: no PAX records, long names or sparse map apply to it,
                # so what follows would change nothing (a REGA is a REG or a DIR, neither
                # of which can be sparse without PAX records).
                n = 0 if t in HEADER_ONLY else h.size
                if n < 0:
                    raise self._error(f"entry {h.name!r} has a negative size")
                if t == REGA:
                    if h.name.endswith(b"/"):
                        h.typeflag, n = DIR, 0
                    else:
                        h.typeflag = REG
                self._remaining = n
                self._pad = -n % BLOCK
                return h
            self._set_data(h)
            if t in (XHEADER, XGLOBAL, GNU_LONGNAME, GNU_LONGLINK):
                meta += h.size
                if meta > MAX_META_BYTES:
                    raise self._error(
                        f"more than {MAX_META_BYTES} bytes of tar metadata for one entry"
                    )
                data = self._read_data(h.size)
                if t == XGLOBAL:
                    # Go merges the global records into this header ignoring errors (in
                    # map order: only the name matters to containerd) and returns it.
                    records = _parse_pax(data, self._error)
                    name = records.get(b"path") or h.name
                    return Header(name=name, typeflag=XGLOBAL, pax=records)
                if t == XHEADER:
                    pax = _parse_pax(data, self._error)  # a second one replaces the first
                elif t == GNU_LONGNAME:
                    long_name = _cstring(data)
                else:
                    long_link = _cstring(data)
                continue
            if (long_name and pax.get(b"path")) or (long_link and pax.get(b"linkpath")):
                raise self._error(
                    f"entry {long_name or long_link!r} carries both a GNU long name and a"
                    " PAX path; tar readers disagree on which one wins"
                )
            self._merge_pax(h, pax)
            if long_name:
                h.name = long_name
            if long_link:
                h.linkname = long_link
            if h.typeflag == REGA:
                h.typeflag = DIR if h.name.endswith(b"/") else REG
            self._set_data(h)  # the PAX size, or a type that became header-only
            self._sparse(h, block, fmt, MAX_META_BYTES - meta)
            return h

    def next_plain(self) -> tuple[bytes, int, int, int, int, int] | None:
        """The next entry if it is the common one, as ``(name, mode, uid, gid, size,
        mtime_ns)`` of a regular file (:meth:`next` would return the same as a
        :class:`Header`, typeflag ``0``, nothing else set); else ``None``, nothing consumed.

        The common one: a regular file (type ``0``) in a USTAR header as Go, Python and GNU
        tar write one: every number zero-padded octal ended by a NUL, device numbers zero,
        no link name, no prefix, a valid unsigned checksum, its block already in the
        buffer. Anything else (and every pending PAX record or long name: this is asked
        only between entries) goes through :meth:`next`'s full rules
        (:func:`_parse_block`), which read these blocks the same way.
        """
        inp = self.input
        pos = inp.pos + self._remaining + self._pad
        end = pos + BLOCK
        buf = inp.buf
        if end > len(buf):
            return None
        block = buf[pos:end]
        m = _PLAIN_FIELDS.match(block, 100)
        if (
            m is None
            or block[257:265] != _USTAR_MAGIC
            or block[345]
            or block[329:345] not in _ZERO_DEVICES
            or block[508:512] == _STAR_TRAILER
        ):
            return None
        mode, uid, gid, size, mtime, chksum = m.groups()
        if _byte_sum(block) - _PLAIN_CHKSUM_BYTES - sum(chksum) != int(chksum, 8):
            return None
        name = block[:100]
        if (i := name.find(0)) >= 0:
            name = name[:i]
        n = int(size, 8)
        inp.pos = end
        self._remaining = n
        self._pad = -n % BLOCK
        return name, int(mode, 8), int(uid, 8), int(gid, 8), n, int(mtime, 8) * 1_000_000_000

    def copy_data(self, fd: int) -> None:
        """Write the current entry's data, not sparse, to ``fd`` (:meth:`write_to` without
        the sparse map)."""
        if self._remaining:
            self.input.copy(fd, self._remaining)
            self._remaining = 0

    def _header_block(self, skip: int = 0) -> bytes | None:
        block = self.input.header(skip)
        if block is None:
            return None
        if block != _ZERO_BLOCK:
            return block
        second = self.input.header()
        if second is not None and second != _ZERO_BLOCK:
            raise self._error("a zero block followed by more headers (corrupt archive)")
        self.input.drain()
        return None

    def _set_data(self, h: Header) -> None:
        n = 0 if h.typeflag in HEADER_ONLY else h.size
        if n < 0:
            raise self._error(f"entry {h.name!r} has a negative size")
        self._remaining = n
        self._pad = -n % BLOCK

    def _read_data(self, n: int) -> bytes:
        data = self.input.read(n)
        self.input.skip(self._pad)
        self._remaining = self._pad = 0
        return data

    def _merge_pax(self, h: Header, records: dict[bytes, bytes]) -> None:
        """Go's ``mergePAX``: records with an empty value keep the ustar field."""
        for key, value in records.items():
            if not value:
                continue
            if key == b"path":
                h.name = value
            elif key == b"linkpath":
                h.linkname = value
            elif key in (b"uid", b"gid", b"size"):
                n = _go_int(value)
                if n is None:
                    raise self._error(f"corrupt PAX record {key.decode()}={value!r}")
                setattr(h, key.decode(), n)
            elif key in (b"mtime", b"atime", b"ctime"):
                ns = _pax_time_ns(value)
                if ns is None:
                    raise self._error(f"corrupt PAX record {key.decode()}={value!r}")
                if key == b"mtime":
                    h.mtime_ns = ns
        h.pax = records

    # -- sparse files ---------------------------------------------------------------

    def _sparse(self, h: Header, block: bytes, fmt: str, budget: int) -> None:
        """Go's ``handleSparseFile``: read the sparse map, if this is a sparse file."""
        fragments: list[tuple[int, int]] | None
        if h.typeflag == GNU_SPARSE:
            fragments = self._old_gnu_map(h, block, fmt, budget)
        else:
            fragments = self._pax_sparse_map(h, budget)
        if fragments is None:
            return
        if h.typeflag in HEADER_ONLY or not _valid_sparse(fragments, h.size):
            raise self._error(f"entry {h.name!r} has an invalid sparse map")
        h.sparse = [(o, n) for o, n in fragments if n]

    def _old_gnu_map(
        self, h: Header, block: bytes, fmt: str, budget: int
    ) -> list[tuple[int, int]]:
        if fmt != _GNU:
            raise self._error(f"entry {h.name!r}: a GNU sparse entry in a non-GNU header")
        size = _numeric(block[483:495])
        if size is None:
            raise self._error(f"entry {h.name!r}: corrupt sparse real size")
        h.size = size
        fragments: list[tuple[int, int]] = []
        area, count = block[386:483], 4
        while True:
            for i in range(count):
                entry = area[i * 24 : i * 24 + 24]
                if entry[0] == 0:
                    break
                offset, length = _numeric(entry[:12]), _numeric(entry[12:])
                if offset is None or length is None:
                    raise self._error(f"entry {h.name!r}: corrupt sparse map")
                fragments.append((offset, length))
            if not area[count * 24]:
                return fragments
            budget -= BLOCK
            if budget < 0:
                raise self._error(f"entry {h.name!r}: its sparse map is too large")
            area, count = self.input.read(BLOCK), 21

    def _pax_sparse_map(self, h: Header, budget: int) -> list[tuple[int, int]] | None:
        records = h.pax
        major = records.get(b"GNU.sparse.major", b"")
        minor = records.get(b"GNU.sparse.minor", b"")
        if major == b"0" and minor in (b"0", b"1"):
            v1 = False
        elif major == b"1" and minor == b"0":
            v1 = True
        elif major or minor:
            return None  # an unknown version: not sparse, as for Go
        elif records.get(_SPARSE_MAP):
            v1 = False  # 0.0 and 0.1 carry no version records
        else:
            return None
        if name := records.get(b"GNU.sparse.name"):
            h.name = name
        if size := records.get(b"GNU.sparse.size") or records.get(b"GNU.sparse.realsize"):
            n = _go_int(size)
            if n is None:
                raise self._error(f"entry {h.name!r}: corrupt GNU.sparse size")
            h.size = n
        if v1:
            return self._sparse_map_1x0(h, budget)
        return self._sparse_map_0x1(h, records)

    def _sparse_map_1x0(self, h: Header, budget: int) -> list[tuple[int, int]]:
        """The map at the start of the data: decimal numbers, one a line, in blocks."""
        buf = bytearray()
        newlines = 0
        pos = 0

        def feed(lines: int) -> None:
            nonlocal newlines
            while newlines < lines:
                if self._remaining < BLOCK or len(buf) + BLOCK > budget:
                    raise self._error(f"entry {h.name!r}: truncated or oversized sparse map")
                data = self.input.read(BLOCK)
                self._remaining -= BLOCK
                buf.extend(data)
                newlines += data.count(b"\n")

        def token() -> int | None:
            nonlocal pos, newlines
            end = buf.index(b"\n", pos)
            value = _go_int(bytes(buf[pos:end]))
            pos = end + 1
            newlines -= 1
            return value

        feed(1)
        count = token()
        if count is None or count < 0:
            raise self._error(f"entry {h.name!r}: corrupt sparse map")
        feed(2 * count)
        fragments = []
        for _ in range(count):
            offset, length = token(), token()
            if offset is None or length is None:
                raise self._error(f"entry {h.name!r}: corrupt sparse map")
            fragments.append((offset, length))
        return fragments

    def _sparse_map_0x1(self, h: Header, records: dict[bytes, bytes]) -> list[tuple[int, int]]:
        count = _go_int(records.get(b"GNU.sparse.numblocks", b""))
        numbers = records.get(_SPARSE_MAP, b"").split(b",")
        if numbers == [b""]:
            numbers = []
        if count is None or count < 0 or len(numbers) != 2 * count:
            raise self._error(f"entry {h.name!r}: corrupt sparse map")
        values = [_go_int(n) for n in numbers]
        if None in values:
            raise self._error(f"entry {h.name!r}: corrupt sparse map")
        return list(zip(values[0::2], values[1::2], strict=True))  # type: ignore[arg-type]

    # -- data -------------------------------------------------------------------------

    def write_to(self, fd: int, h: Header) -> None:
        """Write the current entry's data to the new, empty file ``fd``.

        A sparse file's holes stay holes: only its data fragments are written, at their
        offsets, and the file is truncated to its size. Its fragments must account for
        exactly the data in the archive (Go fails such a read either way).
        """
        if h.sparse is None:
            if self._remaining:
                self.input.copy(fd, self._remaining)
                self._remaining = 0
            return
        if sum(n for _, n in h.sparse) != self._remaining:
            raise self._error(
                f"entry {h.name!r}: its sparse map does not match its {self._remaining}"
                " bytes of data"
            )
        for offset, length in h.sparse:
            os.lseek(fd, offset, os.SEEK_SET)
            self.input.copy(fd, length)
            self._remaining -= length
        os.ftruncate(fd, h.size)


def _cstring(data: bytes) -> bytes:
    return data.split(b"\0", 1)[0]


def _octal(field: bytes) -> int | None:
    """Go's ``parseOctal``: trim spaces and NULs on both ends, cut at a NUL, digits 0-7."""
    if m := _PLAIN_OCTAL.fullmatch(field):  # the common shape, same result, faster
        return int(m[1] or b"0", 8)
    text = _cstring(field.strip(b" \0"))
    if not text:
        return 0
    if not _OCTAL.fullmatch(text):
        return None
    value = int(text, 8)
    if value >= 2**64:
        return None
    return value - 2**64 if value > _INT64_MAX else value  # Go's int64(uint64)


@functools.lru_cache(maxsize=4096)  # headers repeat the same modes, ids and sizes
def _numeric(field: bytes) -> int | None:
    """Go's ``parseNumeric``: base-256 (two's complement) or octal; ``None`` if invalid."""
    if field and field[0] & 0x80:
        inv = 0xFF if field[0] & 0x40 else 0
        value = 0
        for i, c in enumerate(field):
            c ^= inv
            if i == 0:
                c &= 0x7F
            if value >> 56:
                return None
            value = value << 8 | c
        if value >> 63:
            return None
        return ~value if inv else value
    return _octal(field)


def _go_int(text: bytes) -> int | None:
    """Go's ``strconv.ParseInt(text, 10, 64)``: an optional sign and decimal digits."""
    if not _DECIMAL.fullmatch(text):
        return None
    value = int(text)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def _pax_time_ns(value: bytes) -> int | None:
    """Go's ``parsePAXTime``, in nanoseconds."""
    whole, _, frac = value.partition(b".")
    secs = _go_int(whole)
    if secs is None or not _DIGITS.fullmatch(frac):
        return None
    ns = int((frac + b"000000000")[:9]) if frac else 0
    return secs * 1_000_000_000 + (-ns if whole.startswith(b"-") else ns)


# Reader._next_plain's header: mode, uid, gid, size, mtime, then the checksum as six digits,
# NUL, space; type ``0``; an empty link name.
_PLAIN_FIELDS: Final = re.compile(
    rb"([0-7]{7})\0([0-7]{7})\0([0-7]{7})\0([0-7]{11})\0([0-7]{11})\0([0-7]{6})\0 0\0"
)
_USTAR_MAGIC: Final = b"ustar\x0000"
_STAR_TRAILER: Final = b"tar\0"
_ZERO_DEVICES: Final = frozenset({b"0000000\0" * 2, bytes(16)})
# The byte sum of the checksum field's NUL and space (its digits are added per header),
# less the eight spaces the sum counts in its place.
_PLAIN_CHKSUM_BYTES: Final = 0 + 32 - 8 * 32

# name mode uid gid size mtime chksum typeflag linkname
_FIELDS: Final = (("mode", 100, 8), ("uid", 108, 8), ("gid", 116, 8), ("size", 124, 12),
                  ("mtime", 136, 12))  # fmt: skip


def _byte_sum(block: bytes) -> int:
    """``sum(block)`` of a 512-byte block, in C: the Adler-32 of each half started at 0 is
    its byte sum modulo 65521, and 256 bytes sum to at most 65280."""
    return (zlib.adler32(block[:256], 0) & 0xFFFF) + (zlib.adler32(block[256:], 0) & 0xFFFF)


def _field(
    block: bytes, what: str, offset: int, width: int, name: bytes,
    error: Callable[[str], Exception],
) -> int:  # fmt: skip
    value = _numeric(block[offset : offset + width])
    if value is None:
        raise error(f"corrupt {what} field in the tar header of {name!r}")
    return value


def _parse_block(block: bytes, error: Callable[[str], Exception]) -> tuple[Header, str]:
    """Go's ``readHeader`` for one 512-byte block: the header and its format."""
    chksum = block[148:156]
    stored = _octal(chksum)
    unsigned = _byte_sum(block) - sum(chksum) + 8 * 32  # the field itself as spaces
    if stored != unsigned:
        high = sum(1 for b in block if b > 127) - sum(1 for b in chksum if b > 127)
        if stored is None or stored != unsigned - 256 * high:  # Sun tar's signed bytes
            raise error("tar header checksum mismatch (corrupt archive)")
    magic, version, trailer = block[257:263], block[263:265], block[508:512]
    if magic == b"ustar\0":
        fmt = _STAR if trailer == b"tar\0" else _USTAR
    elif magic == b"ustar " and version == b" \0":
        fmt = _GNU
    else:
        fmt = _V7
    name = block[:100]
    if (i := name.find(0)) >= 0:
        name = name[:i]
    linkname = block[157:257]
    if (i := linkname.find(0)) >= 0:
        linkname = linkname[:i]
    numeric = _numeric
    mode = numeric(block[100:108])
    uid = numeric(block[108:116])
    gid = numeric(block[116:124])
    size = numeric(block[124:136])
    mtime = numeric(block[136:148])
    if mode is None or uid is None or gid is None or size is None or mtime is None:
        for what, offset, width in _FIELDS:
            _field(block, what, offset, width, name, error)
        raise AssertionError("unreachable")  # pragma: no cover
    if fmt == _V7:
        h = Header(name, block[156:157], mode, uid, gid, size, mtime * 1_000_000_000, linkname)
        return h, fmt

    def number(what: str, offset: int, width: int) -> int:
        return _field(block, what, offset, width, name, error)

    devmajor = numeric(block[329:337])
    devminor = numeric(block[337:345])
    if devmajor is None or devminor is None:
        _field(block, "devmajor", 329, 8, name, error)
        _field(block, "devminor", 337, 8, name, error)
        raise AssertionError("unreachable")  # pragma: no cover
    h = Header(
        name, block[156:157], mode, uid, gid, size, mtime * 1_000_000_000, linkname,
        devmajor, devminor,
    )  # fmt: skip
    prefix = b""
    if fmt == _USTAR:
        if block[345]:
            prefix = _cstring(block[345:500])
    elif fmt == _STAR:
        prefix = _cstring(block[345:476])
        number("atime", 476, 12)
        number("ctime", 488, 12)
    else:
        times = [block[o : o + 12] for o in (345, 357) if block[o]]
        if any(_numeric(t) is None for t in times):
            # Written by Go before 1.8 with a ustar prefix in a GNU header.
            text = _cstring(block[345:500])
            if all(c < 0x80 for c in text):
                prefix = text
    if prefix:
        h.name = prefix + b"/" + name
    return h, fmt


def _parse_pax(data: bytes, error: Callable[[str], Exception]) -> dict[bytes, bytes]:
    """Go's ``parsePAX``: ``"%d %s=%s\\n"`` records; 0.0 sparse pairs become a map."""
    records: dict[bytes, bytes] = {}
    sparse: list[bytes] = []
    rest = data
    while rest:
        length_text, space, after = rest.partition(b" ")
        n = _go_int(length_text) if space else None
        if n is None or n < 5 or n > len(rest):
            raise error("corrupt PAX header: bad record length")
        n -= len(length_text) + 1
        if n <= 0 or after[n - 1 : n] != b"\n":
            raise error("corrupt PAX header: a record does not end in a newline")
        record, rest = after[: n - 1], after[n:]
        key, eq, value = record.partition(b"=")
        if not eq or not key:
            raise error("corrupt PAX header: a record without a key")
        if key in (b"path", b"linkpath", b"uname", b"gname"):
            if b"\0" in value:
                raise error(f"corrupt PAX header: {key.decode()} holds a NUL byte")
        elif b"\0" in key:
            raise error("corrupt PAX header: a key holds a NUL byte")
        if key in (b"GNU.sparse.offset", b"GNU.sparse.numbytes"):
            want = b"GNU.sparse.offset" if len(sparse) % 2 == 0 else b"GNU.sparse.numbytes"
            if key != want or b"," in value:
                raise error("corrupt PAX header: GNU sparse records out of order")
            sparse.append(value)
        else:
            records[key] = value
    if sparse:
        records[_SPARSE_MAP] = b",".join(sparse)
    return records


def _valid_sparse(fragments: list[tuple[int, int]], size: int) -> bool:
    """Go's ``validateSparseEntries``: in order, not overlapping, inside ``size``."""
    if size < 0:
        return False
    end = 0
    for offset, length in fragments:
        if offset < 0 or length < 0 or offset > _INT64_MAX - length:
            return False
        if offset + length > size or end > offset:
            return False
        end = offset + length
    return True


class _Input:
    """The tar byte stream: buffered reads, hashed and counted as they are taken."""

    __slots__ = ("_stream", "_hasher", "_on_progress", "buf", "view", "pos", "total", "_name")

    def __init__(
        self,
        stream: compression.Readable,
        on_progress: Callable[[int], None] | None,
        name: str,
    ):
        self._stream = stream
        # A read-ahead stream hashes what it reads on its own thread.
        self._hasher: digests.Hasher | None = (
            None if isinstance(stream, readahead.Readahead) else digests.Hasher("sha256")
        )
        self._on_progress = on_progress
        self._name = name
        self.buf = b""
        self.view = memoryview(self.buf)
        self.pos = 0
        self.total = 0

    def _fill(self) -> bool:
        data = self._stream.read(_CHUNK)
        if not data:
            return False
        if self._hasher is not None:
            self._hasher.update(data)
        self.total += len(data)
        self.buf = data
        self.view = memoryview(data)
        self.pos = 0
        if self._on_progress is not None:
            self._on_progress(self.total)
        return True

    def _truncated(self) -> errors.UnsafeLayer:
        return errors.UnsafeLayer(f"{self._name}: truncated tar archive after {self.total} bytes")

    def peek(self, skip: int = 0) -> bytes | None:
        """The 512-byte block after the next ``skip`` bytes if the buffer holds it (nothing
        is consumed), else ``None``."""
        pos = self.pos + skip
        end = pos + BLOCK
        return self.buf[pos:end] if end <= len(self.buf) else None

    def header(self, skip: int = 0) -> bytes | None:
        """Skip ``skip`` bytes, then the next 512-byte block, or ``None`` at a clean end of
        stream."""
        block = self.peek(skip)
        if block is not None:  # all in the buffer: the common case
            self.pos += skip + BLOCK
            return block
        self.skip(skip)
        if self.pos >= len(self.buf) and not self._fill():
            return None
        return self.read(BLOCK)

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end <= len(self.buf):
            data = self.buf[self.pos : end]
            self.pos = end
            return data
        parts = [self.buf[self.pos :]]
        need = n - len(parts[0])
        self.pos = len(self.buf)
        while need > 0:
            if not self._fill():
                raise self._truncated()
            part = self.buf[:need]
            parts.append(part)
            self.pos = len(part)
            need -= len(part)
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n > 0:
            avail = len(self.buf) - self.pos
            if avail <= 0:
                if not self._fill():
                    raise self._truncated()
                continue
            k = min(avail, n)
            self.pos += k
            n -= k

    def copy(self, fd: int, n: int) -> None:
        """Write the next ``n`` bytes to ``fd``."""
        write = os.write
        pos = self.pos
        if 0 < n <= len(self.buf) - pos:  # all of it in the buffer: the common case
            written = write(fd, self.view[pos : pos + n])
            self.pos = pos + written
            n -= written
        while n > 0:
            avail = len(self.buf) - self.pos
            if avail <= 0:
                if not self._fill():
                    raise self._truncated()
                continue
            k = min(avail, n)
            chunk = self.view[self.pos : self.pos + k]
            while chunk:
                written = write(fd, chunk)
                chunk = chunk[written:]
            self.pos += k
            n -= k

    def drain(self) -> None:
        self.pos = len(self.buf)
        while self._fill():
            self.pos = len(self.buf)

    def digest(self) -> digests.Digest:
        if self._hasher is None:
            return cast(readahead.Readahead, self._stream).digest()
        return self._hasher.digest()
