"""The real operator: nine (and up to 64) prefetches of one image share a node; the 65th is
refused there alone and says why (docs/limits.md)."""

from __future__ import annotations

from agent.operator import writing
from tests.kube.cluster import Cluster

from .conftest import Operator, condition, entries_of, ipf, prefetch


def test_a_65th_prefetch_of_an_image_on_a_node_is_refused_there_and_says_why(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("shared-a", {"pool": "shared"})
    cluster.add_node("shared-b", {"pool": "shared-b"})
    names = [f"team-{i:02d}" for i in range(writing.MAX_OWNERS)]
    cluster.apply(*(prefetch(name, "default", images=["busybox:1.36"],
                             nodeSelector={"matchLabels": {"pool": "shared"}})
                    for name in names))
    cluster.wait_for(lambda: len(entries_of(cluster, "shared-a")[0]["owners"]) == len(names)
                     if entries_of(cluster, "shared-a") else False, timeout=60)
    cluster.apply(prefetch("one-too-many", "default", images=["busybox:1.36"],
                           nodeSelector={"matchExpressions": [
                               {"key": "pool", "operator": "In",
                                "values": ["shared", "shared-b"]}]}))
    cluster.wait_for(lambda: condition(ipf(cluster, "one-too-many", "default"), "Degraded")
                     .get("reason") == "NodeImageSetFull", timeout=30)
    degraded = condition(ipf(cluster, "one-too-many", "default"), "Degraded")
    assert "shared-a: docker.io/library/busybox:1.36 already has 64 ImagePrefetches owning" \
        " it on the node (at most 64)" in degraded["message"]
    # Refused there alone: its other node has it, the 64 others keep theirs.
    assert entries_of(cluster, "shared-b", "one-too-many")
    assert not entries_of(cluster, "shared-a", "one-too-many")
    assert len(entries_of(cluster, "shared-a")[0]["owners"]) == writing.MAX_OWNERS
    # Room is made (one of the others deleted): it is dispatched there by itself.
    cluster.kubectl("delete", "ipf", names[0], "-n", "default", "--timeout=20s")
    cluster.wait_for(lambda: entries_of(cluster, "shared-a", "one-too-many"), timeout=30)
    cluster.wait_for(lambda: not condition(ipf(cluster, "one-too-many", "default"),
                                           "Degraded").get("status") == "True")
