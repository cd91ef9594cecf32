"""The real operator: status that never lies (spec edits, healing failures, bad specs).

Node agents are simulated by writing NodeImageSet statuses as agents do (with the
``observedGeneration`` of the spec they acted on).
"""

from __future__ import annotations

import json

from tests.kube.cluster import Cluster

from .conftest import API, Operator, condition, entries_of, ipf, prefetch, report


def phase(cluster: Cluster, name: str) -> str:
    return str((ipf(cluster, name, "default").get("status") or {}).get("phase"))


def test_an_edited_spec_reaches_the_nodes_and_old_results_do_not_finish_it(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("edit-a", {"pool": "edit"})
    cluster.apply(prefetch("edit", "default", images=["registry.example.com/private:1"],
                           timeoutSeconds=60, nodeSelector={"matchLabels": {"pool": "edit"}}))
    cluster.wait_for(lambda: entries_of(cluster, "edit-a", "edit"))
    report(cluster, "edit-a", "Failed", reason="Unauthorized", message="401")
    cluster.kubectl("wait", "--for=condition=Failed", "ipf/edit", "-n", "default",
                    "--timeout=15s")
    cluster.kubectl("patch", "ipf", "edit", "-n", "default", "--type=merge",
                    "-p", json.dumps({"spec": {"timeoutSeconds": 600}}))
    cluster.wait_for(lambda: entries_of(cluster, "edit-a", "edit")[0]
                     .get("timeoutSeconds") == 600)
    cluster.wait_for(lambda: ipf(cluster, "edit", "default")["status"]
                     .get("observedGeneration") == 2)
    # The node's Failed is about the previous spec: not a result for generation 2.
    obj = ipf(cluster, "edit", "default")
    assert obj["status"]["phase"] == "Progressing"
    assert "completionTime" not in obj["status"]
    assert condition(obj, "Failed")["status"] == "False"
    report(cluster, "edit-a", "Ready")
    cluster.kubectl("wait", "--for=condition=Complete", "ipf/edit", "-n", "default",
                    "--timeout=15s")


def test_a_failed_prefetch_that_heals_is_not_complete_while_a_node_downloads(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("heal-a", {"pool": "heal"})
    cluster.add_node("heal-b", {"pool": "heal"})
    cluster.apply(prefetch("heal", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "heal"}}))
    cluster.wait_for(lambda: entries_of(cluster, "heal-a", "heal")
                     and entries_of(cluster, "heal-b", "heal"))
    report(cluster, "heal-a", "Ready")
    report(cluster, "heal-b", "Failed", reason="Timeout", message="gave up")
    cluster.wait_for(lambda: phase(cluster, "heal") == "Failed")
    report(cluster, "heal-b", "Downloading", bytesDone=10)  # its agent retries
    cluster.wait_for(lambda: phase(cluster, "heal") == "Progressing")
    obj = ipf(cluster, "heal", "default")
    assert condition(obj, "Complete")["status"] == "False"
    assert "completionTime" not in obj["status"]
    report(cluster, "heal-b", "Ready")
    cluster.kubectl("wait", "--for=condition=Complete", "ipf/heal", "-n", "default",
                    "--timeout=15s")
    described = cluster.kubectl("describe", "ipf", "heal", "-n", "default").stdout
    assert "Completed" in described and "Resumed" in described


def test_an_invalid_spec_shows_its_phase_in_every_column(
        cluster: Cluster, operator: Operator) -> None:
    cluster.apply(prefetch("twice", "default", images=["nginx", "nginx:latest"]))
    cluster.wait_for(lambda: phase(cluster, "twice") == "Failed")
    table = cluster.kubectl("get", "ipf", "twice", "-n", "default").stdout.split("\n")
    header, row = table[0].split(), table[1].split()
    assert header[:7] == ["NAME", "IMAGES", "NODES", "READY", "FAILED", "PROGRESS", "PHASE"]
    assert row[:7] == ["twice", "2", "0", "0/0", "0", "0%", "Failed"]
    wide = cluster.kubectl("get", "ipf", "twice", "-n", "default", "-o", "wide").stdout
    assert "InvalidSpec" in wide
    assert cluster.get(API, "imageprefetches", "twice", "default") is not None


