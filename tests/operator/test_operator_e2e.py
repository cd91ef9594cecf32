"""The real ``prefetcher operator`` process against the emulator, driven by real ``kubectl``.

Each test uses its own namespace and node names; node agents are simulated by writing
NodeImageSet statuses (and heartbeats) as agents would.
"""

from __future__ import annotations

import base64
import json

import yaml

from tests.kube.cluster import Cluster

from .conftest import (
    API,
    OPERATOR_NAMESPACE,
    Operator,
    condition,
    entries_of,
    ipf,
    prefetch,
    report,
)


def test_apply_fans_out_to_selected_ready_uncordoned_nodes_only(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("fan-a", {"pool": "web"})
    cluster.add_node("fan-b", {"pool": "web"})
    cluster.add_node("fan-c", {"pool": "db"})
    cluster.add_node("fan-d", {"pool": "web"}, ready=False)
    cluster.add_node("fan-e", {"pool": "web"}, unschedulable=True)
    cluster.apply(prefetch("fan", "default", images=["nginx:1.27", "redis:7"],
                           nodeSelector={"matchLabels": {"pool": "web"}}))
    cluster.wait_for(lambda: len(entries_of(cluster, "fan-a", "fan")) == 2
                     and len(entries_of(cluster, "fan-b", "fan")) == 2)
    for other in ("fan-c", "fan-d", "fan-e"):
        assert entries_of(cluster, other, "fan") == []
    entry = entries_of(cluster, "fan-a", "fan")[0]
    assert entry["owners"][0]["namespace"] == "default"
    assert entry["traceparent"].startswith("00-")
    assert {e["image"] for e in entries_of(cluster, "fan-a", "fan")} == {
        "docker.io/library/nginx:1.27", "docker.io/library/redis:7"}


def test_parallelism_limits_nodes_in_flight(cluster: Cluster, operator: Operator) -> None:
    for i in range(4):
        cluster.add_node(f"par-{i}", {"pool": "par"})
    cluster.apply(prefetch("par", "default", images=["alpine:3.20"], parallelism=2,
                           nodeSelector={"matchLabels": {"pool": "par"}}))

    def dispatched() -> list[str]:
        return [f"par-{i}" for i in range(4) if entries_of(cluster, f"par-{i}", "par")]

    cluster.wait_for(lambda: len(dispatched()) == 2)
    first = dispatched()
    for node in first:  # live agents, still pulling: nobody else may start
        report(cluster, node, "Downloading", bytesDone=10)
    cluster.wait_for(lambda: (ipf(cluster, "par", "default").get("status") or {})
                     .get("nodes", {}).get("pulling") == 2)
    assert dispatched() == first
    report(cluster, first[0], "Ready")
    cluster.wait_for(lambda: len(dispatched()) == 3)
    report(cluster, first[1], "Ready")
    cluster.wait_for(lambda: len(dispatched()) == 4)


def test_status_aggregates_node_reports_into_conditions_and_columns(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("agg-a", {"pool": "agg"})
    cluster.add_node("agg-b", {"pool": "agg"})
    cluster.apply(prefetch("agg", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "agg"}}))
    cluster.wait_for(lambda: entries_of(cluster, "agg-a", "agg") and
                     entries_of(cluster, "agg-b", "agg"))
    report(cluster, "agg-a", "Downloading", bytesDone=50, bytesTotal=100, stallCancellations=1)
    report(cluster, "agg-b", "Ready", bytesDone=100, bytesTotal=100)
    cluster.wait_for(lambda: (ipf(cluster, "agg", "default")["status"].get("bytesDone") == 150))
    status = ipf(cluster, "agg", "default")["status"]
    assert status["nodes"] == {"desired": 2, "ready": 1, "pulling": 1, "pending": 0,
                               "failed": 0, "agentUnavailable": 0}
    assert status["stalledCancellations"] == 1
    assert status["summary"] == {"images": 1, "ready": "1/2", "progress": "75%"}
    assert condition(ipf(cluster, "agg", "default"), "Progressing")["status"] == "True"
    table = cluster.kubectl("get", "ipf", "agg", "-n", "default").stdout.split("\n")
    assert table[0].split() == ["NAME", "IMAGES", "NODES", "READY", "FAILED", "PROGRESS",
                                "PHASE", "AGE"]
    assert table[1].split()[:7] == ["agg", "1", "2", "1/2", "0", "75%", "Progressing"]

    report(cluster, "agg-a", "Ready", bytesDone=100, bytesTotal=100)
    cluster.kubectl("wait", "--for=condition=Complete", "ipf/agg", "-n", "default",
                    "--timeout=15s")
    obj = ipf(cluster, "agg", "default")
    assert obj["status"]["phase"] == "Complete"
    assert obj["status"]["completionTime"] and obj["status"]["startTime"]
    assert condition(obj, "Ready")["reason"] == "AllNodesReady"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    events = cluster.kubectl("describe", "ipf", "agg", "-n", "default").stdout
    assert "Completed" in events and "Started" in events


