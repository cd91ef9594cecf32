"""A heartbeat Lease renewal that fails logs one line saying why and what happens next, not
a traceback; past the Lease's duration it is an error (the operator counts the agent as
unavailable by then); the first renewal that works again says so. Against the emulated API
server, with the agent's own Heartbeat writing the Lease."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from agent.kube import client as kube_client
from agent.kube import connections, leases
from agent.node import heartbeating
from tests.kube.cluster import Cluster

NS = "prefetcher"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str, bool]]:
    """(level, message, has a traceback) of what the agent logged."""
    out = [(r.levelname, r.getMessage(), r.exc_info is not None) for r in caplog.records
           if r.name == "agent.node"]
    caplog.clear()
    return out


def test_failed_renewals_are_one_warning_each_then_an_error_past_the_lease_duration(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with Cluster(tmp_path) as cluster:
        assert cluster.api is not None
        api = cluster.api

        async def main() -> None:
            client = kube_client.Client(connections.Connection(server=cluster.url))
            heartbeat = leases.Heartbeat(client, NS, "node-1", "agent-pod-1", duration=40)
            clock = Clock()
            renewals = heartbeating.LeaseRenewals(
                heartbeat.renew, name=f"{NS}/prefetcher-agent-node-1", duration=40,
                interval=10, clock=clock)
            try:
                caplog.set_level(logging.INFO, "agent.node")
                assert await renewals.renew()
                assert lines(caplog) == []

                # The admission policy (or RBAC) refuses the write, four times in a row.
                cluster.call(api.fail, "*", "leases", 403, times=4)
                assert not await renewals.renew()
                [(level, message, traceback)] = lines(caplog)
                assert (level, traceback) == ("WARNING", False)
                assert "could not renew heartbeat Lease prefetcher/prefetcher-agent-node-1" \
                    in message
                assert "403" in message and "retrying in 10s" in message

                clock.now += 30  # still within the Lease's 40 s
                assert not await renewals.renew()
                assert [(lv, tb) for lv, _, tb in lines(caplog)] == [("WARNING", False)]

                clock.now += 15  # 45 s without a renewal: the operator has given up on us
                assert not await renewals.renew()
                [(level, message, traceback)] = lines(caplog)
                assert (level, traceback) == ("ERROR", False)
                assert "not renewed for 45s, longer than its duration (40s)" in message
                assert "counts this agent as unavailable" in message

                # The traceback is there for whoever asks for debug logs.
                caplog.set_level(logging.DEBUG, "agent.node")
                clock.now += 10
                assert not await renewals.renew()
                logged = lines(caplog)
                assert [(lv, tb) for lv, _, tb in logged] == [("ERROR", False), ("DEBUG", True)]

                clock.now += 10
                assert await renewals.renew()
                [(level, message, _)] = lines(caplog)
                assert level == "INFO"
                assert message == ("heartbeat Lease prefetcher/prefetcher-agent-node-1 renewed"
                                   " again, after 4 failed renewal(s) (1m5s without a"
                                   " renewal)")
                lease = cluster.get(leases.API_VERSION, "leases", "prefetcher-agent-node-1", NS)
                assert lease is not None and lease["spec"]["holderIdentity"] == "agent-pod-1"

                # A later failure starts a new count (a warning again, not an error).
                cluster.call(api.fail, "*", "leases", 403)
                clock.now += 10
                assert not await renewals.renew()
                assert [lv for lv, _, _ in lines(caplog)] == ["WARNING", "DEBUG"]
            finally:
                await client.aclose()

        asyncio.run(main())
