"""The agent's Kubernetes API calls: the shared client of :mod:`agent.kube.client`.

Everything the agent does to the API: ``GET`` its own NodeImageSet, ``PATCH`` its
``/status``, renew its node's heartbeat Lease (:mod:`agent.kube.leases`), ``GET``
pull-secret copies in the operator namespace, ``POST`` Events.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from agent.kube import client
from agent.kube.client import (
    CLUSTER_EVENTS_NAMESPACE,
    JSON,
    Connection,
    lease_path,
    load_connection,
    node_set_path,
    secret_path,
)
from agent.kube.errors import APIError

USER_AGENT = "image-prefetcher-agent"

__all__ = ["CLUSTER_EVENTS_NAMESPACE", "JSON", "APIError", "Client", "Connection",
           "lease_path", "load_connection", "node_set_path", "secret_path"]


class Client(client.Client):
    """The shared client, as the agent."""

    def __init__(self, connection: Connection, *, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        super().__init__(connection, user_agent=USER_AGENT, timeout=timeout,
                         transport=transport)

    async def patch_status(self, node: str, status: Mapping[str, Any]) -> JSON:
        """Merge-patch ``status`` into the node's NodeImageSet (the status subresource)."""
        return await self.merge_patch(node_set_path(node, "status"), {"status": dict(status)})
