"""Two real ``prefetcher operator`` replicas elect one leader through a Lease; killing the
leader -9 hands over to the standby, which finishes the prefetch the leader started; a
clean stop (rolling update) hands over at once; a lone operator killed -9 and restarted in
its pod leads again without waiting. Agents heartbeat through Leases, so a
steady node's NodeImageSet is not rewritten; and the projected service-account token is
rotated under every process (the old one is then rejected), which keep working.

All real: the emulator (requiring bearer tokens here), the operators, two agents, the
registry. Lease timings are shortened (4s lease, 0.3s retry) so failover takes seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures import images, registries

import agent
from agent.kube import leases
from tests.kube.cluster import Cluster
from tests.kube.emulator import kubeconfig
from tests.kube.processes import PREFETCHER, Process, wait_until

from .conftest import NODES, OPERATOR_NAMESPACE, Agent, ipf_status, prefetch

LEASE = "prefetcher-e2e"
OPERATOR_CONFIG = f"""\
[runtime]
namespace = "{OPERATOR_NAMESPACE}"
health_address = ""
metrics_address = ""

[operator]
peering_name = "{LEASE}"
lease_duration = "4s"
lease_renew_deadline = "3s"
lease_retry_period = "300ms"
status_interval = "200ms"
resync_interval = "1s"
agent_heartbeat_timeout = "5s"
resolve_digests = true
resolve_timeout = "3s"
"""
AGENT_NODES = ("e2e-a", "e2e-b")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The emulator, accepting only the token in ``token`` (a projected token file)."""
    workdir = tmp_path_factory.mktemp("cluster")
    token = workdir / "token"
    token.write_text("token-1\n")
    with Cluster(workdir, tokens={"token-1"}) as running:
        running.kubeconfig_path.write_text(kubeconfig(running.url, token_file=str(token)))
        running.install_crds()
        running.put("v1", "namespaces", {"metadata": {"name": OPERATOR_NAMESPACE}})
        running.put("v1", "namespaces", {"metadata": {"name": "team"}})
        for node, labels in NODES.items():
            running.add_node(node, labels)
        yield running


def token_file(cluster: Cluster) -> Path:
    return cluster.kubeconfig_path.with_name("token")


HEALTH_PORT = registries.free_port()


def operator(cluster: Cluster, workdir: Path, pod: str) -> Process:
    config = workdir / "config.toml"
    config.write_text(OPERATOR_CONFIG)
    env = cluster.env() | {"POD_NAME": pod}
    if pod == "op-2":  # the standby answers the chart's liveness/readiness probe
        env["PREFETCHER_RUNTIME__HEALTH_ADDRESS"] = f"127.0.0.1:{HEALTH_PORT}"
    return Process([PREFETCHER, "operator", "--config", str(config),
                    "--kubeconfig", str(cluster.kubeconfig_path)],
                   workdir / f"{pod}.log", env)


def lease_spec(cluster: Cluster) -> dict[str, Any]:
    lease = cluster.get(leases.API_VERSION, "leases", LEASE, OPERATOR_NAMESPACE) or {}
    return dict(lease.get("spec") or {})


def holder(cluster: Cluster) -> str:
    return str(lease_spec(cluster).get("holderIdentity") or "")


@pytest.fixture(scope="module")
def replicas(cluster: Cluster,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Process]]:
    workdir = tmp_path_factory.mktemp("operators")
    running = {pod: operator(cluster, workdir, pod) for pod in ("op-1", "op-2")}
    running["op-1"].start()
    running["op-1"].wait_for_output("became the leader", timeout=30)
    running["op-2"].start()
    running["op-2"].wait_for_output("waiting to become the leader", timeout=30)
    try:
        yield running
    finally:
        for process in running.values():
            process.stop()


@pytest.fixture(scope="module")
def agents(cluster: Cluster, replicas: dict[str, Process],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Agent]]:
    running = {node: Agent(cluster, node, tmp_path_factory.mktemp(node))
               for node in AGENT_NODES}
    try:
        for agent in running.values():
            agent.start()
        yield running
    finally:
        codes = {node: agent.process.stop() for node, agent in running.items()}
        assert all(code == 0 for code in codes.values()), codes


def complete(cluster: Cluster, name: str) -> bool:
    status = ipf_status(cluster, name)
    return status.get("phase") == "Complete" and status["summary"]["ready"] == "2/2"