def test_failures_are_listed_and_the_prefetch_fails(cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("bad-a", {"pool": "bad"})
    cluster.apply(prefetch("bad", "default", images=["registry.example.com/missing:1"],
                           nodeSelector={"matchLabels": {"pool": "bad"}}))
    cluster.wait_for(lambda: entries_of(cluster, "bad-a", "bad"))
    report(cluster, "bad-a", "Failed", reason="NotFound", message="manifest unknown")
    cluster.kubectl("wait", "--for=condition=Failed", "ipf/bad", "-n", "default",
                    "--timeout=15s")
    status = ipf(cluster, "bad", "default")["status"]
    assert status["failures"] == [{"node": "bad-a", "image": "registry.example.com/missing:1",
                                   "reason": "NotFound", "message": "manifest unknown"}]
    assert status["phase"] == "Failed"


def test_node_without_live_agent_is_reported_agent_unavailable(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("dead-a", {"pool": "dead"})
    cluster.apply(prefetch("dead", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "dead"}}))
    cluster.wait_for(lambda: entries_of(cluster, "dead-a", "dead"))  # still dispatched
    cluster.wait_for(lambda: condition(ipf(cluster, "dead", "default"), "Progressing")
                     .get("reason") == "AgentUnavailable")
    nodes = ipf(cluster, "dead", "default")["status"]["nodes"]
    assert nodes["agentUnavailable"] == 1 and nodes["pending"] == 1 and nodes["failed"] == 0


def test_invalid_spec_is_reported_not_crashed(cluster: Cluster, operator: Operator) -> None:
    # The schema lets this through (each image matches the pattern); the operator cannot
    # use it: both name the same image.
    cluster.apply(prefetch("dup", "default", images=["nginx", "docker.io/library/nginx:latest"]))
    cluster.wait_for(lambda: condition(ipf(cluster, "dup", "default"), "Failed")
                     .get("reason") == "InvalidSpec")
    message = condition(ipf(cluster, "dup", "default"), "Failed")["message"]
    assert "spec.images[1]" in message
    assert operator.process.poll() is None


def test_pull_secrets_are_copied_refreshed_and_cleaned_up(
        cluster: Cluster, operator: Operator) -> None:
    cluster.put("v1", "namespaces", {"metadata": {"name": "team"}})
    config = base64.b64encode(json.dumps({"auths": {"registry.example.com": {
        "auth": base64.b64encode(b"robot:pw").decode()}}}).encode()).decode()
    cluster.put("v1", "secrets", {"metadata": {"name": "regcred", "namespace": "team"},
                                  "type": "kubernetes.io/dockerconfigjson",
                                  "data": {".dockerconfigjson": config}})
    cluster.add_node("sec-a", {"pool": "sec"})
    cluster.apply(prefetch("sec", "team", images=["registry.example.com/team/api:1"],
                           imagePullSecrets=[{"name": "regcred"}],
                           nodeSelector={"matchLabels": {"pool": "sec"}}))

    def copies() -> list[dict]:
        return [s for s in cluster.list("v1", "secrets", OPERATOR_NAMESPACE)
                if s["metadata"].get("annotations", {}).get("prefetcher.dev/source")
                == "team/regcred"]

    cluster.wait_for(lambda: len(copies()) == 1 and entries_of(cluster, "sec-a", "sec"))
    copy = copies()[0]
    assert copy["data"] == {".dockerconfigjson": config}
    assert entries_of(cluster, "sec-a", "sec")[0]["pullSecrets"] == [copy["metadata"]["name"]]

    source = cluster.get("v1", "secrets", "regcred", "team")
    assert source is not None
    source["data"] = {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()}
    cluster.put("v1", "secrets", source)
    cluster.wait_for(lambda: copies()[0]["data"] == source["data"], timeout=10)

    cluster.kubectl("delete", "ipf", "sec", "-n", "team", "--timeout=20s")
    cluster.wait_for(lambda: copies() == [])
    assert entries_of(cluster, "sec-a") == []


