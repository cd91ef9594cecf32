"""Nodes the agent DaemonSet cannot run on are not targeted; a dead agent frees its slot
after a grace period; NodeImageSets are owned by their Node; missed Node deletions are
noticed by the periodic resync."""

from __future__ import annotations

import asyncio
import datetime
from typing import Any

import kopf
import pytest

from agent import config
from agent.kube import connections
from agent.operator import (
    dispatching,
    errors,
    handlers,
    index,
    kubeapi,
    nodes,
    prefetches,
    sweeping,
    writing,
)
from agent.operator.placement import Placement
from tests.kube.cluster import Cluster

JSON = dict[str, Any]


def node(name: str, labels: dict[str, str] | None = None,
         taints: list[dict[str, str]] | None = None) -> nodes.Node:
    return nodes.Node(name, {"kubernetes.io/os": "linux", **(labels or {})}, True, False,
                      tuple(taints or ()), uid=f"uid-{name}")


def daemonset(**pod: Any) -> JSON:
    return {"spec": {"template": {"spec": {"containers": [{"name": "agent"}], **pod}}}}


def test_nodes_no_daemonset_pod_runs_on_are_refused_whatever_it_tolerates() -> None:
    everything = Placement.from_daemonset(daemonset(tolerations=[{"operator": "Exists"}]))
    assert everything.why_not(node("plain")) == ""
    assert "virtual-kubelet" in everything.why_not(node("vk", {"type": "virtual-kubelet"}))
    assert "virtual-kubelet" in everything.why_not(node("vk2", taints=[
        {"key": "virtual-kubelet.io/provider", "value": "azure", "effect": "NoSchedule"}]))
    assert "Fargate" in everything.why_not(node("f", {"eks.amazonaws.com/compute-type":
                                                       "fargate"}))
    assert "windows" in everything.why_not(node("w", {"kubernetes.io/os": "windows"}))


def test_the_daemonsets_selector_affinity_and_tolerations_decide() -> None:
    placement = Placement.from_daemonset(daemonset(
        nodeSelector={"pool": "main"},
        tolerations=[{"key": "dedicated", "operator": "Equal", "value": "infra",
                      "effect": "NoSchedule"}],
        affinity={"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [
                {"key": "tier", "operator": "NotIn", "values": ["edge"]}]}]}}}))
    assert placement.why_not(node("a", {"pool": "main"})) == ""
    assert "nodeSelector" in placement.why_not(node("b", {"pool": "other"}))
    assert "affinity" in placement.why_not(node("c", {"pool": "main", "tier": "edge"}))
    tainted = node("d", {"pool": "main"}, [{"key": "gpu", "value": "1", "effect": "NoSchedule"}])
    assert "gpu=1:NoSchedule" in placement.why_not(tainted)
    tolerated = node("e", {"pool": "main"}, [
        {"key": "dedicated", "value": "infra", "effect": "NoSchedule"},
        {"key": "soft", "value": "", "effect": "PreferNoSchedule"}])
    assert placement.why_not(tolerated) == ""
    p = prefetches.parse({"metadata": {"namespace": "ns", "name": "p", "uid": "u",
                                       "generation": 1}, "spec": {"images": ["nginx"]}})
    all_nodes = [node("a", {"pool": "main"}), tainted, node("b", {"pool": "other"})]
    assert nodes.select(p, all_nodes, runnable=lambda n: not placement.why_not(n)) == ["a"]


def test_a_dead_agent_frees_its_parallelism_slot_after_the_grace_period() -> None:
    desired = {"app": {"name": "app", "image": "reg.test/app:1", "owners": [
        {"namespace": "ns", "name": "p", "uid": "u"}], "pullPolicy": "IfNotPresent",
        "backoffLimit": 3, "pinned": False}}

    def plan(down_for: float) -> tuple[str, ...]:
        reports = {"a": dispatching.NodeReport("a", dispatching.AGENT_UNAVAILABLE, {},
                                               down_for)}
        return dispatching.plan(["a", "b"], {"a": desired}, desired, reports, 1,  # type: ignore[arg-type]
                                grace=90.0).dispatch

    assert plan(30.0) == ()  # maybe only starting late: holds its slot
    assert plan(120.0) == ("b",)  # dead: the rollout goes on without it
    st = index.State(settings=config.OperatorSettings(), namespace="ops", client=None)  # type: ignore[arg-type]
    assert st.agent_down_for("a", set(), 100.0) == 0.0
    assert st.agent_down_for("a", set(), 190.0) == 90.0
    assert st.agent_down_for("a", {"a"}, 200.0) == 0.0  # back: the clock restarts