def test_the_standby_takes_over_from_a_killed_leader_and_finishes_its_prefetch(
        cluster: Cluster, registry: registries.Registry, replicas: dict[str, Process],
        agents: dict[str, Agent]) -> None:
    leader, standby = replicas["op-1"], replicas["op-2"]
    assert holder(cluster) == "op-1"
    # The standby runs no handler at all: it has written nothing. It is healthy (so a
    # rolling update with maxUnavailable 0 proceeds).
    assert "Activity 'configure'" not in standby.output()
    probe = httpx.get(f"http://127.0.0.1:{HEALTH_PORT}/healthz")
    assert probe.status_code == 200 and probe.json() == {"role": "standby"}

    image = images.Image([images.random_layer(300_000, seed=91)])
    images.push(registry, "failover/app", "1", image)
    ref = f"{registry.host}/failover/app:1"
    cluster.apply(prefetch("failover", images=[ref],
                           nodeSelector={"matchLabels": {"pool": "e2e"}}))
    cluster.wait_for(lambda: ipf_status(cluster, "failover").get("startTime"), timeout=30,
                     message="the leader started the prefetch")
    leader.kill()
    killed = time.monotonic()

    standby.wait_for_output("became the leader", timeout=30)
    assert time.monotonic() - killed < 30
    assert holder(cluster) == "op-2"
    standby.wait_for_output("Activity 'configure' succeeded", timeout=30)
    probe = httpx.get(f"http://127.0.0.1:{HEALTH_PORT}/healthz")  # the same server, leading
    assert probe.status_code == 200 and probe.json() == {"role": "leader"}
    cluster.wait_for(lambda: complete(cluster, "failover"), timeout=60,
                     message="the new leader completes the prefetch")
    for node in AGENT_NODES:
        assert [i["digest"] for i in agents[node].images()] == [image.digest]

    # The killed replica's pod restarts its container (same pod name): it stands by while
    # op-2 leads, and does not pause anything (no kopf peering wait).
    leader.start()
    leader.wait_for_output("waiting to become the leader", timeout=30)
    time.sleep(1.0)
    assert holder(cluster) == "op-2"
    assert leader.output().count("became the leader") == 1  # only its first term


def test_a_clean_stop_of_the_leader_hands_over_at_once(
        cluster: Cluster, registry: registries.Registry, replicas: dict[str, Process],
        agents: dict[str, Agent]) -> None:
    """A rolling update: SIGTERM releases the Lease, the standby takes it within a retry."""
    leader, standby = replicas["op-2"], replicas["op-1"]
    assert holder(cluster) == "op-2"
    before = standby.output().count("became the leader")
    assert leader.stop() == 0
    assert "released the lease" in leader.output()  # so op-1 need not wait for expiry
    wait_until(lambda: standby.output().count("became the leader") > before, timeout=30,
               message="op-1 leads again")

    image = images.Image([images.random_layer(100_000, seed=92)])
    images.push(registry, "failover/next", "1", image)
    cluster.apply(prefetch("after-update", images=[f"{registry.host}/failover/next:1"],
                           nodeSelector={"matchLabels": {"pool": "e2e"}}))
    cluster.wait_for(lambda: complete(cluster, "after-update"), timeout=60,
                     message="the new leader reconciles")


def test_a_lone_operator_killed_and_restarted_in_its_pod_leads_again_at_once(
        cluster: Cluster, replicas: dict[str, Process], agents: dict[str, Agent]) -> None:
    """No pause after kill -9 (kopf peering waited a minute for the "conflicting" dead
    peer): the restarted container, same pod name, takes back its own Lease."""
    only = replicas["op-1"]
    assert holder(cluster) == "op-1" and not replicas["op-2"].running()
    transitions = lease_spec(cluster)["leaseTransitions"]
    only.kill()
    only.start()
    wait_until(lambda: only.output().count("became the leader") == 3, timeout=30,
               message="op-1 leads again")
    spec = lease_spec(cluster)
    assert spec["holderIdentity"] == "op-1"
    assert spec["leaseTransitions"] == transitions  # its own lease, not taken over
    only.wait_for_output("Activity 'configure' succeeded", timeout=30)
    assert "conflicting" not in only.output()


