"""Steady state costs the API nothing per reconcile: a prefetch's pull secrets are read once
per ``secret_refresh_interval``, not twice per reconcile, however often node statuses wake
it; a changed secret still reaches its copy after that interval."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

from tests.kube.cluster import Cluster

from .conftest import OPERATOR_NAMESPACE, ipf, prefetch, report, running_operator


def dockerconfig(password: str) -> dict[str, str]:
    auth = base64.b64encode(f"robot:{password}".encode()).decode()
    doc = json.dumps({"auths": {"registry.example.com": {"auth": auth}}})
    return {".dockerconfigjson": base64.b64encode(doc.encode()).decode()}


def secret_reads(cluster: Cluster) -> int:
    return sum(1 for c in cluster.calls() if c.resource == "secrets" and c.verb == "get")


def test_pull_secrets_are_not_read_on_every_reconcile(
        cluster: Cluster, agent_daemonset_file: Path, tmp_path: Path) -> None:
    cluster.put("v1", "namespaces", {"metadata": {"name": "reads"}})
    cluster.add_node("reads-a", {"pool": "reads"})
    cluster.put("v1", "secrets", {"metadata": {"name": "regcred", "namespace": "reads"},
                                  "type": "kubernetes.io/dockerconfigjson",
                                  "data": dockerconfig("one")})
    # (Without the cache: 42 secret GETs in the 2 s below.)
    env = {"PREFETCHER_OPERATOR__SECRET_REFRESH_INTERVAL": "3s"}
    with running_operator(cluster, tmp_path, agent_daemonset_file, env):
        cluster.apply(prefetch("reads", "reads", images=["registry.example.com/app:1"],
                               imagePullSecrets=[{"name": "regcred"}],
                               nodeSelector={"matchLabels": {"pool": "reads"}}))
        cluster.wait_for(lambda: (cluster.get("prefetcher.dev/v1alpha1", "nodeimagesets",
                                              "reads-a") or {}).get("spec", {}).get("images"))
        report(cluster, "reads-a", "Pulling", bytesDone=1)
        before = secret_reads(cluster)
        # Node statuses keep changing (progress): every change wakes a reconcile.
        for done in range(2, 22):
            report(cluster, "reads-a", "Pulling", bytesDone=done)
            time.sleep(0.1)
        reconciled = secret_reads(cluster) - before
        assert reconciled <= 2, f"{reconciled} secret GETs in 2s of reconciles"

        # A changed source still reaches the copy (once the refresh interval passed).
        source = cluster.get("v1", "secrets", "regcred", "reads")
        assert source is not None
        source["data"] = dockerconfig("two")
        cluster.put("v1", "secrets", source)
        report(cluster, "reads-a", "Ready")
        cluster.wait_for(lambda: [s["data"] for s in cluster.list("v1", "secrets",
                                                                  OPERATOR_NAMESPACE)
                                  if s["metadata"]["name"].endswith("-regcred")]
                         == [dockerconfig("two")], timeout=20, message="copy refreshed")
        assert ipf(cluster, "reads", "reads")["status"]["phase"] == "Complete"
