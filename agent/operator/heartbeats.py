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
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.kube import client as kube_client
from agent.kube import errors, leases

logger = logging.getLogger("agent.operator")

#: Seconds between checks for heartbeats that went stale.
EXPIRY_CHECK = 1.0


class Heartbeats:
    """Observed agent heartbeats, by node. Thread-safe: the watch may run on a thread of its
    own (:class:`Watcher`) while the reconciles ask on the operator's loop."""

    def __init__(self, timeout: float, *, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[str], None] | None = None) -> None:
        self.timeout = timeout
        self.clock = clock
        #: Called with a node name when its agent became alive or dead (on the thread that
        #: observed it; :class:`Watcher` hands it to the operator's loop).
        self.on_change = on_change
        self._seen: dict[str, tuple[Any, float]] = {}  # node -> (renewTime, observed at)
        self._alive: set[str] = set()
        self._lock = threading.Lock()

    # The API for the status code.

    def alive(self, node: str, now: float | None = None) -> bool:
        """Whether ``node``'s agent renewed its heartbeat within the timeout (as observed)."""
        seen = self._seen.get(node)
        return seen is not None and (now if now is not None else self.clock()) - seen[1] \
            < self.timeout

    def alive_nodes(self) -> set[str]:
        """Every node with a live agent, as of the last check (at every observation, and
        every :data:`EXPIRY_CHECK` seconds): a copy, not a scan of every node."""
        with self._lock:
            return set(self._alive)

    def known(self, node: str) -> bool:
        """Whether ``node``'s agent ever wrote a heartbeat this process saw."""
        return node in self._seen

    def unknown(self, nodes: set[str]) -> set[str]:
        """Those of ``nodes`` whose agent never wrote a heartbeat this process saw."""
        with self._lock:
            return nodes - self._seen.keys()

    # Input.

    def observe(self, event_type: str, lease: Mapping[str, Any]) -> None:
        node = leases.heartbeat_node(lease)
        if node is None:
            return
        with self._lock:
            if event_type == "DELETED":
                self._seen.pop(node, None)
            else:
                renew = (lease.get("spec") or {}).get("renewTime")
                old = self._seen.get(node)
                if old is None or old[0] != renew:
                    self._seen[node] = (renew, self.clock())
        self.check(nodes=(node,))

    def forget_absent(self, present: set[str]) -> None:
        """Forget the nodes not in ``present`` (a relist did not find their Lease)."""
        with self._lock:
            gone = [n for n in self._seen if n not in present]
            for node in gone:
                del self._seen[node]
        self.check(nodes=tuple(gone))

    def check(self, nodes: tuple[str, ...] | None = None) -> None:
        """Report nodes whose liveness changed (all nodes when ``nodes`` is None)."""
        changed: list[tuple[str, bool]] = []
        with self._lock:
            now = self.clock()
            for node in nodes if nodes is not None else (*self._seen, *self._alive):
                alive = self.alive(node, now)
                if alive != (node in self._alive):
                    if alive:
                        self._alive.add(node)
                    else:
                        self._alive.discard(node)
                    changed.append((node, alive))
        for node, alive in changed:
            if not alive:
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
        self.forget_absent(present)
        return version

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(EXPIRY_CHECK)
            self.check()


class Watcher:
    """:meth:`Heartbeats.run` on a thread of its own, with its own event loop and client.

    The operator judges an agent dead when it has not OBSERVED a renewal for
    ``agent_heartbeat_timeout``; observed must mean received. Watched on the operator's
    loop, a renewal waits behind whatever keeps that loop busy (at 5,000 nodes, seconds of
    reconciles and kopf's watch events), and its observation time is that of the delay,
    not of the renewal: agents that renewed on time were judged dead. On this thread the
    Lease watch reads and records renewals as they arrive, and the expiry checks run on
    time; the reconciles only read the result (:meth:`Heartbeats.alive_nodes`). A change
    of liveness reaches ``on_change`` on the operator's loop."""

    def __init__(self, beats: Heartbeats, make_client: Callable[[], kube_client.Client],
                 namespace: str) -> None:
        self.beats = beats
        self.make_client = make_client
        self.namespace = namespace
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._main, name="heartbeats", daemon=True)
        self._caller: asyncio.AbstractEventLoop | None = None
        self._primed: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Start the thread; return once every heartbeat Lease was listed once (before the
        first reconcile: until then every agent would look dead) or that list failed (the
        watch lists them again)."""
        self._caller = caller = asyncio.get_running_loop()
        self._primed = caller.create_future()
        report = self.beats.on_change
        if report is not None:
            def on_change(node: str) -> None:
                with contextlib.suppress(RuntimeError):  # the operator's loop ended
                    caller.call_soon_threadsafe(report, node)
            self.beats.on_change = on_change
        self._thread.start()
        await self._primed

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching; blocks until the thread ended (at most ``timeout`` seconds)."""
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _primed_now(self) -> None:
        def tell() -> None:
            if self._primed is not None and not self._primed.done():
                self._primed.set_result(None)
        if self._caller is not None:
            with contextlib.suppress(RuntimeError):
                self._caller.call_soon_threadsafe(tell)

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self._run())
        finally:
            self._primed_now()  # never leave the operator waiting
            self._loop.close()

    async def _run(self) -> None:
        client = self.make_client()
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            priming = asyncio.create_task(self.beats.prime(client, self.namespace))
            await asyncio.wait({priming, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not priming.done():
                priming.cancel()
                await asyncio.gather(priming, return_exceptions=True)
                return
            try:
                version = priming.result()
            except errors.APIError as e:  # the watch lists them again
                logger.warning(f"cannot list the agents' heartbeat Leases yet: {e}")
                version = ""
            self._primed_now()
            watching = asyncio.create_task(self.beats.run(client, self.namespace, version))
            await asyncio.wait({watching, stopping}, return_when=asyncio.FIRST_COMPLETED)
            watching.cancel()
            await asyncio.gather(watching, return_exceptions=True)
        finally:
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
            await client.aclose()
