"""Raw tar bytes for the cases no well-behaved writer produces: patched header fields, PAX
records in odd places, STAR and GNU variants, GNU sparse members.

Builds on :mod:`fixtures.layers` (its ``header`` writes a correct ustar block); the helpers
here patch a block and fix its checksum, and pad data to blocks.
"""

from __future__ import annotations

from fixtures import layers as L

END = bytes(1024)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def checksum(block: bytes | bytearray) -> bytes:
    """``block`` with its checksum field recomputed."""
    b = bytearray(block)
    b[148:156] = b" " * 8
    b[148:156] = b"%06o\0 " % sum(b)
    return bytes(b)


def patch(block: bytes, offset: int, value: bytes) -> bytes:
    """``block`` with ``value`` written at ``offset`` and a fresh checksum."""
    b = bytearray(block)
    b[offset : offset + len(value)] = value
    return checksum(b)


def entry(name: bytes, data: bytes = b"", **fields: object) -> bytes:
    """A plain ustar entry: header and padded data."""
    return L.header(name, size=len(data), **fields) + pad(data)  # type: ignore[arg-type]


def pax(records: dict[bytes, bytes], *, type: bytes = b"x", name: bytes = b"pax") -> bytes:
    """A PAX extended (``x``) or global (``g``) header with its records."""
    data = L.pax_records(records)
    return L.header(name, type=type, size=len(data)) + pad(data)


def gnu(block: bytes) -> bytes:
    """``block`` as an old GNU header (magic ``"ustar  \\0"``)."""
    return patch(block, 257, b"ustar  \0")


def star(block: bytes, prefix: bytes) -> bytes:
    """``block`` as a STAR header: 131-byte prefix, numeric atime/ctime, ``tar\\0`` trailer."""
    b = bytearray(block)
    b[345:476] = prefix.ljust(131, b"\0")[:131]
    b[476:488] = b"%011o\0" % L.MTIME
    b[488:500] = b"%011o\0" % L.MTIME
    b[508:512] = b"tar\0"
    return checksum(b)


def gnu_sparse(name: bytes, chunks: list[tuple[int, bytes]], real_size: int) -> bytes:
    """An old GNU sparse member (type ``S``): ``chunks`` are (offset, data) pairs, at most
    four (the header's own sparse map); the rest of the ``real_size`` bytes are holes."""
    stored = b"".join(data for _, data in chunks)
    b = bytearray(L.header(name, type=b"S", size=len(stored)))
    b[257:265] = b"ustar  \0"
    for i, (offset, data) in enumerate(chunks):
        at = 386 + 24 * i
        b[at : at + 12] = b"%011o\0" % offset
        b[at + 12 : at + 24] = b"%011o\0" % len(data)
    b[483:495] = b"%011o\0" % real_size
    return checksum(b) + pad(stored)


def pax_sparse(name: bytes, chunks: list[tuple[int, bytes]], real_size: int) -> bytes:
    """A PAX format 1.0 GNU sparse member: the map leads the data, in decimal lines."""
    stored = b"".join(data for _, data in chunks)
    sparse_map = b"%d\n" % len(chunks)
    for offset, data in chunks:
        sparse_map += b"%d\n%d\n" % (offset, len(data))
    body = pad(sparse_map) + stored
    records = {
        b"GNU.sparse.major": b"1",
        b"GNU.sparse.minor": b"0",
        b"GNU.sparse.name": name,
        b"GNU.sparse.realsize": b"%d" % real_size,
    }
    return pax(records) + L.header(b"GNUSparseFile.0/" + name, size=len(body)) + pad(body)


def pax_sparse_01(name: bytes, chunks: list[tuple[int, bytes]], real_size: int) -> bytes:
    """A PAX format 0.1 GNU sparse member: the map in a ``GNU.sparse.map`` record."""
    stored = b"".join(data for _, data in chunks)
    sparse_map = b",".join(b"%d,%d" % (offset, len(data)) for offset, data in chunks)
    records = {
        b"GNU.sparse.size": b"%d" % real_size,
        b"GNU.sparse.numblocks": b"%d" % len(chunks),
        b"GNU.sparse.map": sparse_map,
        b"GNU.sparse.name": name,
    }
    return pax(records) + L.header(b"GNUSparseFile.0/" + name, size=len(stored)) + pad(stored)
