"""The operator's DaemonSet keeper on the chart's own DaemonSet.

Two keepers with different copies of the manifest (an operator upgrade: the old pod still
runs with the previous release's copy while the new one has the next) take turns against
the API emulator with the real client: the DaemonSet must settle on the newer revision and
stay there. A live DaemonSet whose quantities the API server canonicalised (``cpu: 0.5``
stored as ``500m``) is not drift.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.operator import daemonsets, kubeapi
from tests.kube.cluster import Cluster

from .conftest import NAMESPACE, Release, install

JSON = dict[str, Any]
HASH = "prefetcher.dev/template-hash"
REVISION = "prefetcher.dev/template-revision"


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart installed with a CPU request written as a decimal (0.5)."""
    yield from install(tmp_path_factory.mktemp("keeper"), {"agent": {"resources": {
        "requests": {"cpu": 0.5, "memory": "128Mi"}, "limits": {"memory": "1Gi"}}}})


def copy_of(release: Release, *, revision: int, image: str = "") -> JSON:
    """The chart's copy of the DaemonSet at ``revision`` (another image = another hash)."""
    body = copy.deepcopy(release.agent_daemonset_copy)
    body["metadata"]["annotations"][REVISION] = str(revision)
    if image:
        body["spec"]["template"]["spec"]["containers"][0]["image"] = image
        body["metadata"]["annotations"][HASH] = daemonsets.template_hash(body["spec"])
    return body


def keeper(cluster: Cluster, path: Path, body: JSON) -> daemonsets.Keeper:
    path.write_text(yaml.safe_dump(body))
    client = kubeapi.Client(kubeapi.load_connection(str(cluster.kubeconfig_path)))
    return daemonsets.Keeper(client, NAMESPACE, str(path))


def writes(cluster: Cluster) -> int:
    return sum(1 for c in cluster.calls() if c.resource == "daemonsets"
               and c.verb in ("create", "update", "patch", "delete"))


def live(cluster: Cluster, name: str) -> JSON:
    body = cluster.get("apps/v1", "daemonsets", name, NAMESPACE)
    assert body is not None
    return body


