"""The emulator behaves like an API server where kubectl and kopf depend on it."""

from __future__ import annotations

import json
import subprocess

import httpx
import pytest

from .cluster import Cluster
from .emulator import json_patch

API = "prefetcher.dev/v1alpha1"


def test_core_discovery_serves_group_version_v1(cluster: Cluster) -> None:
    doc = httpx.get(cluster.url + "/api/v1").json()
    assert doc["groupVersion"] == "v1"
    assert "NodeImageSet" in cluster.kubectl("api-resources", "--api-group=prefetcher.dev").stdout


def test_crds_become_established_and_discoverable(cluster: Cluster) -> None:
    cluster.kubectl("wait", "--for=condition=Established", "crd/imageprefetches.prefetcher.dev",
                    "--timeout=5s")
    resources = httpx.get(cluster.url + f"/apis/{API}").json()["resources"]
    names = {r["name"] for r in resources}
    assert {"imageprefetches", "imageprefetches/status", "nodeimagesets",
            "nodeimagesets/status"} <= names


def test_stale_resource_version_conflicts(cluster: Cluster) -> None:
    cluster.add_node("n1")
    obj = httpx.get(cluster.url + "/api/v1/nodes/n1").json()
    changed = {**obj, "metadata": {**obj["metadata"], "labels": {"x": "1"}}}
    first = httpx.put(cluster.url + "/api/v1/nodes/n1", json=changed)
    assert first.status_code == 200
    assert int(first.json()["metadata"]["resourceVersion"]) > int(
        obj["metadata"]["resourceVersion"])
    stale = httpx.put(cluster.url + "/api/v1/nodes/n1", json=changed)  # the old version
    assert stale.status_code == 409 and stale.json()["reason"] == "Conflict"
    conflict = httpx.patch(cluster.url + "/api/v1/nodes/n1", json=changed,
                           headers={"Content-Type": "application/merge-patch+json"})
    assert conflict.status_code == 409


def test_status_subresource_separates_spec_and_status(cluster: Cluster) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps({
        "apiVersion": API, "kind": "NodeImageSet", "metadata": {"name": "n1"},
        "spec": {"images": []}, "status": {"summary": {"images": 9}}}))
    base = cluster.url + f"/apis/{API}/nodeimagesets/n1"
    assert "status" not in httpx.get(base).json()
    merge = {"Content-Type": "application/merge-patch+json"}
    httpx.patch(base + "/status", json={"status": {"summary": {"images": 1}},
                                        "spec": {"images": None}}, headers=merge)
    obj = httpx.get(base).json()
    assert obj["status"]["summary"] == {"images": 1} and obj["spec"] == {"images": []}
    generation = obj["metadata"]["generation"]
    httpx.patch(base, json={"spec": {"images": None}, "status": None}, headers=merge)
    obj = httpx.get(base).json()
    assert obj["status"]["summary"] == {"images": 1}
    assert obj["metadata"]["generation"] == generation + 1


def test_label_and_field_selectors(cluster: Cluster) -> None:
    cluster.add_node("a", {"pool": "web"})
    cluster.add_node("b", {"pool": "db"})
    names = cluster.kubectl("get", "nodes", "-l", "pool in (web,gpu)", "-o", "name").stdout
    assert names.split() == ["node/a"]
    names = cluster.kubectl("get", "nodes", "--field-selector", "metadata.name=b",
                            "-o", "name").stdout
    assert names.split() == ["node/b"]
    assert cluster.kubectl("get", "nodes", "-l", "!pool", "-o", "name").stdout.strip() == ""


def test_watch_resumes_from_a_resource_version_with_bookmarks(cluster: Cluster) -> None:
    cluster.add_node("w1")
    start = httpx.get(cluster.url + "/api/v1/nodes").json()["metadata"]["resourceVersion"]
    cluster.add_node("w2")
    cluster.add_node("w3", {"x": "1"})
    events = []
    params = {"watch": "true", "resourceVersion": start, "allowWatchBookmarks": "true",
              "timeoutSeconds": "2", "fieldSelector": "metadata.name!=w3"}
    with httpx.stream("GET", cluster.url + "/api/v1/nodes", params=params, timeout=5) as r:
        for line in r.iter_lines():
            if line:
                events.append(json.loads(line))
    kinds = [(e["type"], e["object"]["metadata"].get("name")) for e in events]
    assert kinds[0] == ("ADDED", "w2")
    assert ("ADDED", "w3") not in kinds
    assert ("BOOKMARK", None) in kinds


def test_finalizers_delay_deletion(cluster: Cluster) -> None:
    cluster.put("v1", "namespaces", {"metadata": {"name": "f"}})
    cluster.put("v1", "configmaps", {"metadata": {"name": "c", "namespace": "f",
                                                  "finalizers": ["x/y"]}})
    cluster.kubectl("delete", "configmap", "c", "-n", "f", "--wait=false")
    obj = cluster.get("v1", "configmaps", "c", "f")
    assert obj is not None and obj["metadata"]["deletionTimestamp"]
    cluster.kubectl("patch", "configmap", "c", "-n", "f", "--type=merge", "-p",
                    '{"metadata": {"finalizers": null}}')
    assert cluster.get("v1", "configmaps", "c", "f") is None


def test_requests_are_recorded_for_rbac(cluster: Cluster) -> None:
    cluster.kubectl("get", "nis", "-l", "a=b")
    calls = [c for c in cluster.calls() if c.resource == "nodeimagesets"]
    assert calls[-1].verb == "list" and calls[-1].label_selector == "a=b"


def test_a_failed_json_patch_test_is_422_as_kopf_expects() -> None:
    doc = {"metadata": {"resourceVersion": "5"}}
    ok = json_patch(doc, [{"op": "test", "path": "/metadata/resourceVersion", "value": "5"},
                          {"op": "add", "path": "/spec", "value": {}}])
    assert ok["spec"] == {}
    from .emulator import APIError

    with pytest.raises(APIError) as failed:
        json_patch(doc, [{"op": "test", "path": "/metadata/resourceVersion", "value": "4"}])
    assert failed.value.code == 422  # kopf re-applies its finalizer patch only after a 422


def test_kubectl_is_real() -> None:
    assert "Client Version" in subprocess.run(["kubectl", "version", "--client"],
                                              capture_output=True, text=True).stdout


def test_delete_preconditions_refuse_a_changed_or_replaced_object(cluster: Cluster) -> None:
    """A DELETE with ``preconditions`` deletes only the object as it was read: the
    operator's conditional deletes (secret copies) depend on it."""
    path = cluster.url + "/api/v1/namespaces/default/configmaps"
    created = httpx.post(path, json={"apiVersion": "v1", "kind": "ConfigMap",
                                     "metadata": {"name": "pre"}, "data": {"a": "1"}}).json()
    meta = created["metadata"]
    changed = httpx.put(path + "/pre", json={**created, "data": {"a": "2"}})
    assert changed.status_code == 200

    def delete(**preconditions: str) -> httpx.Response:
        return httpx.request("DELETE", path + "/pre", json={
            "apiVersion": "v1", "kind": "DeleteOptions", "preconditions": preconditions})

    stale = delete(resourceVersion=meta["resourceVersion"])
    assert stale.status_code == 409
    assert "Precondition failed" in stale.json()["message"]
    assert delete(uid="another-uid").status_code == 409
    assert httpx.get(path + "/pre").status_code == 200
    assert delete(uid=meta["uid"],
                  resourceVersion=changed.json()["metadata"]["resourceVersion"]
                  ).status_code == 200
    assert httpx.get(path + "/pre").status_code == 404