def events_of(cluster: Cluster, name: str, reason: str) -> list[dict[str, object]]:
    return [e for e in cluster.list("v1", "events", "default")
            if e["involvedObject"].get("name") == name and e["reason"] == reason]


def test_bad_node_names_and_selectors_say_why_in_a_condition_and_an_event(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("named-a", {"pool": "named"})
    cluster.apply(prefetch("named", "default", images=["nginx:1.27"],
                           nodeNames=["named-a", "named-typo"]))
    cluster.wait_for(lambda: condition(ipf(cluster, "named", "default"), "Degraded")
                     .get("reason") == "NodeNotFound")
    assert "named-typo" in condition(ipf(cluster, "named", "default"), "Degraded")["message"]
    cluster.wait_for(lambda: events_of(cluster, "named", "NodeNotFound"))
    cluster.wait_for(lambda: entries_of(cluster, "named-a", "named"))
    report(cluster, "named-a", "Ready")  # the node that exists still completes
    cluster.kubectl("wait", "--for=condition=Complete", "ipf/named", "-n", "default",
                    "--timeout=15s")

    cluster.apply(prefetch("nomatch", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "nowhere"}}))
    cluster.wait_for(lambda: condition(ipf(cluster, "nomatch", "default"), "Progressing")
                     .get("reason") == "NoMatchingNodes")
    cluster.wait_for(lambda: events_of(cluster, "nomatch", "NoMatchingNodes"))
    # kubectl wait does not hang without a word: the reason is a column too.
    wide = cluster.kubectl("get", "ipf", "nomatch", "-n", "default", "-o", "wide").stdout
    assert "NoMatchingNodes" in wide and "Pending" in wide


def test_a_node_that_retries_shows_as_retrying_with_its_message(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("retry-a", {"pool": "retry"})
    cluster.apply(prefetch("retry", "default", images=["nginx:1.27"],
                           nodeSelector={"matchLabels": {"pool": "retry"}}))
    cluster.wait_for(lambda: entries_of(cluster, "retry-a", "retry"))
    report(cluster, "retry-a", "Pending", reason="Unavailable",
           message="attempt 1 of 4 failed: dial tcp: connection refused; retrying in 10s")
    cluster.wait_for(lambda: condition(ipf(cluster, "retry", "default"), "Progressing")
                     .get("reason") == "Retrying")
    message = condition(ipf(cluster, "retry", "default"), "Progressing")["message"]
    assert "retry-a" in message and "connection refused" in message


def test_a_dead_agent_is_an_event_and_frees_its_slot_after_the_grace_period(
        cluster: Cluster, operator: Operator) -> None:
    cluster.add_node("grace-a", {"pool": "grace"})
    cluster.add_node("grace-b", {"pool": "grace"})
    cluster.apply(prefetch("grace", "default", images=["nginx:1.27"], parallelism=1,
                           nodeSelector={"matchLabels": {"pool": "grace"}}))
    cluster.wait_for(lambda: entries_of(cluster, "grace-a", "grace"))
    # grace-a's agent never reports: after agent_heartbeat_timeout (5s here) its slot is
    # given to grace-b, and an Event says why.
    cluster.wait_for(lambda: events_of(cluster, "grace", "AgentUnavailable"))
    cluster.wait_for(lambda: entries_of(cluster, "grace-b", "grace"), timeout=20)
    report(cluster, "grace-b", "Ready")
    cluster.wait_for(lambda: (ipf(cluster, "grace", "default")["status"]["nodes"]
                              .get("ready")) == 1)
    obj = ipf(cluster, "grace", "default")
    assert obj["status"]["nodes"]["agentUnavailable"] == 1
    assert condition(obj, "Progressing")["reason"] == "AgentUnavailable"
    assert "grace-a" in condition(obj, "Progressing")["message"]
