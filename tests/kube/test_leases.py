"""Leader election on a coordination.k8s.io Lease (agent.kube.leases) against the emulator:
one leader at a time, failover after the leader stops renewing, hand-over on release, and a
leader that cannot renew learns it lost; the operator's view of agent heartbeats."""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest

from agent.kube import client as kube_client
from agent.kube import connections, leases
from agent.operator import heartbeats

from .cluster import Cluster

NS = "prefetcher"
T = TypeVar("T")
FAST = {"lease_duration": 1.5, "renew_deadline": 1.0, "retry_period": 0.1}


def elector(client: kube_client.Client, identity: str) -> leases.LeaderElector:
    return leases.LeaderElector(client, NS, "operator", identity, **FAST)  # type: ignore[arg-type]


def with_client(cluster: Cluster, body: Callable[[kube_client.Client], Awaitable[T]]) -> T:
    """Run ``body`` with a client of the emulator, closed afterwards."""

    async def main() -> T:
        client = kube_client.Client(connections.Connection(server=cluster.url))
        try:
            return await body(client)
        finally:
            await client.aclose()

    return asyncio.run(main())


def lease(cluster: Cluster) -> dict:
    got = cluster.get(leases.API_VERSION, "leases", "operator", NS)
    assert got is not None
    return dict(got["spec"])


def test_one_leader_then_the_standby_takes_over_when_it_stops_renewing(
        cluster: Cluster) -> None:
    async def main(client: kube_client.Client) -> None:
        a, b = elector(client, "a"), elector(client, "b")
        await a.acquire()
        assert not await b.try_acquire_or_renew()  # held, not expired
        spec = lease(cluster)
        assert spec["holderIdentity"] == "a" and spec["leaseTransitions"] == 0
        assert spec["leaseDurationSeconds"] == 2 and spec["renewTime"] == spec["acquireTime"]
        # "a" is killed -9: it renews no more. "b" takes over once the lease expires,
        # as b itself observed (its own clock), not at once.
        last_renewal = datetime.datetime.fromisoformat(spec["renewTime"])
        await asyncio.wait_for(b.acquire(), timeout=10)
        spec = lease(cluster)
        assert spec["holderIdentity"] == "b" and spec["leaseTransitions"] == 1
        taken = datetime.datetime.fromisoformat(spec["acquireTime"])
        assert taken >= last_renewal + datetime.timedelta(seconds=2)  # leaseDuration
        # "a" (if it were alive) learns it lost within its renew deadline. (It reads the
        # lease first: its renew deadline passed long ago, so keep()'s own attempt gets
        # no time at all, and on a loaded machine would not read who holds it.)
        assert not await a.try_acquire_or_renew()
        with pytest.raises(leases.LostLeadership, match="holder now: b"):
            await asyncio.wait_for(a.keep(), timeout=10)

    with_client(cluster, main)


def test_a_released_lease_is_taken_at_once_and_a_restarted_holder_keeps_its_own(
        cluster: Cluster) -> None:
    async def main(client: kube_client.Client) -> None:
        a, b = elector(client, "pod-a"), elector(client, "pod-b")
        await a.acquire()
        assert not await b.try_acquire_or_renew()
        await a.release()  # SIGTERM during a rolling update
        assert lease(cluster)["holderIdentity"] is None
        assert await b.try_acquire_or_renew()
        # pod-b's container is killed -9 and restarts (same pod name): it does not wait
        # out its own lease.
        restarted = elector(client, "pod-b")
        assert await restarted.try_acquire_or_renew()
        assert lease(cluster)["leaseTransitions"] == 1

    with_client(cluster, main)


def test_a_stop_releases_the_lease_even_when_the_last_renewal_is_late(
        cluster: Cluster) -> None:
    # A renewal in flight when the stop cancels it leaves the last one older than the renew
    # deadline; the lease still names us and must be handed over, not left to expire.
    async def main(client: kube_client.Client) -> None:
        a, b = elector(client, "pod-a"), elector(client, "pod-b")
        await a.acquire()
        real = a.clock
        a.clock = lambda: real() + 5.0  # type: ignore[method-assign]
        assert not a.leader
        await a.release()
        assert lease(cluster)["holderIdentity"] is None
        assert await b.try_acquire_or_renew()
        # Once another pod holds it, a late release of the old holder changes nothing.
        await a.release()
        assert lease(cluster)["holderIdentity"] == "pod-b"

    with_client(cluster, main)


def test_two_candidates_racing_for_a_free_lease_get_one_leader(cluster: Cluster) -> None:
    async def main(client: kube_client.Client) -> list[bool]:
        candidates = [elector(client, f"c{i}") for i in range(5)]
        await candidates[0].acquire()
        await candidates[0].release()
        return list(await asyncio.gather(*(c.try_acquire_or_renew() for c in candidates)))

    won = with_client(cluster, main)
    assert won.count(True) == 1, won