def test_heartbeats_renew_leases_and_leave_node_image_sets_alone(
        cluster: Cluster, agents: dict[str, Agent], replicas: dict[str, Process]) -> None:
    def versions() -> dict[str, str]:
        return {n: cluster.get("prefetcher.dev/v1alpha1", "nodeimagesets", n)["metadata"][
            "resourceVersion"] for n in AGENT_NODES}  # type: ignore[index]

    def renewals() -> dict[str, str]:
        return {n: cluster.get(leases.API_VERSION, "leases", leases.heartbeat_name(n),
                               OPERATOR_NAMESPACE)["spec"]["renewTime"]  # type: ignore[index]
                for n in AGENT_NODES}

    nis_before, leases_before = versions(), renewals()
    time.sleep(3.5)  # three heartbeat intervals of the agents (1s)
    assert renewals() != leases_before
    assert versions() == nis_before  # nothing changed on the nodes: nothing written

    # `kubectl get nis` shows the agent's version (no stale heartbeat column).
    table = cluster.kubectl("get", "nis", *AGENT_NODES).stdout
    assert "AGENT" in table and agent.__version__ in table and "HEARTBEAT" not in table, table

    # Each Lease belongs to its node's NodeImageSet: it goes when the node's set goes.
    for node in AGENT_NODES:
        lease = cluster.get(leases.API_VERSION, "leases", leases.heartbeat_name(node),
                            OPERATOR_NAMESPACE)
        nis = cluster.get("prefetcher.dev/v1alpha1", "nodeimagesets", node)
        assert lease is not None and nis is not None
        assert lease["metadata"]["ownerReferences"] == [{
            "apiVersion": "prefetcher.dev/v1alpha1", "kind": "NodeImageSet", "name": node,
            "uid": nis["metadata"]["uid"]}]


def test_a_rotated_token_is_followed_by_every_process(
        cluster: Cluster, registry: registries.Registry, replicas: dict[str, Process],
        agents: dict[str, Agent]) -> None:
    """The kubelet rotates the projected token and the old one expires: the operator and
    the agents re-read the file (a process that read it once fails with 401 from now on)."""
    assert cluster.api is not None
    token_file(cluster).write_text("token-2\n")
    cluster.call(cluster.api.rotate_token, "token-2")
    cluster.call(cluster.api.drop_watches)  # every watch reconnects with a new request
    image = images.Image([images.random_layer(120_000, seed=93)])
    images.push(registry, "failover/rotated", "1", image)
    cluster.apply(prefetch("rotated", images=[f"{registry.host}/failover/rotated:1"],
                           nodeSelector={"matchLabels": {"pool": "e2e"}}))
    cluster.wait_for(lambda: complete(cluster, "rotated"), timeout=60,
                     message="reconciled and pulled with the new token")
    leases_before = {n: cluster.get(leases.API_VERSION, "leases", leases.heartbeat_name(n),
                                    OPERATOR_NAMESPACE)["spec"]["renewTime"]  # type: ignore[index]
                     for n in AGENT_NODES}
    time.sleep(2.5)
    for node in AGENT_NODES:
        lease = cluster.get(leases.API_VERSION, "leases", leases.heartbeat_name(node),
                            OPERATOR_NAMESPACE)
        assert lease is not None and lease["spec"]["renewTime"] != leases_before[node]
    assert all(agent.process.running() for agent in agents.values())
    assert replicas["op-1"].running()


def test_a_leader_that_loses_its_lease_stops_at_once(
        cluster: Cluster, replicas: dict[str, Process]) -> None:
    """Another holder took the Lease (the leader was partitioned from the API server): the
    leader must stop writing, so it exits (code 1, as controller-runtime) and restarts as
    a standby."""
    leader = replicas["op-1"]
    lease = cluster.get(leases.API_VERSION, "leases", LEASE, OPERATOR_NAMESPACE)
    assert lease is not None and lease["spec"]["holderIdentity"] == "op-1"
    lease["spec"].update(holderIdentity="elsewhere", renewTime=leases.micro_time())
    cluster.put(leases.API_VERSION, "leases", lease)
    assert leader.process is not None
    assert leader.process.wait(timeout=30) == 1
    assert "leader election lost, exiting" in leader.output()
    assert "holder now: elsewhere" in leader.output()
