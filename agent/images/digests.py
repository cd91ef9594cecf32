"""Content digests (``sha256:<hex>``, ``sha512:<hex>``), streaming hashers, and layer chain IDs.

A digest is always verified with its own algorithm (:meth:`Digest.hasher`); chain IDs are
SHA-256, as the OCI spec defines them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from agent.images import errors

_ALGORITHMS = {"sha256": 64, "sha512": 128}
_DIGEST = re.compile(r"^(sha256|sha512):([a-f0-9]+)$")


class Digest(str):
    """A validated OCI digest string: ``algorithm:hex``.

    It *is* a ``str`` (so it serialises and compares as one), with the parts as properties.
    """

    __slots__ = ()

    def __new__(cls, value: str) -> Digest:
        m = _DIGEST.match(value)
        if not m or len(m.group(2)) != _ALGORITHMS[m.group(1)]:
            raise errors.InvalidReference(
                f"invalid digest {value!r}: expected 'sha256:' followed by 64 lowercase hex"
                " digits (or 'sha512:' and 128)"
            )
        return super().__new__(cls, value)

    @property
    def algorithm(self) -> str:
        return self.split(":", 1)[0]

    @property
    def hex(self) -> str:
        return self.split(":", 1)[1]

    @property
    def short(self) -> str:
        """The first 12 hex digits, as ``docker images`` shows them."""
        return self.hex[:12]

    def hasher(self) -> Hasher:
        """A hasher of this digest's algorithm."""
        return Hasher(self.algorithm)


def is_digest(value: str) -> bool:
    """Whether ``value`` is a well-formed digest."""
    m = _DIGEST.match(value)
    return m is not None and len(m.group(2)) == _ALGORITHMS[m.group(1)]


class Hasher:
    """An incremental hasher that yields a :class:`Digest`."""

    __slots__ = ("_h", "algorithm")

    def __init__(self, algorithm: str = "sha256"):
        if algorithm not in _ALGORITHMS:
            raise errors.InvalidReference(f"unsupported digest algorithm {algorithm!r}")
        self.algorithm = algorithm
        self._h = hashlib.new(algorithm)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._h.update(data)

    def digest(self) -> Digest:
        return Digest(f"{self.algorithm}:{self._h.hexdigest()}")

    def copy(self) -> Hasher:
        clone = Hasher.__new__(Hasher)
        clone.algorithm = self.algorithm
        clone._h = self._h.copy()
        return clone


def of(data: bytes, algorithm: str = "sha256") -> Digest:
    """The digest of ``data``."""
    h = Hasher(algorithm)
    h.update(data)
    return h.digest()


def chain_ids(diff_ids: Iterable[str]) -> list[Digest]:
    """The chain ID of each layer stack, bottom first.

    ``ChainID(L0) = DiffID(L0)`` and
    ``ChainID(L0..Ln) = sha256(ChainID(L0..Ln-1) + " " + DiffID(Ln))``, as the OCI spec defines it.
    """
    out: list[Digest] = []
    for diff_id in diff_ids:
        d = Digest(diff_id)
        if not out:
            out.append(d)
        else:
            out.append(of(f"{out[-1]} {d}".encode()))
    return out
