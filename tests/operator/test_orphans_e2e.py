"""The real operator sweeps entries whose ImagePrefetch no longer exists (a delete it never
saw: here, entries written by hand for a uid that is not a prefetch), leaving the entries
of prefetches that exist alone."""

from __future__ import annotations

from tests.kube.cluster import Cluster

from .conftest import API, Operator, entries_of, prefetch, report


def test_entries_of_a_prefetch_that_no_longer_exists_are_swept(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("orphan-a", {"pool": "orphan"})
    cluster.apply(prefetch("kept", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "orphan"}}))
    cluster.wait_for(lambda: entries_of(cluster, "orphan-a", "kept"))
    nis = cluster.get(API, "nodeimagesets", "orphan-a")
    assert nis is not None
    nis["spec"]["images"].append({
        "name": "lost-1-0123456789ab", "image": "docker.io/library/lost:1",
        "owners": [{"namespace": "default", "name": "deleted-long-ago",
                    "uid": "00000000-0000-0000-0000-000000000000"}]})
    cluster.put(API, "nodeimagesets", nis)
    # The sweep runs every 10 resync intervals (1s here).
    cluster.wait_for(lambda: not entries_of(cluster, "orphan-a", "deleted-long-ago"),
                     timeout=30)
    assert entries_of(cluster, "orphan-a", "kept")


def test_nodes_the_agent_cannot_run_on_do_not_keep_a_prefetch_from_completing(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("place-linux", {"pool": "place"})
    cluster.add_node("place-win", {"pool": "place", "kubernetes.io/os": "windows"})
    cluster.add_node("place-vk", {"pool": "place", "type": "virtual-kubelet"})
    cluster.apply(prefetch("place", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "place"}}))
    cluster.wait_for(lambda: entries_of(cluster, "place-linux", "place"))
    report(cluster, "place-linux", "Ready")
    cluster.kubectl("wait", "--for=condition=Complete", "ipf/place", "-n", "default",
                    "--timeout=15s")
    obj = cluster.get(API, "imageprefetches", "place", "default")
    assert obj is not None and obj["status"]["nodes"]["desired"] == 1
    assert obj["status"]["nodes"]["agentUnavailable"] == 0
    assert entries_of(cluster, "place-win") == entries_of(cluster, "place-vk") == []
    # The NodeImageSet is owned by its Node: the garbage collector removes it with it.
    nis = cluster.get(API, "nodeimagesets", "place-linux")
    node = cluster.get("v1", "nodes", "place-linux")
    assert nis is not None and node is not None
    assert [(o["kind"], o["name"], o["uid"]) for o in nis["metadata"]["ownerReferences"]] \
        == [("Node", "place-linux", node["metadata"]["uid"])]
