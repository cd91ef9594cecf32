"""Which nodes have a live agent: the agents' heartbeat Leases, as this operator saw them.

Each agent renews a Lease in the operator namespace (:class:`agent.kube.leases.Heartbeat`,
like the kubelet's node leases). :class:`Heartbeats` watches them and records, per node,
WHEN THIS PROCESS OBSERVED the last renewal (its own monotonic clock), never the agent's
``renewTime``: a node's clock may be off. A node is alive while its last observed renewal is
younger than ``operator.agent_heartbeat_timeout``. The first observation of a Lease (at
start, or after a relist) counts as a renewal, as the node lifecycle controller does.

The status code asks :meth:`Heartbeats.alive` (one node) or :meth:`Heartbeats.alive_nodes`.
A renewal never wakes a prefetch; only a node whose liveness changes does
(:attr:`Heartbeats.on_change`), checked every second by :meth:`Heartbeats.run`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.kube import client as kube_client
from agent.kube import errors, leases

logger = logging.getLogger("agent.operator")

#: Seconds between checks for heartbeats that went stale.
EXPIRY_CHECK = 1.0


class Heartbeats:
    """Observed agent heartbeats, by node."""

    def __init__(self, timeout: float, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.timeout = timeout
        self.clock = clock
        #: Called with a node name when its agent became alive or dead.
        self.on_change = on_change
        self._seen: dict[str, tuple[Any, float]] = {}  # node -> (renewTime, observed at)
        self._alive: set[str] = set()

    # The API for the status code.

    def alive(self, node: str, now: float | None = None) -> bool:
        """Whether ``node``'s agent renewed its heartbeat within the timeout (as observed)."""
        seen = self._seen.get(node)
        return seen is not None and (now if now is not None else self.clock()) - seen[1] \
            < self.timeout

    def alive_nodes(self, now: float | None = None) -> set[str]:
        """Every node with a live agent."""
        now = now if now is not None else self.clock()
        return {node for node in self._seen if self.alive(node, now)}

    def known(self, node: str) -> bool:
        """Whether ``node``'s agent ever wrote a heartbeat this process saw."""
        return node in self._seen

    # Input.

    def observe(self, event_type: str, lease: Mapping[str, Any]) -> None:
        node = leases.heartbeat_node(lease)
        if node is None:
            return
        if event_type == "DELETED":
            self._seen.pop(node, None)
        else:
            renew = (lease.get("spec") or {}).get("renewTime")
            old = self._seen.get(node)
            if old is None or old[0] != renew:
                self._seen[node] = (renew, self.clock())
        self.check(nodes=(node,))

    def check(self, nodes: tuple[str, ...] | None = None) -> None:
        """Report nodes whose liveness changed (all nodes when ``nodes`` is None)."""
        now = self.clock()
        for node in nodes if nodes is not None else (*self._seen, *self._alive):
            alive = self.alive(node, now)
            if alive != (node in self._alive):
                if alive:
                    self._alive.add(node)
                else:
                    self._alive.discard(node)
                    logger.info(f"the agent on node {node} stopped renewing its heartbeat")
                if self.on_change is not None:
                    self.on_change(node)

    # The watch.

    async def prime(self, client: kube_client.Client, namespace: str) -> str:
        """Observe every heartbeat Lease once (before the first reconcile: until then every
        agent would look dead); the list's resourceVersion, for :meth:`run`."""
        return await self._relist(client, kube_client.lease_path(namespace),
                                  leases.heartbeat_selector())

    async def run(self, client: kube_client.Client, namespace: str, version: str = "") -> None:
        """List (unless :meth:`prime` did, giving ``version``) and watch the heartbeat
        Leases of ``namespace`` until cancelled."""
        expiry = asyncio.create_task(self._expire())
        path = kube_client.lease_path(namespace)
        selector = leases.heartbeat_selector()
        try:
            while True:
                try:
                    if not version:
                        version = await self._relist(client, path, selector)
                    while True:
                        async for event in client.watch(path, version,
                                                        labelSelector=selector):
                            obj = event.get("object") or {}
                            version = (obj.get("metadata") or {}).get("resourceVersion") \
                                or version
                            if event.get("type") != "BOOKMARK":
                                self.observe(str(event.get("type")), obj)
                except errors.Gone:
                    version = ""  # relist
                    continue
                except errors.Unauthorized as e:
                    # A rotated token: the next request reads the token file again.
                    client.connection.token_rejected()
                    logger.warning(f"watching agent heartbeats: {e}; retrying")
                    version = ""
                    await asyncio.sleep(0.5)
                except errors.APIError as e:
                    logger.warning(f"watching agent heartbeats: {e}; retrying")
                    version = ""
                    await asyncio.sleep(2.0)
                except Exception as e:  # this watch is the only liveness
                    # source: ending here would make every agent AgentUnavailable for good.
                    logger.error(f"watching agent heartbeats failed: {e!r}; retrying")
                    version = ""
                    await asyncio.sleep(2.0)
        finally:
            expiry.cancel()

    async def _relist(self, client: kube_client.Client, path: str, selector: str) -> str:
        """Observe every heartbeat Lease (paginated); the list's resourceVersion."""
        present: set[str] = set()
        version, token = "", ""
        while True:
            params = {"labelSelector": selector, "limit": str(kube_client.PAGE_SIZE)}
            if token:
                params["continue"] = token
            result = await client.request("GET", path, params=params, verb="list")
            meta = result.get("metadata") or {}
            version = version or str(meta.get("resourceVersion") or "")
            for lease in result.get("items") or []:
                self.observe("ADDED", lease)
                present.add(leases.heartbeat_node(lease) or "")
            token = meta.get("continue") or ""
            if not token:
                break
        for node in [n for n in self._seen if n not in present]:
            del self._seen[node]
            self.check(nodes=(node,))
        return version

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK)
            self.check()