class Client:
    def __init__(self, listed: list[JSON] | None = None) -> None:
        self.created: list[JSON] = []
        self.patched: list[JSON] = []
        self.listed = listed or []

    async def create(self, path: str, body: JSON) -> JSON:
        self.created.append(body)
        return {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}

    async def merge_patch(self, path: str, body: JSON) -> JSON:
        self.patched.append(body)
        return {"metadata": {"name": path.rsplit("/", 1)[-1], "resourceVersion": "3",
                             **body.get("metadata", {})}, "spec": body["spec"]}

    async def list(self, path: str, **_: str) -> list[JSON]:
        return self.listed


def test_node_image_sets_are_owned_by_their_node() -> None:
    async def main() -> None:
        client = Client()
        st = index.State(settings=config.OperatorSettings(), namespace="ops", client=client)  # type: ignore[arg-type]
        st.nodes["n1"] = node("n1")
        st.nodes["n2"] = node("n2")
        entry = {"name": "app", "image": "reg.test/app:1", "owners": [
            {"namespace": "ns", "name": "p", "uid": "u"}]}
        # n2's object was made by an older operator, without an owner.
        st.node_sets["n2"] = {"metadata": {"name": "n2", "resourceVersion": "2"},
                              "spec": {"images": []}}
        await st.writer.write({n: writing.Change("u", {"app": entry}) for n in ("n1", "n2")})  # type: ignore[dict-item]
        owner = [{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "uid-n1",
                  "controller": False, "blockOwnerDeletion": False}]
        assert client.created[0]["metadata"]["ownerReferences"] == owner
        assert client.patched[0]["metadata"]["ownerReferences"][0]["uid"] == "uid-n2"
        await st.writer.close()

    asyncio.run(main())


def test_a_node_deletion_missed_by_the_watch_is_noticed_by_the_resync() -> None:
    client = Client(listed=[{"metadata": {"name": "kept", "uid": "k"}, "status": {
        "conditions": [{"type": "Ready", "status": "True"}]}}])
    st = index.State(settings=config.OperatorSettings(), namespace="ops", client=client)  # type: ignore[arg-type]
    st.nodes = {"kept": node("kept"), "gone": node("gone")}
    assert asyncio.run(sweeping.resync_nodes(st)) == ["gone"]
    assert set(st.nodes) == {"kept"}


def test_ready_agents_and_placement_are_taken_even_when_the_role_check_fails() -> None:
    """The DaemonSet keeper's loop also verifies the agents' pull-secret Role; a failed
    Role read (a 500, a Forbidden) must not keep the ready agent pods and the placement
    from the index, or every node would show AgentUnavailable until the Role is readable.
    (Stand-ins for the keeper and the Role keeper: the order inside one check is tested.)"""

    class Keeper:
        live = daemonset(nodeSelector={"pool": "main"})

        async def check(self) -> set[str]:
            return {"n1"}

    class Readers:
        async def verify(self) -> None:
            raise errors.APIError(500, "InternalError", "etcd leader changed")

    st = index.State(settings=config.OperatorSettings(), namespace="ops", client=None)  # type: ignore[arg-type]
    st.secret_readers = Readers()  # type: ignore[assignment]
    with pytest.raises(errors.APIError):
        asyncio.run(handlers.check_daemonset(st, Keeper()))  # type: ignore[arg-type]
    assert st.agent_pods_ready == {"n1"}
    assert "pool" in st.placement.why_not(node("elsewhere"))


def test_a_new_leader_knows_the_live_agents_before_its_first_reconcile(
        cluster: Cluster) -> None:
    """After a restart or failover, kopf resumes every prefetch right after the startup
    handler: the agents' heartbeats must be known by then, or every node still pulling is
    reported AgentUnavailable (conditions, Events) until the heartbeat watch catches up."""
    cluster.put("v1", "namespaces", {"metadata": {"name": "beats"}})
    cluster.add_node("beats-a")
    cluster.renew_heartbeat("beats-a", "beats")

    async def main() -> None:
        client = kubeapi.Client(connections.Connection(server=cluster.url))
        st = index.State(settings=config.OperatorSettings(), namespace="beats", client=client)
        memo = kopf.Memo(state=st)
        await handlers.configure(settings=kopf.OperatorSettings(), memo=memo)
        try:
            assert "beats-a" in st.live_agents(datetime.datetime.now(datetime.UTC))
        finally:
            await handlers.stop(memo=memo)

    asyncio.run(main())
