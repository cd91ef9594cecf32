"""``Leases``: what in-flight pulls hold, so the store's garbage collector keeps it.

A pull takes a lease (:meth:`Leases.held`) for its whole run and adds each blob digest and
chain ID to it (:meth:`Leases.hold`) *before* it looks for or stores that content. The
collector asks :meth:`Leases.is_leased` under :attr:`Leases.lock` at the moment it deletes
something, the same lock ``hold`` takes, so a delete and a lease never interleave: a pull
never loses what it found present. This is containerd's lease manager, in memory, for one
process (another process's pulls are not seen: the store's file lock keeps GC out then).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

#: The names one pull holds (blob digests and chain IDs, as strings).
Lease = set[str]


class Leases:
    """The leases of the pulls in flight in this process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._held: dict[int, Lease] = {}

    @contextlib.contextmanager
    def held(self) -> Iterator[Lease]:
        """A lease for the duration of the block; released on the way out."""
        lease: Lease = set()
        token = id(lease)
        with self.lock:
            self._held[token] = lease
        try:
            yield lease
        finally:
            with self.lock:
                del self._held[token]

    def hold(self, lease: Lease, *names: object) -> None:
        """Add ``names`` to ``lease``: call it before looking for or storing them."""
        with self.lock:
            lease.update(str(n) for n in names)

    def is_leased(self, name: str, *, besides: Lease | None = None) -> bool:
        """Whether a pull in flight (other than ``besides``) holds ``name``. Call with
        :attr:`lock` held."""
        return any(name in lease for lease in self._held.values() if lease is not besides)
