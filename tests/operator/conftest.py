"""Fixtures: the emulator with the CRDs, and the REAL ``prefetcher operator`` process on it.

``cluster`` (module-scoped here: one emulator per test module, tests use their own
namespaces and node names), ``operator`` (one ``prefetcher operator`` subprocess per
module, with short intervals), ``agent_daemonset_file`` (the DaemonSet manifest the
operator keeps), and helpers to act as node agents (``report``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.cluster import Cluster

API = "prefetcher.dev/v1alpha1"
OPERATOR_NAMESPACE = "prefetcher-system"
PREFETCHER = str(Path(sys.executable).with_name("prefetcher"))

OPERATOR_CONFIG = """\
[runtime]
namespace = "prefetcher-system"
health_address = ""
metrics_address = ""

[operator]
peering_name = "prefetcher"
status_interval = "200ms"
resync_interval = "1s"
agent_heartbeat_timeout = "5s"
secret_refresh_interval = "1s"
daemonset_check_interval = "300ms"
resolve_digests = false
agent_daemonset = "{daemonset}"
"""

AGENT_DAEMONSET: dict[str, Any] = {
    "apiVersion": "apps/v1",
    "kind": "DaemonSet",
    "metadata": {"name": "prefetcher-agent", "labels": {"app.kubernetes.io/name": "prefetcher"}},
    "spec": {
        "selector": {"matchLabels": {"app.kubernetes.io/name": "prefetcher-agent"}},
        "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}},
        "template": {
            "metadata": {"labels": {"app.kubernetes.io/name": "prefetcher-agent"}},
            "spec": {
                "priorityClassName": "system-node-critical",
                "tolerations": [{"operator": "Exists"}],
                "containers": [{
                    "name": "agent",
                    "image": "ghcr.io/example/image-prefetcher:0.1.0",
                    "args": ["agent"],
                    "env": [{"name": "NODE_NAME",
                             "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}],
                    "resources": {"requests": {"cpu": "50m", "memory": "64Mi"}},
                    "volumeMounts": [{"name": "store", "mountPath": "/var/lib/prefetcher"}],
                }],
                "volumes": [{"name": "store", "hostPath": {
                    "path": "/var/lib/prefetcher", "type": "DirectoryOrCreate"}}],
            },
        },
    },
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        running.install_crds()
        running.put("v1", "namespaces", {"metadata": {"name": OPERATOR_NAMESPACE}})
        yield running


@pytest.fixture(scope="module")
def agent_daemonset_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("settings") / "agent-daemonset.yaml"
    path.write_text(yaml.safe_dump(AGENT_DAEMONSET))
    return path


class Operator:
    """A running ``prefetcher operator`` process and its log."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextlib.contextmanager
def running_operator(cluster: Cluster, workdir: Path, daemonset_file: Path,
                     env: dict[str, str] | None = None) -> Iterator[Operator]:
    """The real ``prefetcher operator`` on ``cluster`` with OPERATOR_CONFIG (and ``env``,
    e.g. ``PREFETCHER_RUNTIME__METRICS_ADDRESS``), stopped by PID at the end."""
    config = workdir / "config.toml"
    config.write_text(OPERATOR_CONFIG.format(daemonset=daemonset_file))
    log = workdir / "operator.log"
    full_env = cluster.env() | (env or {})
    full_env["PREFETCHER_CONFIG"] = str(config)
    with log.open("wb") as out:
        process = subprocess.Popen(
            [PREFETCHER, "operator", "--kubeconfig", str(cluster.kubeconfig_path)],
            env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    running = Operator(process, log)
    try:
        cluster.wait_for(lambda: "Activity 'configure' succeeded" in running.output()
                         or process.poll() is not None, timeout=20)
        if process.poll() is not None:
            pytest.fail(f"the operator exited:\n{running.output()}")
        yield running
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if os.environ.get("PREFETCHER_TEST_SHOW_LOGS"):
            print(running.output())


@pytest.fixture(scope="module")
def operator(cluster: Cluster, agent_daemonset_file: Path,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    with running_operator(cluster, tmp_path_factory.mktemp("operator"),
                          agent_daemonset_file) as running:
        yield running


def node_set(cluster: Cluster, node: str) -> dict[str, Any] | None:
    return cluster.get(API, "nodeimagesets", node)


def entries_of(cluster: Cluster, node: str, owner: str | None = None) -> list[dict[str, Any]]:
    nis = node_set(cluster, node) or {}
    images = (nis.get("spec") or {}).get("images") or []
    if owner is None:
        return images
    return [e for e in images if any(o["name"] == owner for o in e["owners"])]


def report(cluster: Cluster, node: str, phase: str | None = "Ready", *,
           heartbeat: bool = True, **fields: Any) -> None:
    """Write the node's NodeImageSet status as its agent would: every entry in ``phase``."""
    for _ in range(20):
        nis = node_set(cluster, node)
        assert nis is not None, f"no NodeImageSet for {node}"
        status: dict[str, Any] = dict(nis.get("status") or {})
        if phase is not None:
            status["images"] = [
                {"name": e["name"], "image": e["image"], "phase": phase,
                 "digest": e.get("digest", ""), "bytesDone": fields.get("bytesDone", 100),
                 "bytesTotal": fields.get("bytesTotal", 100), "attempts": 1,
                 **{k: v for k, v in fields.items() if k not in ("bytesDone", "bytesTotal")}}
                for e in (nis.get("spec") or {}).get("images") or []
            ]
        if heartbeat:
            status["agent"] = {"version": "0.1.0",
                               "storeCapacityBytes": 10**11, "storeFreeBytes": 5 * 10**10}
        status["observedGeneration"] = nis["metadata"]["generation"]  # as agents write it
        nis["status"] = status
        cluster.put(API, "nodeimagesets", nis)
        if heartbeat:
            cluster.renew_heartbeat(node, OPERATOR_NAMESPACE)
        return
    time.sleep(0.05)  # pragma: no cover


def prefetch(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "ImagePrefetch",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def ipf(cluster: Cluster, name: str, namespace: str) -> dict[str, Any]:
    obj = cluster.get(API, "imageprefetches", name, namespace)
    assert obj is not None
    return obj


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return dict(c)
    return {}