def test_old_and_new_operators_do_not_take_turns(release: Release, tmp_path: Path) -> None:
    cluster = release.cluster
    name = release.agent_daemonset["metadata"]["name"]
    old = keeper(cluster, tmp_path / "old.yaml", copy_of(release, revision=1))
    new = keeper(cluster, tmp_path / "new.yaml",
                 copy_of(release, revision=2, image="ghcr.io/image-prefetcher/x:0.2.0"))

    async def turns() -> None:
        try:
            for _ in range(2):  # the old operator first: the live DaemonSet is its own
                await old.check()
            for _ in range(6):
                await new.check()
                await old.check()
        finally:
            await old.client.aclose()
            await new.client.aclose()

    before = writes(cluster)
    asyncio.run(turns())
    body = live(cluster, name)
    assert body["metadata"]["annotations"][REVISION] == "2"
    assert body["spec"]["template"]["spec"]["containers"][0]["image"].endswith("x:0.2.0")
    assert writes(cluster) - before == 1, "the DaemonSet changed more than once"
    # Both keepers know the DaemonSet that really schedules the agents (the newer one).
    assert old.live is not None and new.live is not None
    assert old.live["metadata"]["annotations"][REVISION] == "2"
    # What Helm put in the metadata stays: the next helm upgrade still owns the object.
    assert body["metadata"]["annotations"]["meta.helm.sh/release-name"] == "ipf"
    assert body["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"


def test_canonicalised_quantities_are_not_drift(release: Release, tmp_path: Path) -> None:
    """The chart renders cpu 0.5; the API server stores 500m (the emulator does not, so the
    test writes it as the server would)."""
    cluster = release.cluster
    name = release.agent_daemonset["metadata"]["name"]
    body = copy_of(release, revision=5)
    assert body["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"][
        "cpu"] == 0.5
    stored = live(cluster, name)
    stored["metadata"]["annotations"].update({HASH: body["metadata"]["annotations"][HASH],
                                              REVISION: "5"})
    stored["spec"] = copy.deepcopy(body["spec"])
    container = stored["spec"]["template"]["spec"]["containers"][0]
    container["resources"] = {"requests": {"cpu": "500m", "memory": "134217728"},
                              "limits": {"memory": "1024Mi"}}
    cluster.put("apps/v1", "daemonsets", stored)
    one = keeper(cluster, tmp_path / "one.yaml", body)

    async def checks() -> None:
        try:
            for _ in range(3):
                await one.check()
        finally:
            await one.client.aclose()

    before = writes(cluster)
    asyncio.run(checks())
    assert writes(cluster) == before, "a canonicalised quantity was taken for drift"
    assert live(cluster, name)["spec"]["template"]["spec"]["containers"][0]["resources"][
        "requests"]["cpu"] == "500m"


# ------------------------------------------------------------------------------ decisions


def manifest(revision: int = 0, image: str = "x:1", cpu: Any = "500m") -> JSON:
    annotations = {REVISION: str(revision)} if revision else {}
    return {"kind": "DaemonSet", "metadata": {"name": "agent", "annotations": annotations},
            "spec": {"template": {"spec": {"containers": [
                {"name": "a", "image": image, "resources": {"requests": {"cpu": cpu}}}]}}}}


def test_what_the_keeper_does_with_the_live_daemonset() -> None:
    wanted = daemonsets.desired(manifest(3), "ns")
    assert daemonsets.decide(None, wanted) == "create"
    assert daemonsets.decide(wanted, wanted) == "keep"
    edited = copy.deepcopy(wanted)
    edited["spec"]["template"]["spec"]["containers"][0]["image"] = "x:hacked"
    assert daemonsets.decide(edited, wanted) == "repair"
    newer = daemonsets.desired(manifest(4, image="x:2"), "ns")
    older = daemonsets.desired(manifest(2, image="x:0"), "ns")
    assert daemonsets.decide(newer, wanted) == "newer"
    assert daemonsets.decide(older, wanted) == "replace"
    # A hand-written file without revisions that changed: the operator is its only writer.
    assert daemonsets.decide(daemonsets.desired(manifest(image="x:0"), "ns"),
                             daemonsets.desired(manifest(image="x:1"), "ns")) == "replace"
    # A helm upgrade that changed nothing but the revision is not drift for the old copy.
    same_but_newer = copy.deepcopy(wanted)
    same_but_newer["metadata"]["annotations"][REVISION] = "4"
    assert daemonsets.decide(same_but_newer, wanted) == "keep"


def test_repair_keeps_the_newer_revision_and_others_metadata() -> None:
    wanted = daemonsets.desired(manifest(3), "ns")
    live_body = copy.deepcopy(wanted)
    live_body["metadata"]["annotations"].update({REVISION: "4", "argocd.argoproj.io/x": "y"})
    live_body["metadata"]["ownerReferences"] = [{"uid": "u"}]
    live_body["spec"]["template"]["spec"]["containers"][0]["image"] = "x:hacked"
    body = daemonsets.merged(live_body, wanted)
    assert body["spec"] == wanted["spec"]
    assert body["metadata"]["annotations"][REVISION] == "4"
    assert body["metadata"]["annotations"]["argocd.argoproj.io/x"] == "y"
    assert body["metadata"]["ownerReferences"] == [{"uid": "u"}]


@pytest.mark.parametrize(("a", "b", "same"), [
    ("500m", 0.5, True), ("1", "1000m", True), ("1Gi", "1024Mi", True),
    ("128Mi", "134217728", True), ("1e3", "1k", True), ("2", 2, True),
    ("500m", "600m", False), ("1G", "1Gi", False),
])
def test_quantities_compare_by_value(a: Any, b: Any, same: bool) -> None:
    wanted = daemonsets.desired(manifest(cpu=a), "ns")
    live_body = daemonsets.desired(manifest(cpu=b), "ns")
    live_body["metadata"]["annotations"] = wanted["metadata"]["annotations"]
    assert daemonsets.drifted(live_body, wanted) is not same


def test_quantity_parsing_refuses_what_is_not_a_quantity() -> None:
    assert daemonsets.quantity("10%") is None
    assert daemonsets.quantity("abc") is None
    assert daemonsets.quantity(True) is None
    assert daemonsets.quantity("1.5Gi") == 1.5 * 2**30


def test_missing_agent_pods_are_read_from_the_daemonset_status() -> None:
    meta = {"name": "agent", "namespace": "ns", "generation": 2}
    status = {"desiredNumberScheduled": 5, "currentNumberScheduled": 3,
              "numberUnavailable": 2, "observedGeneration": 2}
    message = daemonsets.missing_pods({"metadata": meta, "status": status})
    assert message.startswith("2 of 5 nodes have no agent pod")
    assert "kubectl describe daemonset -n ns agent" in message
    assert daemonsets.missing_pods({"metadata": meta, "status": {
        **status, "currentNumberScheduled": 5}}) == ""
    # Not yet looked at by the DaemonSet controller: nothing to say.
    assert daemonsets.missing_pods({"metadata": meta, "status": {
        **status, "observedGeneration": 1}}) == ""
