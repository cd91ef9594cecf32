"""Everything real: the emulator, Debian's ``docker-registry`` (plain and htpasswd, with a
fault proxy in front of the plain one), one ``prefetcher operator`` and three
``prefetcher agent`` processes (nodes e2e-a, e2e-b, e2e-c, each with its own store root).

Module-scoped: the processes start once for the module; tests use their own image
repositories and prefetch names. Intervals are short (heartbeat 1s, status 300ms, backoff
200ms, failed entries retried after 3s) so the whole module runs in well under a minute
or two.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fixtures import registries
from fixtures.faultproxy import FaultProxy

from tests.kube.cluster import Cluster
from tests.kube.processes import PREFETCHER, Process, wait_until

API = "prefetcher.dev/v1alpha1"
OPERATOR_NAMESPACE = "prefetcher-system"
NODES = {"e2e-a": {"pool": "e2e"}, "e2e-b": {"pool": "e2e"}, "e2e-c": {"pool": "other"}}

OPERATOR_CONFIG = """\
[runtime]
namespace = "prefetcher-system"
health_address = ""
metrics_address = ""

[operator]
standalone = true
status_interval = "200ms"
resync_interval = "1s"
agent_heartbeat_timeout = "5s"
secret_refresh_interval = "1s"
resolve_digests = true
resolve_timeout = "3s"
"""

AGENT_CONFIG = """\
[runtime]
namespace = "prefetcher-system"
root = "{root}"
health_address = "127.0.0.1:{health_port}"
metrics_address = "127.0.0.1:{metrics_port}"
gc_period = "2s"
min_free_percent = 0

[images]
snapshotter = "overlayfs"
image_pull_progress_timeout = "30s"
stats_collect_period = "1s"

[node]
status_interval = "300ms"
heartbeat_interval = "1s"
backoff_initial = "200ms"
backoff_max = "1s"
failed_retry_interval = "3s"
resync_interval = "2s"
"""


class Agent:
    """One ``prefetcher agent`` process for ``node``, with its root and addresses."""

    def __init__(self, cluster: Cluster, node: str, workdir: Path) -> None:
        self.node = node
        self.root = workdir / "root"
        self.health_port = registries.free_port()
        self.metrics_port = registries.free_port()
        config = workdir / "config.toml"
        config.write_text(AGENT_CONFIG.format(root=self.root, health_port=self.health_port,
                                              metrics_port=self.metrics_port))
        env = cluster.env()
        env.update({"NODE_NAME": node, "POD_NAME": f"agent-{node}",
                    "POD_NAMESPACE": OPERATOR_NAMESPACE})
        self.process = Process([PREFETCHER, "agent", "--config", str(config),
                                "--kubeconfig", str(cluster.kubeconfig_path)],
                               workdir / "agent.log", env)

    def start(self) -> Agent:
        self.process.start()
        wait_until(self.ready, timeout=30, message=f"agent {self.node} ready")
        return self

    def ready(self) -> bool:
        if not self.process.running():
            raise AssertionError(f"agent {self.node} exited:\n{self.process.output()[-4000:]}")
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}/readyz").status_code == 200
        except httpx.HTTPError:
            return False

    def images(self) -> list[dict[str, Any]]:
        """``prefetcher images ls --json`` on this agent's root."""
        result = subprocess.run([PREFETCHER, "images", "ls", "--json", "--root", str(self.root)],
                                capture_output=True, text=True, timeout=30, check=True)
        return list(json.loads(result.stdout))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with Cluster(tmp_path_factory.mktemp("cluster")) as running:
        running.install_crds()
        running.put("v1", "namespaces", {"metadata": {"name": OPERATOR_NAMESPACE}})
        running.put("v1", "namespaces", {"metadata": {"name": "team"}})
        for node, labels in NODES.items():
            running.add_node(node, labels)
        yield running


@pytest.fixture(scope="module")
def proxy(registry: registries.Registry) -> Iterator[FaultProxy]:
    """A fault proxy in front of the anonymous registry, for the whole module."""
    with FaultProxy(registry.url) as running:
        yield running


@pytest.fixture
def clean_proxy(proxy: FaultProxy) -> Iterator[FaultProxy]:
    proxy.clear()
    proxy.clear_requests()
    yield proxy
    proxy.clear()


@pytest.fixture(scope="module")
def operator(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    workdir = tmp_path_factory.mktemp("operator")
    config = workdir / "config.toml"
    config.write_text(OPERATOR_CONFIG)
    env = cluster.env()
    process = Process([PREFETCHER, "operator", "--config", str(config),
                       "--kubeconfig", str(cluster.kubeconfig_path)],
                      workdir / "operator.log", env).start()
    try:
        process.wait_for_output("Activity 'configure' succeeded", timeout=30)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def agents(cluster: Cluster, operator: Process,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Agent]]:
    running = {node: Agent(cluster, node, tmp_path_factory.mktemp(node)) for node in NODES}
    try:
        for agent in running.values():
            agent.process.start()
        for agent in running.values():
            wait_until(agent.ready, timeout=30, message=f"agent {agent.node} ready")
        yield running
    finally:
        codes = {node: agent.process.stop() for node, agent in running.items()}
        assert all(code == 0 for code in codes.values()), codes


def prefetch(name: str, namespace: str = "team", **spec: Any) -> dict[str, Any]:
    return {"apiVersion": API, "kind": "ImagePrefetch",
            "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def node_status(cluster: Cluster, node: str) -> dict[str, Any]:
    return dict((cluster.get(API, "nodeimagesets", node) or {}).get("status") or {})


def node_images(cluster: Cluster, node: str) -> dict[str, dict[str, Any]]:
    """The node's status.images by image reference (the spec entry's ``image``)."""
    nis = cluster.get(API, "nodeimagesets", node) or {}
    by_name = {e["name"]: e["image"] for e in (nis.get("spec") or {}).get("images") or []}
    return {by_name.get(s["name"], s["name"]): s
            for s in (nis.get("status") or {}).get("images") or []}


def ipf_status(cluster: Cluster, name: str, namespace: str = "team") -> dict[str, Any]:
    return dict((cluster.get(API, "imageprefetches", name, namespace) or {}).get("status") or {})