def test_an_agent_is_alive_while_the_operator_sees_renewals_whatever_its_clock() -> None:
    now = [100.0]
    changed: list[str] = []
    beats = heartbeats.Heartbeats(5.0, clock=lambda: now[0], on_change=changed.append)

    def renewal(node: str, renew_time: str) -> dict:
        return {"metadata": {"name": leases.heartbeat_name(node),
                             "annotations": {leases.NODE_ANNOTATION: node}},
                "spec": {"renewTime": renew_time}}

    # The node's clock is 20 years behind: what counts is that the operator saw a renewal.
    beats.observe("ADDED", renewal("n1", "2006-01-01T00:00:00.000000Z"))
    assert beats.alive("n1") and changed == ["n1"]
    now[0] += 4
    beats.observe("MODIFIED", renewal("n1", "2006-01-01T00:00:04.000000Z"))
    now[0] += 4
    assert beats.alive("n1")
    beats.observe("MODIFIED", renewal("n1", "2006-01-01T00:00:04.000000Z"))  # not a renewal
    now[0] += 2
    beats.check()
    assert not beats.alive("n1") and changed == ["n1", "n1"]
    assert beats.alive_nodes() == set() and beats.known("n1") and not beats.known("n2")


def test_the_operator_follows_heartbeats_through_dropped_and_expired_watches(
        cluster: Cluster) -> None:
    """The heartbeat watch survives a dropped connection and a 410 Gone (relist), and a
    deleted Lease stops counting."""
    assert cluster.api is not None
    cluster.put("v1", "namespaces", {"metadata": {"name": NS}})
    seen: list[str] = []

    async def main() -> None:
        client = kube_client.Client(connections.Connection(server=cluster.url))
        beats = heartbeats.Heartbeats(30.0, on_change=seen.append)
        watching = asyncio.create_task(beats.run(client, NS))

        async def until(predicate: object) -> None:
            for _ in range(100):
                if predicate():  # type: ignore[operator]
                    return
                await asyncio.sleep(0.05)
            raise AssertionError("timed out")

        def renew(node: str) -> None:
            # From a thread: the emulator's loop is another thread.
            cluster.renew_heartbeat(node, NS)

        try:
            await asyncio.to_thread(renew, "n1")
            await until(lambda: beats.alive("n1"))
            await asyncio.to_thread(cluster.call, cluster.api.drop_watches)  # type: ignore[union-attr]
            await asyncio.to_thread(renew, "n2")
            await until(lambda: beats.alive("n2"))
            await asyncio.to_thread(cluster.call, cluster.api.fail,  # type: ignore[union-attr]
                                    "watch", "leases", 410)
            await asyncio.to_thread(cluster.call, cluster.api.drop_watches)  # type: ignore[union-attr]
            await asyncio.to_thread(cluster.delete, leases.API_VERSION, "leases",
                                    leases.heartbeat_name("n1"), NS)
            await until(lambda: not beats.known("n1"))
            assert beats.alive_nodes() == {"n2"}
        finally:
            watching.cancel()
            await client.aclose()

    asyncio.run(main())
    assert seen == ["n1", "n2", "n1"]  # came, came, went
    watches = [c for c in cluster.calls() if c.verb == "watch" and c.resource == "leases"]
    assert len(watches) >= 3


def test_the_heartbeat_watch_outlives_an_answer_that_is_not_an_api_error(
        cluster: Cluster) -> None:
    """The heartbeat watch is the operator's only source of agent liveness: if it ended on
    anything but an API error (here a watch answer that is not JSON, as a proxy's HTML error
    page), every agent would turn AgentUnavailable for good while the leader runs on. The
    first watch fails that way (a stand-in: the emulator always answers JSON); the watch
    must carry on and see the next renewal."""
    cluster.put("v1", "namespaces", {"metadata": {"name": NS}})

    class FlakyClient(kube_client.Client):
        failed = False

        async def watch(self, path: str, resource_version: str, *, timeout: int = 300,
                        **params: str):  # type: ignore[no-untyped-def, override]
            if not self.failed:
                self.failed = True
                raise ValueError("Expecting value: line 1 column 1 (char 0)")
            async for event in super().watch(path, resource_version, timeout=timeout,
                                             **params):
                yield event

    async def main() -> None:
        client = FlakyClient(connections.Connection(server=cluster.url))
        beats = heartbeats.Heartbeats(30.0)
        watching = asyncio.create_task(beats.run(client, NS))
        try:
            for _ in range(200):
                if client.failed:
                    break
                await asyncio.sleep(0.05)
            assert client.failed
            await asyncio.to_thread(cluster.renew_heartbeat, "later", NS)  # after the failure
            for _ in range(200):
                if beats.alive("later") or watching.done():
                    break
                await asyncio.sleep(0.05)
            assert beats.alive("later"), "the watch ended with the failure"
        finally:
            watching.cancel()
            await client.aclose()

    asyncio.run(main())
