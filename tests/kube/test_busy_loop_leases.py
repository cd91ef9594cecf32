"""A busy operator keeps its Lease and judges agents by what they did, not by its own lag.

At 5,000 nodes the operator's event loop is busy for seconds at a time (reconciles, kopf's
watch events). The leader elector and the heartbeat Lease watch run on threads of their own
(:class:`agent.kube.leases.ElectorThread`, :class:`agent.operator.heartbeats.Watcher`), so
a loop blocked for longer than ``renew_deadline`` or than the heartbeat timeout neither
loses the leader Lease nor judges agents that kept renewing dead. Each test blocks the loop
with ``time.sleep`` (a stand-in for a long reconcile) and shows the same elector on the
loop itself losing, as it did before.
"""

from __future__ import annotations

import asyncio
import threading
import time

from agent.kube import client as kube_client
from agent.kube import connections, leases
from agent.operator import heartbeats

from .cluster import Cluster

NS = "prefetcher"
FAST = {"lease_duration": 1.5, "renew_deadline": 1.0, "retry_period": 0.1}


def holder(cluster: Cluster) -> tuple[str | None, str]:
    got = cluster.get(leases.API_VERSION, "leases", "operator", NS)
    assert got is not None
    return got["spec"].get("holderIdentity"), got["spec"]["renewTime"]


def test_a_leader_whose_loop_is_blocked_past_the_renew_deadline_keeps_its_lease(
        cluster: Cluster) -> None:
    lost: list[leases.LostLeadership] = []

    async def main() -> None:
        connection = connections.Connection(server=cluster.url)
        elector = leases.ElectorThread(lambda: kube_client.Client(connection), NS, "operator",
                                       "busy", on_lost=lost.append, **FAST)  # type: ignore[arg-type]
        await elector.acquire()
        _, renewed = holder(cluster)
        time.sleep(3.0)  # the loop is blocked for 3x renew_deadline (2x lease_duration)
        assert lost == []
        who, renewed_since = holder(cluster)
        assert who == "busy" and renewed_since > renewed  # renewed while the loop was blocked
        client = kube_client.Client(connection)
        try:  # a standby cannot take it
            assert not await leases.LeaderElector(client, NS, "operator", "standby",
                                                  **FAST).try_acquire_or_renew()  # type: ignore[arg-type]
        finally:
            await client.aclose()
        await asyncio.to_thread(elector.stop)  # a clean stop hands it over
        assert holder(cluster)[0] is None

    asyncio.run(main())
    assert lost == []


def test_on_the_loop_itself_the_same_block_loses_the_lease(cluster: Cluster) -> None:
    """The failure of the 5,000-node run, in small: the renewal waits behind the block, a
    standby takes the expired Lease meanwhile, and the leader learns it lost only after."""

    def standby() -> None:
        async def take() -> None:
            client = kube_client.Client(connections.Connection(server=cluster.url))
            try:
                await asyncio.wait_for(leases.LeaderElector(
                    client, NS, "operator", "standby", **FAST).acquire(), timeout=10)  # type: ignore[arg-type]
            finally:
                await client.aclose()
        asyncio.run(take())

    async def main() -> None:
        client = kube_client.Client(connections.Connection(server=cluster.url))
        try:
            elector = leases.LeaderElector(client, NS, "operator", "busy", **FAST)  # type: ignore[arg-type]
            await elector.acquire()
            keeping = asyncio.create_task(elector.keep())
            await asyncio.sleep(0.2)
            other = threading.Thread(target=standby)
            other.start()
            time.sleep(3.0)  # the loop is blocked; the standby runs on
            other.join()
            assert holder(cluster)[0] == "standby"
            await asyncio.wait_for(asyncio.gather(keeping, return_exceptions=True), 5)
            assert isinstance(keeping.exception(), leases.LostLeadership)
        finally:
            await client.aclose()

    asyncio.run(main())


def test_a_leader_that_loses_its_lease_learns_it_while_its_loop_is_blocked(
        cluster: Cluster) -> None:
    """Another holder took the Lease: ``on_lost`` runs on the elector's thread within the
    renew deadline, however long the loop stays blocked (the operator exits from there)."""
    lost = threading.Event()
    why: list[str] = []

    def on_lost(error: leases.LostLeadership) -> None:
        why.append(str(error))
        lost.set()

    async def main() -> None:
        elector = leases.ElectorThread(
            lambda: kube_client.Client(connections.Connection(server=cluster.url)), NS,
            "operator", "busy", on_lost=on_lost, **FAST)  # type: ignore[arg-type]
        await elector.acquire()
        lease = cluster.get(leases.API_VERSION, "leases", "operator", NS)
        assert lease is not None
        lease["spec"].update(holderIdentity="elsewhere", renewTime=leases.micro_time())
        cluster.put(leases.API_VERSION, "leases", lease)
        taken = time.monotonic()
        assert lost.wait(10)  # blocks the loop
        assert time.monotonic() - taken < FAST["renew_deadline"] + 2.0
        elector.stop()

    asyncio.run(main())
    assert "holder now: elsewhere" in why[0]


def test_agents_that_renew_are_alive_however_late_the_loop_looks(cluster: Cluster) -> None:
    """Agent ``steady`` renews every 0.2 s, ``gone`` renews once; the heartbeat timeout is
    1.5 s and the loop is blocked for 3 s. After the block ``steady`` is alive (its renewals
    were observed as they came) and was never reported dead; ``gone`` is dead."""
    cluster.put("v1", "namespaces", {"metadata": {"name": NS}})
    changes: list[tuple[str, bool]] = []
    stop = threading.Event()

    def agent() -> None:
        while not stop.is_set():
            cluster.renew_heartbeat("steady", NS)
            stop.wait(0.2)

    async def main() -> None:
        beats = heartbeats.Heartbeats(1.5)
        beats.on_change = lambda node: changes.append((node, beats.alive(node)))
        watcher = heartbeats.Watcher(
            beats, lambda: kube_client.Client(connections.Connection(server=cluster.url)), NS)
        renewing = threading.Thread(target=agent, daemon=True)
        renewing.start()
        try:
            cluster.renew_heartbeat("gone", NS)
            await watcher.start()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if beats.alive("steady") and beats.alive("gone"):
                    break
            assert beats.alive_nodes() == {"steady", "gone"}
            time.sleep(3.0)  # a long reconcile
            assert beats.alive("steady") and not beats.alive("gone")
            assert beats.alive_nodes() == {"steady"}
            await asyncio.sleep(0.2)  # the changes reach the loop
        finally:
            stop.set()
            await asyncio.to_thread(watcher.stop)
            renewing.join()

    asyncio.run(main())
    assert ("steady", False) not in changes
    assert changes.count(("gone", False)) == 1
