"""Review regressions against the emulated cluster: spec changes, restarts, cordons, deletes."""

from __future__ import annotations

import base64
import json
import time

from tests.kube.cluster import Cluster
from tests.operator.conftest import (
    OPERATOR_NAMESPACE,
    Operator,
    condition,
    entries_of,
    ipf,
    prefetch,
    report,
)


def test_a_spec_change_clears_the_completion_time(cluster: Cluster, operator: Operator) -> None:
    selector = {"matchLabels": {"pool": "ct"}}
    cluster.add_node("ct-a", {"pool": "ct"})
    cluster.apply(prefetch("ct", "default", images=["nginx:1.27"], nodeSelector=selector))
    cluster.wait_for(lambda: entries_of(cluster, "ct-a", "ct"))
    report(cluster, "ct-a", "Ready")
    cluster.wait_for(lambda: ipf(cluster, "ct", "default")["status"].get("phase") == "Complete")
    cluster.apply(prefetch("ct", "default", images=["nginx:1.27", "redis:7"],
                           nodeSelector=selector))
    cluster.wait_for(lambda: ipf(cluster, "ct", "default")["status"].get("phase")
                     == "Progressing")
    time.sleep(1)
    assert "completionTime" not in ipf(cluster, "ct", "default")["status"]


def test_a_complete_prefetch_whose_nodes_left_stays_complete(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("lv-a", {"pool": "lv"})
    cluster.apply(prefetch("lv", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "lv"}}))
    cluster.wait_for(lambda: entries_of(cluster, "lv-a", "lv"))
    report(cluster, "lv-a", "Ready")
    cluster.wait_for(lambda: ipf(cluster, "lv", "default")["status"].get("phase") == "Complete")
    cluster.delete("v1", "nodes", "lv-a")
    time.sleep(2)
    obj = ipf(cluster, "lv", "default")
    assert obj["status"]["phase"] == "Complete"
    assert condition(obj, "Complete")["status"] == "True"


def test_cordoning_a_node_keeps_the_images_of_a_finished_prefetch(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("cd-a", {"pool": "cd"})
    cluster.apply(prefetch("cd", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "cd"}}))
    cluster.wait_for(lambda: entries_of(cluster, "cd-a", "cd"))
    report(cluster, "cd-a", "Ready")
    cluster.wait_for(lambda: ipf(cluster, "cd", "default")["status"].get("phase") == "Complete")
    cluster.add_node("cd-a", {"pool": "cd"}, unschedulable=True)
    time.sleep(2)
    assert entries_of(cluster, "cd-a", "cd")
    assert ipf(cluster, "cd", "default")["status"]["phase"] == "Complete"


def test_prefetches_sharing_a_pull_secret_deleted_together_leave_no_copy(
        cluster: Cluster, operator: Operator) -> None:
    cluster.put("v1", "namespaces", {"metadata": {"name": "team2"}})
    config = base64.b64encode(json.dumps({"auths": {"registry.example.com": {
        "auth": base64.b64encode(b"robot:pw").decode()}}}).encode()).decode()
    cluster.put("v1", "secrets", {"metadata": {"name": "regcred", "namespace": "team2"},
                                  "type": "kubernetes.io/dockerconfigjson",
                                  "data": {".dockerconfigjson": config}})
    cluster.add_node("cs-a", {"pool": "cs"})
    names = [f"cs{i}" for i in range(6)]
    cluster.apply(*[prefetch(n, "team2", images=[f"registry.example.com/team/api:{i}"],
                             imagePullSecrets=[{"name": "regcred"}],
                             nodeSelector={"matchLabels": {"pool": "cs"}})
                    for i, n in enumerate(names)])

    def copies() -> list[dict[str, object]]:
        return [s for s in cluster.list("v1", "secrets", OPERATOR_NAMESPACE)
                if s["metadata"].get("annotations", {}).get("prefetcher.dev/source")
                == "team2/regcred"]

    def users() -> int:
        found = copies()
        annotations: dict[str, str] = found[0]["metadata"]["annotations"]  # type: ignore[index]
        return len(found) == 1 and len(json.loads(annotations["prefetcher.dev/used-by"]))
    cluster.wait_for(lambda: users() == 6 and len(entries_of(cluster, "cs-a")) == 6, timeout=20)
    cluster.kubectl("delete", "ipf", *names, "-n", "team2", "--timeout=30s")
    cluster.wait_for(lambda: copies() == [], timeout=10)
