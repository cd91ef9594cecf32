"""The chart's RBAC against what the processes really do.

The operator: the REAL ``prefetcher operator`` runs on the emulator with the config and the
agent DaemonSet manifest the chart rendered, through a typical flow (nodes, pull secrets
copied and refreshed, status aggregated, TTL deletion, finalizer on delete, its DaemonSet
created and restored). Every request it sent must be allowed by the rules the chart binds to
its ServiceAccount, and every rule must have been needed.

The agent: its process contract (written down below until the agent's own e2e test runs it)
against the rules bound to the agents' ServiceAccount, both ways, plus what must be denied.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.operator import roles, secrets
from tests.kube.cluster import Cluster

from . import rbac
from .conftest import NAMESPACE, RELEASE, Release, install

API = "prefetcher.dev/v1alpha1"
PREFETCHER = str(Path(sys.executable).with_name("prefetcher"))
OPERATOR_SA = f"{RELEASE}-image-prefetcher-operator"
AGENT_SA = f"{RELEASE}-image-prefetcher-agent"
AGENT_DS = f"{RELEASE}-image-prefetcher-agent"
AGENT_DS_CONFIG = f"{RELEASE}-image-prefetcher-agent-daemonset"
AGENT_SECRETS_ROLE = f"{RELEASE}-image-prefetcher-agent-pull-secrets"
COPY = secrets.copy_name("team", "regcred")
JSON = dict[str, Any]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def report_ready(cluster: Cluster, node: str) -> None:
    """Write the node's status as its agent would: every entry Ready, a fresh heartbeat."""
    nis = cluster.get(API, "nodeimagesets", node)
    assert nis is not None
    nis["status"] = {
        "observedGeneration": nis["metadata"]["generation"],  # as agents write it
        "images": [{"name": e["name"], "image": e["image"], "phase": "Ready",
                    "digest": e.get("digest", ""), "bytesDone": 10, "bytesTotal": 10,
                    "attempts": 1} for e in nis["spec"]["images"]],
        "agent": {"version": "0.1.0",
                  "storeCapacityBytes": 10**11, "storeFreeBytes": 5 * 10**10},
    }
    cluster.put(API, "nodeimagesets", nis)
    cluster.renew_heartbeat(node, NAMESPACE)


def prefetch(name: str, **spec: Any) -> JSON:
    return {"apiVersion": API, "kind": "ImagePrefetch",
            "metadata": {"name": name, "namespace": "team"},
            "spec": {"images": ["registry.example.com/team/api:1"],
                     "nodeSelector": {"matchLabels": {"pool": "rbac"}}, **spec}}


def copies(cluster: Cluster) -> list[JSON]:
    return [s for s in cluster.list("v1", "secrets", NAMESPACE)
            if (s["metadata"].get("annotations") or {}).get("prefetcher.dev/source")]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    yield from install(tmp_path_factory.mktemp("rbac"))


