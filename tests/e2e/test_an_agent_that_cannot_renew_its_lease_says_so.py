"""An agent whose heartbeat Lease writes are refused logs one line per failed renewal (the
Lease, the reason, the retry), no traceback, an error once the Lease has gone unrenewed for
longer than its duration, and a line when renewing works again. A real ``prefetcher agent``
process against the emulator (heartbeat every 1s, so the Lease lasts 4s)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import OPERATOR_NAMESPACE, Agent
from tests.kube.cluster import Cluster
from tests.kube.processes import wait_until

pytestmark = pytest.mark.root
LEASE = f"{OPERATOR_NAMESPACE}/prefetcher-agent-lonely"


@pytest.fixture
def lonely(tmp_path: Path) -> Iterator[tuple[Cluster, Agent]]:
    (tmp_path / "cluster").mkdir()
    with Cluster(tmp_path / "cluster") as cluster:
        cluster.install_crds()
        cluster.put("v1", "namespaces", {"metadata": {"name": OPERATOR_NAMESPACE}})
        cluster.add_node("lonely")
        (tmp_path / "agent").mkdir()
        agent = Agent(cluster, "lonely", tmp_path / "agent").start()
        try:
            yield cluster, agent
        finally:
            agent.process.stop()


def test_refused_renewals_are_one_line_each_then_an_error_and_a_recovery(
        lonely: tuple[Cluster, Agent]) -> None:
    cluster, agent = lonely
    assert cluster.api is not None
    wait_until(lambda: "renewTime" in (cluster.get(
        "coordination.k8s.io/v1", "leases", "prefetcher-agent-lonely", OPERATOR_NAMESPACE)
        or {}).get("spec", {}), message="the first renewal")
    before = len(agent.process.output())

    # About 6 s of refused writes (GET is allowed: the agent reads the Lease once).
    refusals = 6
    cluster.call(cluster.api.fail, "update", "leases", 403, times=refusals)
    cluster.call(cluster.api.fail, "create", "leases", 403, times=refusals)
    wait_until(lambda: "renewed again" in agent.process.output()[before:], timeout=40,
               message="a renewal after the refusals")
    time.sleep(0.5)
    log = agent.process.output()[before:]

    failures = [line for line in log.splitlines() if "could not renew heartbeat Lease" in line]
    assert len(failures) >= 4, log
    assert all(LEASE in line and "403" in line and "retrying in 1s" in line
               for line in failures), log
    assert "Traceback" not in log and "periodic step failed" not in log, log
    errors = [line for line in failures if "longer than its duration (4s)" in line]
    assert errors, f"no escalation past the Lease duration:\n{log}"
    assert "counts this agent as unavailable" in errors[0]
    assert failures.index(errors[0]) >= 2  # warnings first, for the Lease's 4 s
    assert re.search(
        rf"heartbeat Lease {LEASE} renewed again, after 6 failed renewal\(s\) \(\d+s without",
        log)
    assert agent.process.running()
