"""The real operator sweeps entries whose ImagePrefetch no longer exists (a delete it never
saw: here, entries written by hand for a uid that is not a prefetch), leaving the entries
of prefetches that exist alone."""

from __future__ import annotations

from tests.kube.cluster import Cluster

from .conftest import API, Operator, entries_of, prefetch


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
