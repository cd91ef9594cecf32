"""``KeyedLock``: one asyncio lock per key (a digest or chain ID), created on demand.

Concurrent pulls that need the same blob or layer take the same key, so the first one does
the work and the others find it done (containerd's ``kmutex``). Entries are dropped when no
task holds or waits for them, so the map does not grow with every digest ever seen.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class KeyedLock:
    """A lock per key."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        """Hold the lock for ``key`` for the duration of the ``async with`` block."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def held(self, key: str) -> bool:
        """Whether some task holds or waits for ``key``."""
        return key in self._locks

    def __len__(self) -> int:
        return len(self._locks)
