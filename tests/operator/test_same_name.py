"""An ImagePrefetch deleted and re-created under the same name between the operator's read
and its write: the new one gets neither the old one's TTL delete nor its status (the
DELETE carries a uid precondition, the status write a JSON-patch test of the uid).

The race is made deterministic by the emulator (:meth:`KubeAPI.before`): the object is
replaced just before the operator's request is served."""

from __future__ import annotations

from typing import Any

from tests.kube.cluster import Cluster
from tests.kube.emulator import KubeAPI

from .conftest import API, Operator, entries_of, ipf, prefetch, report


def replace_with(name: str, namespace: str, new: dict[str, Any],
                 replaced: list[str]) -> Any:
    """An emulator action: delete ``name`` for good (finalizers dropped) and create ``new``
    under the same name, with a new uid (appended to ``replaced``)."""
    def action(api: KubeAPI) -> None:
        old = api.get_object(API, "imageprefetches", name, namespace)
        assert old is not None
        old["metadata"]["finalizers"] = []
        api.put_object(API, "imageprefetches", old)
        api.delete_object(API, "imageprefetches", name, namespace)
        created = api.put_object(API, "imageprefetches", new)
        replaced.append(created["metadata"]["uid"])
    return action


def test_a_ttl_delete_spares_a_prefetch_recreated_under_the_same_name(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("reborn-ttl-a", {"pool": "reborn-ttl"})
    cluster.apply(prefetch("reborn-ttl", "default", images=["nginx:1.27"],
                           ttlSecondsAfterFinished=1,
                           nodeSelector={"matchLabels": {"pool": "reborn-ttl"}}))
    first = ipf(cluster, "reborn-ttl", "default")["metadata"]["uid"]
    cluster.wait_for(lambda: entries_of(cluster, "reborn-ttl-a", "reborn-ttl"))
    replaced: list[str] = []
    newcomer = prefetch("reborn-ttl", "default", images=["busybox:1.36"],
                        nodeSelector={"matchLabels": {"pool": "nowhere"}})
    cluster.before("delete", "imageprefetches", name="reborn-ttl",
                   action=replace_with("reborn-ttl", "default", newcomer, replaced))
    report(cluster, "reborn-ttl-a", "Ready")  # Complete, then deleted a second later
    cluster.wait_for(lambda: replaced, timeout=20)  # and the DELETE was served right after
    now = cluster.get(API, "imageprefetches", "reborn-ttl", "default")
    assert now is not None, "the TTL of the old prefetch deleted the new one"
    assert now["metadata"]["uid"] == replaced[0] != first
    assert not now["metadata"].get("deletionTimestamp")
    cluster.wait_for(lambda: "not deleted: the name is now another" in operator.output())


def test_a_status_write_spares_a_prefetch_recreated_under_the_same_name(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("reborn-st-a", {"pool": "reborn-st"})
    cluster.apply(prefetch("reborn-st", "default", images=["nginx:1.27", "redis:7"],
                           nodeSelector={"matchLabels": {"pool": "reborn-st"}}))
    cluster.wait_for(lambda: entries_of(cluster, "reborn-st-a", "reborn-st"))
    cluster.wait_for(lambda: (ipf(cluster, "reborn-st", "default").get("status") or {})
                     .get("summary", {}).get("images") == 2)
    replaced: list[str] = []
    newcomer = prefetch("reborn-st", "default", images=["busybox:1.36"],
                        nodeSelector={"matchLabels": {"pool": "nowhere"}})
    cluster.before("patch", "imageprefetches", name="reborn-st", subresource="status",
                   action=replace_with("reborn-st", "default", newcomer, replaced))
    report(cluster, "reborn-st-a", "Ready")  # the old prefetch's status changes: written
    cluster.wait_for(lambda: replaced, timeout=20)  # and the status PATCH served right after
    # The new prefetch gets its own status (one image) and never the old one's (two).
    cluster.wait_for(lambda: (ipf(cluster, "reborn-st", "default").get("status") or {})
                     .get("summary", {}).get("images") == 1)
    theirs = [(kind, obj.get("status") or {}) for kind, obj in cluster.history()
              if obj["metadata"].get("uid") == replaced[0]]
    assert theirs
    assert all(st.get("summary", {}).get("images") in (None, 1) for _, st in theirs), \
        "the old prefetch's status was written onto the new one"
    assert "its status not written" in operator.output()