@pytest.fixture(scope="module")
def operator_flow(installed: Release, tmp_path_factory: pytest.TempPathFactory) -> JSON:
    """Run the operator from the chart's files through a typical flow; what it did."""
    cluster = installed.cluster
    workdir = tmp_path_factory.mktemp("operator")
    config = workdir / "config.toml"
    config.write_text(installed.config_toml)
    daemonset = workdir / "agent-daemonset.yaml"
    daemonset.write_text(installed.configmap_file("-agent-daemonset", "agent-daemonset.yaml"))
    port = free_port()
    env = cluster.env() | {
        # Only the pacing is shortened, and nothing is resolved from a real registry.
        "PREFETCHER_OPERATOR__STATUS_INTERVAL": "200ms",
        "PREFETCHER_OPERATOR__RESYNC_INTERVAL": "1s",
        "PREFETCHER_OPERATOR__SECRET_REFRESH_INTERVAL": "1s",
        "PREFETCHER_OPERATOR__DAEMONSET_CHECK_INTERVAL": "300ms",
        "PREFETCHER_OPERATOR__RESOLVE_DIGESTS": "false",
        "PREFETCHER_RUNTIME__HEALTH_ADDRESS": f"127.0.0.1:{port}",
        "PREFETCHER_RUNTIME__METRICS_ADDRESS": "",
    }
    log = workdir / "operator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PREFETCHER, "operator", "--config", str(config), "--kubeconfig",
             str(cluster.kubeconfig_path), "--agent-daemonset", str(daemonset)],
            env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        cluster.wait_for(lambda: "Activity 'configure' succeeded" in log.read_text()
                         or process.poll() is not None, timeout=20)
        assert process.poll() is None, log.read_text()
        def probe() -> Any:
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5)
            except urllib.error.URLError:  # kopf's server may start after 'configure'
                return None

        health = cluster.wait_for(probe, timeout=10, message="the operator answers /healthz")

        cluster.add_node("rbac-a", {"pool": "rbac"})
        cluster.add_node("rbac-b", {"pool": "rbac"})
        cluster.put("v1", "namespaces", {"metadata": {"name": "team"}})
        auth = base64.b64encode(json.dumps({"auths": {"registry.example.com": {
            "auth": base64.b64encode(b"robot:pw").decode()}}}).encode()).decode()
        cluster.put("v1", "secrets", {"metadata": {"name": "regcred", "namespace": "team"},
                                      "type": "kubernetes.io/dockerconfigjson",
                                      "data": {".dockerconfigjson": auth}})
        secrets = [{"name": "regcred"}]
        cluster.apply(prefetch("short", imagePullSecrets=secrets, ttlSecondsAfterFinished=2),
                      prefetch("long", imagePullSecrets=secrets))
        cluster.wait_for(lambda: all(
            len((cluster.get(API, "nodeimagesets", n) or {}).get("spec", {}).get("images")
                or []) == 1 for n in ("rbac-a", "rbac-b")), message="dispatched")
        cluster.wait_for(lambda: len(copies(cluster)) == 1, message="secret copied")

        # A reason repeated about one prefetch patches its Event (an event series).
        def not_found_events() -> list[JSON]:
            return [e for e in cluster.list("v1", "events", "team")
                    if e["reason"] == "NodeNotFound" and e["involvedObject"]["name"] == "typo"]

        cluster.apply(prefetch("typo", nodeNames=["rbac-typo-1"]))
        cluster.wait_for(lambda: not_found_events(), message="NodeNotFound event")
        cluster.apply(prefetch("typo", nodeNames=["rbac-typo-2"]))
        cluster.wait_for(lambda: [e["count"] for e in not_found_events()] == [2],
                         message="NodeNotFound event counted twice")
        cluster.kubectl("delete", "ipf", "typo", "-n", "team", "--timeout=20s")

        # The agents may read the copy, by name, and nothing else; the Role comes back when
        # deleted.
        def secrets_role() -> JSON | None:
            return cluster.get("rbac.authorization.k8s.io/v1", "roles", AGENT_SECRETS_ROLE,
                               NAMESPACE)

        copy_name = copies(cluster)[0]["metadata"]["name"]
        role = cluster.wait_for(lambda: secrets_role(), message="agents' Role created")
        widened = secrets_role()
        widened["rules"][0]["resourceNames"].append("sh.helm.release.v1.ipf.v1")
        cluster.put("rbac.authorization.k8s.io/v1", "roles", widened)
        cluster.wait_for(lambda: secrets_role()["rules"] == role["rules"],
                         message="agents' Role narrowed back")
        cluster.kubectl("delete", "role", AGENT_SECRETS_ROLE, "-n", NAMESPACE)
        restored = cluster.wait_for(lambda: secrets_role(), message="agents' Role restored")

        # The agents' DaemonSet (Helm's): restored after an edit, recreated after a delete.
        def live_ds() -> JSON | None:
            return cluster.get("apps/v1", "daemonsets", AGENT_DS, NAMESPACE)

        ds = live_ds()
        assert ds is not None
        helm_made = ds
        ds["spec"]["template"]["spec"]["nodeSelector"] = {"edited": "by-hand"}
        cluster.put("apps/v1", "daemonsets", ds)
        cluster.wait_for(lambda: live_ds()["spec"]["template"]["spec"]["nodeSelector"] ==
                         {"kubernetes.io/os": "linux"}, message="DaemonSet restored")
        cluster.kubectl("delete", "daemonset", AGENT_DS, "-n", NAMESPACE)
        recreated = cluster.wait_for(lambda: (live_ds() or {}).get("metadata", {}).get(
            "ownerReferences") and live_ds(), message="DaemonSet recreated")
        # The DaemonSet controller (not emulated) cannot create agent pods on either node.
        recreated["status"] = {"desiredNumberScheduled": 2, "currentNumberScheduled": 0,
                               "numberUnavailable": 2, "numberReady": 0,
                               "observedGeneration": recreated["metadata"].get("generation")}
        cluster.put("apps/v1", "daemonsets", recreated)
        missing = cluster.wait_for(lambda: [
            e for e in cluster.list("v1", "events", NAMESPACE)
            if e.get("reason") == "AgentPodsMissing"], message="AgentPodsMissing event")

        # The source secret changes: the copy follows.
        source = cluster.get("v1", "secrets", "regcred", "team")
        assert source is not None
        source["data"] = {".dockerconfigjson": base64.b64encode(b'{"auths": {}}').decode()}
        cluster.put("v1", "secrets", source)
        cluster.wait_for(lambda: copies(cluster)[0]["data"] == source["data"],
                         message="copy refreshed")

        # Agents report; "short" completes and is deleted after its TTL (its copy survives,
        # "long" still uses it); deleting "long" withdraws everything.
        for node in ("rbac-a", "rbac-b"):
            report_ready(cluster, node)
        cluster.wait_for(lambda: cluster.get(API, "imageprefetches", "short", "team") is None,
                         timeout=20, message="deleted after its TTL")
        cluster.wait_for(lambda: len(json.loads(copies(cluster)[0]["metadata"]["annotations"]
                                                ["prefetcher.dev/used-by"])) == 1)
        cluster.kubectl("delete", "ipf", "long", "-n", "team", "--timeout=20s")
        cluster.wait_for(lambda: copies(cluster) == [], message="copy deleted")
        daemonset_live = cluster.get("apps/v1", "daemonsets", AGENT_DS, NAMESPACE)
        owner = cluster.get("v1", "configmaps", AGENT_DS_CONFIG, NAMESPACE)

        # What `helm uninstall` does to the ConfigMap holding the DaemonSet's manifest: the
        # garbage collector then deletes the DaemonSet (its owner), and the operator, still
        # running, does not recreate it.
        cluster.kubectl("delete", "configmap", AGENT_DS_CONFIG, "-n", NAMESPACE)
        cluster.wait_for(lambda: cluster.get("apps/v1", "daemonsets", AGENT_DS, NAMESPACE)
                         is None, message="DaemonSet garbage-collected with its owner")
        cluster.wait_for(lambda: "not keeping the DaemonSet" in log.read_text())
        return {"health": health.status, "daemonset": daemonset_live, "owner": owner,
                "log": log, "helm_made": helm_made, "missing": missing,
                "secrets_role": role, "secrets_role_restored": restored,
                "copy_name": copy_name,
                "after_uninstall": cluster.get("apps/v1", "daemonsets", AGENT_DS, NAMESPACE)}
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def rbac_objects(release: Release) -> list[JSON]:
    return [o for o in release.objects if o["apiVersion"].startswith("rbac.authorization")]


