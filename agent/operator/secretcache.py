"""Pull secrets as the operator last read them, re-read at most every
``operator.secret_refresh_interval``.

Every reconcile needs the prefetch's pull secrets (the source in the user's namespace, and
its copy in the operator namespace). Reading both on every reconcile costs two GETs per
secret per reconcile, forever. A watch would need ``list``/``watch`` on every Secret of the
cluster (and memory for all of them); this cache keeps only the secrets prefetches name, and
reads each again when its entry is older than the refresh interval, so a changed source
reaches its copy within that interval. The operator's own writes update the cache; a 409
on a write drops the entry (the next read is fresh).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.kube import client as kube_client

JSON = dict[str, Any]


class SecretCache:
    """GET-through cache of Secrets by API path."""

    def __init__(self, client: kube_client.Client, refresh: float, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.client = client
        self.refresh = refresh
        self.clock = clock
        self._entries: dict[str, tuple[float, JSON | None]] = {}

    async def get(self, path: str) -> JSON | None:
        """The Secret at ``path`` (None: it does not exist), read at most ``refresh`` ago."""
        cached = self._entries.get(path)
        if cached is not None and self.clock() - cached[0] < self.refresh:
            return cached[1]
        body = await self.client.get(path)
        self._entries[path] = (self.clock(), body)
        return body

    def wrote(self, path: str, body: JSON | None) -> None:
        """We wrote ``body`` at ``path`` (None: deleted it)."""
        self._entries[path] = (self.clock(), body)

    def forget(self, path: str) -> None:
        """Read ``path`` afresh next time (a write conflicted: someone else changed it)."""
        self._entries.pop(path, None)
