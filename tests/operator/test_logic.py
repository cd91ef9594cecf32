"""The operator's pure parts: spec validation, node selection, entries, planning, status."""

from __future__ import annotations

from typing import Any

import pytest

from agent.images import references
from agent.operator import (
    daemonsets,
    dispatching,
    entries,
    errors,
    nodes,
    prefetches,
    secrets,
    status,
    throttling,
    traceparents,
)


def body(**spec: Any) -> dict[str, Any]:
    spec.setdefault("images", ["nginx:1.27"])
    return {"metadata": {"namespace": "ns", "name": "p", "uid": "u1", "generation": 1},
            "spec": spec}


def test_parse_applies_defaults() -> None:
    p = prefetches.parse(body())
    assert (p.pull_policy, p.backoff_limit, p.completion_policy, p.parallelism) == \
        ("IfNotPresent", 3, "Always", None)
    assert str(p.images[0][1]) == "docker.io/library/nginx:1.27"


@pytest.mark.parametrize(("spec", "field"), [
    ({"images": ["nginx", "docker.io/library/nginx:latest"]}, "spec.images[1]"),
    ({"images": ["UPPER"]}, "spec.images[0]"),
    ({"completionPolicy": "Never", "ttlSecondsAfterFinished": 5}, "spec.ttlSecondsAfterFinished"),
    ({"progressTimeout": "soon"}, "spec.progressTimeout"),
    ({"nodeSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "spec.nodeSelector.matchExpressions[0].values"),
    ({"parallelism": 0}, "spec.parallelism"),
])
def test_invalid_specs_name_the_field(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.InvalidSpec) as info:
        prefetches.parse(body(**spec))
    assert info.value.field == field


def node(name: str, labels: dict[str, str] | None = None, ready: bool = True,
         cordoned: bool = False) -> nodes.Node:
    return nodes.Node(name, labels or {}, ready, cordoned)


def test_selection_honours_selector_names_readiness_and_cordons() -> None:
    all_nodes = [node("a", {"pool": "web"}), node("b", {"pool": "db"}),
                 node("c", {"pool": "web"}, ready=False), node("d", {"pool": "web"}, cordoned=True),
                 node("e", {"pool": "web", "gpu": "1"})]
    p = prefetches.parse(body(nodeSelector={"matchLabels": {"pool": "web"}, "matchExpressions": [
        {"key": "gpu", "operator": "DoesNotExist"}]}))
    assert nodes.select(p, all_nodes) == ["a"]
    p = prefetches.parse(body(nodeNames=["c", "d"], includeNotReadyNodes=True,
                              includeUnschedulableNodes=True))
    assert nodes.select(p, all_nodes) == ["c", "d"]
    assert nodes.select(prefetches.parse(body()), all_nodes) == ["a", "b", "e"]


def test_entry_names_are_stable_dns_labels() -> None:
    name = entries.entry_name(references.parse("registry.example.com/Team_x/app:V1.2"
                                               .lower()))
    assert name == entries.entry_name(references.parse("registry.example.com/team_x/app:v1.2"))
    assert len(name) <= 63 and name.replace("-", "").isalnum()


def contribution(uid: str, **spec: Any) -> Any:
    p = prefetches.parse({**body(**spec), "metadata": {"namespace": "ns", "name": uid,
                                                        "uid": uid, "generation": 1}})
    return entries.contribution(p, p.images[0][1], "", [f"copy-{uid}"], "")


def test_entries_merge_owners_and_take_the_most_lenient_settings() -> None:
    a = contribution("a", timeoutSeconds=10, progressTimeout="30s")
    b = contribution("b", timeoutSeconds=60, progressTimeout="0", pullPolicy="Always",
                     completionPolicy="Never")
    merged = entries.upsert(entries.upsert([], [a]), [b])
    assert len(merged) == 1
    entry = merged[0]
    assert [o["uid"] for o in entry["owners"]] == ["a", "b"]
    assert (entry["timeoutSeconds"], entry["progressTimeout"], entry["pullPolicy"],
            entry["pinned"]) == (60, "0", "Always", True)
    assert entry["pullSecrets"] == ["copy-a", "copy-b"]
    released = entries.release(merged, "b", known={("a", a["name"]): a})
    assert released == [entries.combine([a])]
    assert entries.release(released, "a") == []


def report(state: str) -> dispatching.NodeReport:
    return dispatching.NodeReport("x", state, {})


def test_plan_keeps_parallelism_and_withdraws_from_nodes_that_left() -> None:
    desired = {"img": {"name": "img", "image": "i", "owners": [
        {"namespace": "ns", "name": "p", "uid": "u1"}], "pullPolicy": "IfNotPresent",
        "backoffLimit": 3, "pinned": False}}
    dispatched = {"a": desired, "b": desired, "gone": desired}
    reports = {"a": report(dispatching.PULLING), "b": report(dispatching.READY),
               "gone": report(dispatching.READY)}
    plan = dispatching.plan(["a", "b", "c", "d"], dispatched, desired, reports, parallelism=2)
    assert plan.dispatch == ("c",) and plan.withdraw == ("gone",) and plan.refresh == ()
    reports["a"] = report(dispatching.AGENT_UNAVAILABLE)  # holds its slot
    assert dispatching.plan(["a", "b", "c"], dispatched, desired, reports, 1).dispatch == ()
    assert dispatching.plan(["a", "b", "c"], dispatched, desired, reports, None,
                            frozen=True).dispatch == ()


def test_reports_ignore_results_for_another_digest() -> None:
    entry = {"name": "img", "image": "i", "owners": [], "digest": "sha256:" + "b" * 64}
    stale = {"images": [{"name": "img", "phase": "Ready", "digest": "sha256:" + "a" * 64}]}
    assert dispatching.report("n", {"img": entry}, stale, True).state == dispatching.PULLING
    assert dispatching.report("n", {"img": entry}, None, False).state == \
        dispatching.AGENT_UNAVAILABLE


def test_aggregate_counts_bytes_failures_and_conditions() -> None:
    images = [status.ResolvedImage("nginx", "img", "docker.io/library/nginx:latest", "")]
    reports = {
        "a": dispatching.NodeReport("a", dispatching.READY, {"img": {
            "name": "img", "phase": "Ready", "bytesDone": 10, "bytesTotal": 10}}),
        "b": dispatching.NodeReport("b", dispatching.FAILED, {"img": {
            "name": "img", "phase": "Stalled", "reason": "PullStalled", "message": "no progress",
            "stallCancellations": 2, "bytesDone": 5, "bytesTotal": 10}}),
    }
    result = status.aggregate(generation=3, completion_policy="Always", desired_nodes=["a", "b"],
                              dispatched=["a", "b"], reports=reports, images=images,
                              previous={}, now="2026-01-01T00:00:00Z")
    assert result["phase"] == "Failed" and result["completionTime"]
    # the stalled node's 5 bytes are not progress
    assert result["summary"] == {"images": 1, "ready": "1/2", "progress": "50%"}
    assert result["stalledCancellations"] == 2
    assert result["failures"][0]["reason"] == "PullStalled"
    conditions = {c["type"]: c for c in result["conditions"]}
    assert conditions["Failed"]["status"] == "True" and conditions["Complete"]["status"] == "False"
    assert all(c["observedGeneration"] == 3 for c in conditions.values())


def test_failures_are_capped() -> None:
    images = [status.ResolvedImage("x", "img", "x", "")]
    reports = {f"n{i}": dispatching.NodeReport(f"n{i}", dispatching.FAILED, {"img": {
        "name": "img", "phase": "Failed"}}) for i in range(50)}
    result = status.aggregate(generation=1, completion_policy="Always", desired_nodes=reports,
                              dispatched=reports, reports=reports, images=images, previous={},
                              now="t")
    assert len(result["failures"]) == status.MAX_FAILURES
    assert result["nodes"]["failed"] == 50


def test_throttle_allows_one_write_per_interval_unless_urgent() -> None:
    t = throttling.Throttle(1.0)
    assert t.delay("a", 10.0) == 0
    t.written("a", 10.0)
    assert t.delay("a", 10.4) == pytest.approx(0.6)
    assert t.delay("a", 10.4, urgent=True) == 0
    assert t.delay("a", 11.0) == 0


def test_secret_copies_track_their_users() -> None:
    source = {"metadata": {"namespace": "team", "name": "reg", "resourceVersion": "7"},
              "type": "kubernetes.io/dockerconfigjson", "data": {".dockerconfigjson": "e30="}}
    copy = secrets.build_copy(source, "ops", ["u2", "u1"])
    assert copy["metadata"]["namespace"] == "ops"
    assert secrets.users(copy) == ["u1", "u2"]
    assert secrets.up_to_date(copy, source, "u1")
    assert not secrets.up_to_date(copy, {**source, "metadata": {**source["metadata"],
                                                                "resourceVersion": "8"}}, "u1")


def test_daemonset_drift_is_detected_but_server_defaults_are_not_drift() -> None:
    template = {"kind": "DaemonSet", "metadata": {"name": "agent"},
                "spec": {"template": {"spec": {"containers": [{"name": "a", "image": "x:1"}]}}}}
    wanted = daemonsets.desired(template, "ops")
    live = {**wanted, "spec": {"template": {"spec": {"containers": [
        {"name": "a", "image": "x:1", "imagePullPolicy": "IfNotPresent"}]}},
        "revisionHistoryLimit": 10}}
    assert not daemonsets.drifted(live, wanted)
    edited = {**wanted, "spec": {"template": {"spec": {"containers": [
        {"name": "a", "image": "x:2"}]}}}}
    assert daemonsets.drifted(edited, wanted)


def test_traceparent_is_w3c() -> None:
    value = traceparents.current()
    version, trace, span, flags = value.split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "01")
