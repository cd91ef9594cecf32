"""The operator's Kubernetes API calls: the shared client of :mod:`agent.kube.client`.

NodeImageSet spec writes go through :mod:`.writing`; errors are :mod:`agent.kube.errors`
(re-exported by :mod:`.errors`).
"""

from __future__ import annotations

from collections.abc import Callable

from agent.kube import client
from agent.kube.client import (
    JSON,
    Connection,
    configmap_path,
    daemonset_path,
    lease_path,
    load_connection,
    node_set_path,
    pods_path,
    prefetch_path,
    secret_path,
)

CONFLICT_RETRIES = 10
USER_AGENT = "image-prefetcher-operator"

__all__ = ["CONFLICT_RETRIES", "JSON", "Client", "Connection", "configmap_path",
           "daemonset_path", "lease_path", "load_connection", "node_set_path", "pods_path",
           "prefetch_path", "secret_path"]


class Client(client.Client):
    """The shared client, as the operator."""

    def __init__(self, connection: Connection, *, timeout: float = 30.0,
                 on_error: Callable[[str, int | str], None] | None = None) -> None:
        super().__init__(connection, user_agent=USER_AGENT, timeout=timeout, on_error=on_error)