def operator_requests(cluster: Cluster) -> list[rbac.Request]:
    return [rbac.Request(c.verb, c.group, c.resource, c.subresource, c.namespace, c.name,
                         c.field_selector)
            for c in cluster.calls() if c.user_agent.startswith(("image-prefetcher", "kopf/"))]


# ------------------------------------------------------------------------------ operator


def test_operator_probe_answers_where_the_chart_probes(operator_flow: JSON,
                                                       installed: Release) -> None:
    assert operator_flow["health"] == 200
    probe = installed.get("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert probe["livenessProbe"]["httpGet"]["path"] == "/healthz"


def test_every_operator_request_is_allowed(operator_flow: JSON, installed: Release) -> None:
    requests = operator_requests(installed.cluster)
    assert len(requests) > 50
    granted = rbac.grants(rbac_objects(installed), NAMESPACE, OPERATOR_SA)
    denied = rbac.denied(requests, granted)
    assert not denied, "the operator would be forbidden to:\n" + "\n".join(map(str, denied))


def test_every_operator_rule_was_needed(operator_flow: JSON, installed: Release) -> None:
    granted = rbac.grants(rbac_objects(installed), NAMESPACE, OPERATOR_SA)
    unused = rbac.unused(operator_requests(installed.cluster), granted)
    assert not unused, "rules the operator never used (least privilege):\n" + "\n".join(unused)


def test_operator_reads_other_namespaces_only_for_source_secrets_and_events(
        operator_flow: JSON, installed: Release) -> None:
    outside = {(r.verb, r.resource) for r in operator_requests(installed.cluster)
               if r.namespace and r.namespace != NAMESPACE and r.resource != "imageprefetches"}
    assert outside <= {("get", "secrets"), ("create", "events"), ("patch", "events")}, outside


def test_the_operator_recreates_the_agents_as_the_chart_rendered_them(
        operator_flow: JSON, installed: Release) -> None:
    """A DaemonSet deleted by hand comes back as Helm made it, with Helm's ownership marks
    (the next helm upgrade adopts it), the chart's labels and the same hash."""
    live, helm_made = operator_flow["daemonset"], operator_flow["helm_made"]
    rendered = installed.agent_daemonset
    assert live["metadata"]["labels"] == rendered["metadata"]["labels"]
    assert live["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "Helm"
    for key in ("meta.helm.sh/release-name", "prefetcher.dev/template-hash",
                "prefetcher.dev/template-revision"):
        assert live["metadata"]["annotations"][key] == helm_made["metadata"]["annotations"][key]
    assert live["spec"]["template"] == rendered["spec"]["template"]
    assert live["metadata"]["namespace"] == NAMESPACE


def test_agent_pods_the_daemonset_cannot_create_are_an_event(operator_flow: JSON) -> None:
    [event] = operator_flow["missing"]
    assert event["type"] == "Warning"
    assert event["involvedObject"]["kind"] == "DaemonSet"
    assert event["involvedObject"]["name"] == AGENT_DS
    assert "2 of 2 nodes have no agent pod" in event["message"]
    assert "FailedCreate" in event["message"]
    assert "agent DaemonSet: 2 of 2 nodes have no agent pod" in \
        operator_flow["log"].read_text()


def test_helm_uninstall_takes_the_operator_made_daemonset_along(
        operator_flow: JSON, installed: Release) -> None:
    """Helm deletes its own DaemonSet; one the operator recreated (e.g. while the operator
    was still stopping during the uninstall) goes with the ConfigMap holding its copy."""
    assert "ownerReferences" not in operator_flow["helm_made"]["metadata"]
    owner = operator_flow["owner"]
    assert operator_flow["daemonset"]["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": AGENT_DS_CONFIG,
        "uid": owner["metadata"]["uid"], "controller": False, "blockOwnerDeletion": False}]
    assert installed.get("ConfigMap", AGENT_DS_CONFIG)  # a chart object: helm deletes it
    assert operator_flow["after_uninstall"] is None


# ------------------------------------------------------------------------------ agent

NODE = "node-a"
# What the agent does (its process contract; see the agent issue).
AGENT_CONTRACT = [
    rbac.Request("get", "prefetcher.dev", "nodeimagesets", name=NODE),
    rbac.Request("list", "prefetcher.dev", "nodeimagesets",
                 field_selector=f"metadata.name={NODE}"),
    rbac.Request("watch", "prefetcher.dev", "nodeimagesets",
                 field_selector=f"metadata.name={NODE}"),
    rbac.Request("patch", "prefetcher.dev", "nodeimagesets", "status", name=NODE),
    rbac.Request("get", "", "secrets", namespace=NAMESPACE, name=COPY),
    rbac.Request("create", "", "events", namespace="default"),
    # Its node's heartbeat Lease (agent.kube.leases.Heartbeat).
    rbac.Request("get", "coordination.k8s.io", "leases", namespace=NAMESPACE,
                 name=f"prefetcher-agent-{NODE}"),
    rbac.Request("create", "coordination.k8s.io", "leases", namespace=NAMESPACE),
    rbac.Request("update", "coordination.k8s.io", "leases", namespace=NAMESPACE,
                 name=f"prefetcher-agent-{NODE}"),
]
# What an agent must never be able to do.
AGENT_FORBIDDEN = [
    rbac.Request("update", "prefetcher.dev", "nodeimagesets", name=NODE),
    rbac.Request("patch", "prefetcher.dev", "nodeimagesets", name=NODE),
    rbac.Request("create", "prefetcher.dev", "nodeimagesets", name=NODE),
    rbac.Request("delete", "prefetcher.dev", "nodeimagesets", name=NODE),
    rbac.Request("list", "", "secrets", namespace=NAMESPACE),
    rbac.Request("get", "", "secrets", namespace=NAMESPACE, name="sh.helm.release.v1.ipf.v1"),
    rbac.Request("get", "", "secrets", namespace=NAMESPACE, name="ipf-0123456789-other"),
    rbac.Request("update", "rbac.authorization.k8s.io", "roles", namespace=NAMESPACE,
                 name=AGENT_SECRETS_ROLE),
    rbac.Request("get", "", "secrets", namespace="team", name="regcred"),
    rbac.Request("get", "", "nodes", name=NODE),
    rbac.Request("patch", "prefetcher.dev", "imageprefetches", "status", namespace="team"),
    rbac.Request("update", "apps", "daemonsets", namespace=NAMESPACE, name=AGENT_DS),
]


def test_agent_rbac_is_exactly_its_contract(installed: Release, operator_flow: JSON) -> None:
    """The chart's rules plus the Role the operator keeps: the agents may get the pull-secret
    copies by name, and no other Secret of the release namespace (Helm's release records
    included)."""
    role = operator_flow["secrets_role"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
                              "resourceNames": [COPY]}]
    assert operator_flow["copy_name"] == COPY
    assert operator_flow["secrets_role_restored"]["rules"] == role["rules"]
    granted = rbac.grants([*rbac_objects(installed), role], NAMESPACE, AGENT_SA)
    assert not rbac.denied(AGENT_CONTRACT, granted)
    assert not rbac.unused(AGENT_CONTRACT, granted)
    allowed = [str(r) for r in AGENT_FORBIDDEN if r not in rbac.denied([r], granted)]
    assert not allowed, f"an agent may: {allowed}"


def test_agent_service_account_is_the_daemonsets(installed: Release) -> None:
    pod = installed.agent_daemonset["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == AGENT_SA
    operator_pod = installed.get("Deployment")["spec"]["template"]["spec"]
    assert operator_pod["serviceAccountName"] == OPERATOR_SA


def test_without_copies_the_agents_role_has_no_rule() -> None:
    """An empty resourceNames list would grant every Secret: no copy means no rule."""
    assert roles.rules([]) == []
    assert roles.granted({"rules": []}) == frozenset()
    edited = {"rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}
    assert roles.granted(edited) is None  # every Secret: rewritten at the next check
