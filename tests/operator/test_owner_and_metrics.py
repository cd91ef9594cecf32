"""The real operator process: the agents' DaemonSet is owned by the chart's ConfigMap (so
``helm uninstall`` garbage-collects it), and ``/metrics`` tells what the operator did.

The operator here runs as the chart runs it: ``operator.agent_daemonset_owner`` names the
ConfigMap holding the DaemonSet manifest, and ``runtime.metrics_address`` is served.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.kube.cluster import Cluster

from .conftest import OPERATOR_NAMESPACE, Operator, ipf, prefetch, report, running_operator

OWNER = "prefetcher-agent-daemonset"
AGENT_DS = "prefetcher-agent"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def put_owner(cluster: Cluster, daemonset_file: Path) -> dict[str, Any]:
    return cluster.put("v1", "configmaps", {
        "metadata": {"name": OWNER, "namespace": OPERATOR_NAMESPACE},
        "data": {"agent-daemonset.yaml": daemonset_file.read_text()}})


@pytest.fixture(scope="module")
def metrics_url() -> str:
    return f"http://127.0.0.1:{free_port()}/metrics"


@pytest.fixture(scope="module")
def owned_operator(cluster: Cluster, agent_daemonset_file: Path, metrics_url: str,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    put_owner(cluster, agent_daemonset_file)
    address = metrics_url.removeprefix("http://").removesuffix("/metrics")
    env = {"PREFETCHER_OPERATOR__AGENT_DAEMONSET_OWNER": OWNER,
           "PREFETCHER_RUNTIME__METRICS_ADDRESS": address}
    with running_operator(cluster, tmp_path_factory.mktemp("operator"), agent_daemonset_file,
                          env) as running:
        yield running


def daemonset(cluster: Cluster) -> dict[str, Any] | None:
    return cluster.get("apps/v1", "daemonsets", AGENT_DS, OPERATOR_NAMESPACE)


def test_deleting_the_owner_configmap_garbage_collects_the_daemonset(
        cluster: Cluster, owned_operator: Operator, agent_daemonset_file: Path) -> None:
    ds = cluster.wait_for(lambda: daemonset(cluster), message="DaemonSet created")
    owner = cluster.get("v1", "configmaps", OWNER, OPERATOR_NAMESPACE)
    assert owner is not None
    assert ds["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "ConfigMap", "name": OWNER,
        "uid": owner["metadata"]["uid"], "controller": False, "blockOwnerDeletion": False}]

    # What `helm uninstall` does to it: the garbage collector takes the DaemonSet along,
    # and the operator (still running here) does not bring it back without its owner.
    cluster.kubectl("delete", "configmap", OWNER, "-n", OPERATOR_NAMESPACE)
    cluster.wait_for(lambda: daemonset(cluster) is None, message="garbage-collected")
    time.sleep(1.0)  # > 3 DaemonSet checks (daemonset_check_interval = 300ms)
    assert daemonset(cluster) is None
    assert "does not exist; not keeping the DaemonSet" in owned_operator.output()

    # A reinstall: a new ConfigMap (new uid) and the DaemonSet is back, owned by it.
    new_owner = put_owner(cluster, agent_daemonset_file)
    ds = cluster.wait_for(lambda: daemonset(cluster), message="recreated")
    assert [o["uid"] for o in ds["metadata"]["ownerReferences"]] == \
        [new_owner["metadata"]["uid"]]


def scrape(url: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """Sample name → labels → value."""
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_metrics_tell_phases_node_states_reconciles_errors_and_dispatches(
        cluster: Cluster, owned_operator: Operator, metrics_url: str) -> None:
    for node in ("met-a", "met-b"):
        cluster.add_node(node, {"pool": "met"})
    cluster.apply(prefetch("met", "default", images=["nginx:1.27", "redis:7"],
                           nodeSelector={"matchLabels": {"pool": "met"}}))
    cluster.wait_for(lambda: all(
        len(((cluster.get("prefetcher.dev/v1alpha1", "nodeimagesets", n) or {})
             .get("spec") or {}).get("images") or []) == 2 for n in ("met-a", "met-b")))
    report(cluster, "met-a", "Downloading", bytesDone=10)

    def nodes(state: str) -> float:
        return scrape(metrics_url)["prefetcher_operator_nodes"][(("state", state),)]

    cluster.wait_for(lambda: nodes("pulling") == 1 and nodes("pending") == 1,
                     message="one pulling, one pending (no live agent)")
    report(cluster, "met-a", "Ready")
    report(cluster, "met-b", "Ready")
    cluster.wait_for(lambda: (ipf(cluster, "met", "default").get("status") or {})
                     .get("phase") == "Complete")

    def complete() -> dict[str, dict[tuple[tuple[str, str], ...], float]] | None:
        m = scrape(metrics_url)
        return m if m["prefetcher_operator_prefetches"][(("phase", "Complete"),)] == 1 \
            else None

    m = cluster.wait_for(complete, message="the gauge follows the status")
    prefetches = {dict(k)["phase"]: v for k, v in m["prefetcher_operator_prefetches"].items()}
    assert prefetches == {"Pending": 0, "Progressing": 0, "Complete": 1, "Failed": 0}
    states = {dict(k)["state"]: v for k, v in m["prefetcher_operator_nodes"].items()}
    assert states == {"pending": 0, "pulling": 0, "ready": 2, "failed": 0,
                      "agentUnavailable": 0}
    assert m["prefetcher_operator_dispatches_total"][()] == 4  # 2 images x 2 nodes
    durations = m["prefetcher_operator_reconcile_duration_seconds_count"]
    assert durations[(("result", "success"),)] >= 2
    # The DaemonSet did not exist when the operator first looked for it: a 404 on get.
    errors = m["prefetcher_operator_api_errors_total"]
    assert errors[(("code", "404"), ("verb", "get"))] >= 1
    assert m["prefetcher_build_info"]