def test_delete_removes_only_its_own_claims(cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("del-a", {"pool": "del"})
    selector = {"matchLabels": {"pool": "del"}}
    cluster.apply(prefetch("del-one", "default", images=["nginx:1.27", "busybox:1"],
                           nodeSelector=selector),
                  prefetch("del-two", "default", images=["nginx:1.27"], nodeSelector=selector))
    cluster.wait_for(lambda: len(entries_of(cluster, "del-a")) == 2 and any(
        len(e["owners"]) == 2 for e in entries_of(cluster, "del-a")))
    obj = ipf(cluster, "del-one", "default")
    assert "prefetcher.dev/node-entries" in obj["metadata"]["finalizers"]
    cluster.kubectl("delete", "ipf", "del-one", "-n", "default", "--timeout=20s")
    assert cluster.get(API, "imageprefetches", "del-one", "default") is None
    remaining = entries_of(cluster, "del-a")
    assert [e["image"] for e in remaining] == ["docker.io/library/nginx:1.27"]
    assert [o["name"] for o in remaining[0]["owners"]] == ["del-two"]


def test_nodes_that_stop_matching_lose_the_entries(cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("move-a", {"pool": "move"})
    cluster.apply(prefetch("move", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "move"}}))
    cluster.wait_for(lambda: entries_of(cluster, "move-a", "move"))
    cluster.add_node("move-a", {"pool": "elsewhere"})
    cluster.wait_for(lambda: not entries_of(cluster, "move-a", "move"))


def test_completion_policy_never_covers_joining_nodes(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("keep-a", {"pool": "keep"})
    cluster.apply(prefetch("keep", "default", images=["nginx:1.27"], completionPolicy="Never",
                           nodeSelector={"matchLabels": {"pool": "keep"}}))
    cluster.wait_for(lambda: entries_of(cluster, "keep-a", "keep"))
    assert entries_of(cluster, "keep-a", "keep")[0]["pinned"] is True
    report(cluster, "keep-a", "Ready")
    cluster.wait_for(lambda: condition(ipf(cluster, "keep", "default"), "Ready")
                     .get("status") == "True")
    cluster.add_node("keep-b", {"pool": "keep"})
    cluster.wait_for(lambda: entries_of(cluster, "keep-b", "keep"))
    assert condition(ipf(cluster, "keep", "default"), "Complete")["reason"] == "KeepingPresent"


def test_finished_prefetch_is_deleted_after_its_ttl(cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("ttl-a", {"pool": "ttl"})
    cluster.apply(prefetch("ttl", "default", images=["nginx:1.27"], ttlSecondsAfterFinished=1,
                           nodeSelector={"matchLabels": {"pool": "ttl"}}))
    cluster.wait_for(lambda: entries_of(cluster, "ttl-a", "ttl"))
    report(cluster, "ttl-a", "Ready")
    cluster.wait_for(lambda: cluster.get(API, "imageprefetches", "ttl", "default") is None,
                     timeout=15)
    assert entries_of(cluster, "ttl-a", "ttl") == []


def test_agent_daemonset_is_created_restored_and_updated(
        cluster: Cluster, operator: Operator, agent_daemonset_file) -> None:
    def live() -> dict | None:
        return cluster.get("apps/v1", "daemonsets", "prefetcher-agent", OPERATOR_NAMESPACE)

    ds = cluster.wait_for(live)
    assert ds["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "image-prefetcher-operator"
    assert ds["spec"]["template"]["spec"]["tolerations"] == [{"operator": "Exists"}]
    cluster.kubectl("delete", "daemonset", "prefetcher-agent", "-n", OPERATOR_NAMESPACE)
    cluster.wait_for(live, message="restored after deletion")

    cluster.kubectl("patch", "daemonset", "prefetcher-agent", "-n", OPERATOR_NAMESPACE,
                    "--type=merge", "-p",
                    '{"spec": {"template": {"spec": {"priorityClassName": "hacked"}}}}')
    cluster.wait_for(lambda: live()["spec"]["template"]["spec"]["priorityClassName"]
                     == "system-node-critical", message="restored after an edit")

    manifest = yaml.safe_load(agent_daemonset_file.read_text())
    manifest["spec"]["template"]["spec"]["containers"][0]["image"] = \
        "ghcr.io/example/image-prefetcher:0.2.0"
    agent_daemonset_file.write_text(yaml.safe_dump(manifest))
    cluster.wait_for(lambda: live()["spec"]["template"]["spec"]["containers"][0]["image"]
                     .endswith(":0.2.0"), message="rolled after a settings change")


def test_operator_calls_are_recorded_for_rbac(cluster: Cluster, operator: Operator) -> None:
    used = {(c.verb, c.group, c.resource, c.subresource) for c in cluster.calls()
            if c.user_agent.startswith(("image-prefetcher", "kopf"))}
    assert ("patch", "prefetcher.dev", "imageprefetches", "status") in used
    assert ("create", "prefetcher.dev", "nodeimagesets", "") in used
    assert ("watch", "", "nodes", "") in used
