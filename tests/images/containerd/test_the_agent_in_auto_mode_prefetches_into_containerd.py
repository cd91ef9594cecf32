"""The node agent with ``images.snapshotter = "auto"`` against a real containerd 1.6 (CRI
plugin on) whose socket is at a non-default path named in the config: a real ``prefetcher
agent`` process and the API emulator (the NodeImageSet is written as the operator would).

The image ends in the node's containerd as kubelet needs it: listed by ``ctr -n k8s.io
images ls``, present per the CRI's ``ImageStatus``, pinned against kubelet's image GC, and
``ctr run`` starts it with no request to the registry."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fixtures import images, registries
from fixtures.faultproxy import FaultProxy

from agent.images import cri
from tests.kube.cluster import Cluster
from tests.kube.processes import PREFETCHER, Process, wait_until
from tests.test_cli_pull import prefetcher

from .conftest import Containerd
from .test_a_prefetched_image_runs_without_a_pull import BUSYBOX, busybox_image

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not BUSYBOX.exists(), reason="busybox-static is missing"),
]

NODE = "ctrd-node"
NAMESPACE = "prefetcher-system"

CONFIG = """\
[runtime]
namespace = "{namespace}"
root = "{root}"
health_address = "127.0.0.1:{health_port}"
metrics_address = ""

[images]
snapshotter = "auto"
image_pull_progress_timeout = "30s"

[images.containerd]
address = "{address}"

[node]
status_interval = "300ms"
heartbeat_interval = "1s"
"""


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    (tmp_path / "cluster").mkdir()
    with Cluster(tmp_path / "cluster") as running:
        running.install_crds()
        running.put("v1", "namespaces", {"metadata": {"name": NAMESPACE}})
        running.add_node(NODE)
        yield running


def start_agent(cluster: Cluster, workdir: Path, config: str) -> tuple[Process, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = registries.free_port()
    path = workdir / "config.toml"
    path.write_text(config.format(namespace=NAMESPACE, root=workdir / "root", health_port=port,
                                  address="{address}"))
    env = cluster.env()
    env.update({"NODE_NAME": NODE, "POD_NAME": "agent", "POD_NAMESPACE": NAMESPACE})
    process = Process([PREFETCHER, "agent", "--config", str(path),
                       "--kubeconfig", str(cluster.kubeconfig_path)], workdir / "agent.log", env)
    return process.start(), port


def node_status(cluster: Cluster) -> dict:  # type: ignore[type-arg]
    obj = cluster.get("prefetcher.dev/v1alpha1", "nodeimagesets", NODE) or {}
    return dict(obj.get("status") or {})


def test_the_agent_finds_containerd_prefetches_and_pods_need_no_pull(
    ctrd: Containerd, cluster: Cluster, fault_proxy: FaultProxy, tmp_path: Path
) -> None:
    image = busybox_image()
    images.push(fault_proxy.url, "auto/busybox", "1.0", image)
    reference = f"{fault_proxy.host}/auto/busybox:1.0"
    cluster.put("prefetcher.dev/v1alpha1", "nodeimagesets", {
        "metadata": {"name": NODE},
        "spec": {"images": [{"name": "busybox", "image": reference,
                             "owners": [{"namespace": "team", "name": "p", "uid": "u1"}]}]},
    })
    agent, port = start_agent(cluster, tmp_path / "agent",
                              CONFIG.replace("{address}", ctrd.address))
    try:
        def ready() -> bool:
            assert agent.running(), agent.output()[-4000:]
            try:
                return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=30, message="agent ready")
        cluster.wait_for(lambda: [i.get("phase") for i in node_status(cluster).get("images", [])]
                         == ["Ready"], timeout=60, message="the image Ready on the node")
        runtime = node_status(cluster)["agent"]["runtime"]
        assert runtime["mode"] == "containerd" and runtime["address"] == ctrd.address
        assert (runtime["snapshotter"], runtime["namespace"]) == ("overlayfs", "k8s.io")
        assert runtime["version"].startswith("1.6")
        assert "images go to containerd: containerd 1.6" in agent.output()
        # containerd 1.6 ignores the pin label: the status and the log say so, once.
        assert runtime["pinning"] is False
        assert "no pinning against kubelet's image GC" in agent.output()
        warnings = [line for line in agent.output().splitlines()
                    if "does not report the prefetched images to kubelet as pinned" in line]
        assert len(warnings) == 1 and "WARNING" in warnings[0], agent.output()[-4000:]
        assert "Upgrade containerd to 1.7 or later" in warnings[0]
    finally:
        assert agent.stop() == 0, agent.output()[-4000:]

    # What kubelet sees through the CRI, and what an admin sees with ctr.
    listed = ctrd.ctr("images", "ls").stdout
    line = next(row for row in listed.splitlines() if row.startswith(reference + " "))
    assert "io.cri-containerd.image=managed" in line
    assert "io.cri-containerd.pinned=pinned" in line  # kubelet's image GC keeps it
    kubelets_view = cri.CriBackend(ctrd.address)
    try:
        status = kubelets_view.image_status(reference)
    finally:
        kubelets_view.close()
    assert status is not None and status.id == image.config.digest

    # An admin on the node, with no config file, against the agent's store: the images
    # commands look where the agent put the image (the store says which runtime).
    root = str(tmp_path / "agent" / "root")
    on_node = {k: v for k, v in os.environ.items() if not k.startswith("PREFETCHER_")}
    ls = prefetcher("images", "ls", "--root", root, "--json", env=on_node)
    assert ls.returncode == 0, ls.stderr
    assert [(i["name"], i["unpacked"], i["image_id"]) for i in json.loads(ls.stdout)] == [
        (reference, True, image.config.digest)
    ]
    table = prefetcher("images", "ls", "--root", root, env=on_node).stdout.splitlines()
    assert table[0].split()[:4] == ["REFERENCE", "DIGEST", "IMAGE", "ID"]
    assert table[1].split()[2] == image.config.digest.removeprefix("sha256:")[:13]
    # In the agent's pod: its config file says "auto", which finds the same containerd.
    in_pod = prefetcher("images", "ls", "--config", str(tmp_path / "agent" / "config.toml"),
                        "--json", env=on_node)
    assert [(i["name"], i["unpacked"]) for i in json.loads(in_pod.stdout)] == [
        (reference, True)
    ], in_pod.stderr

    # A container starts from the prefetched snapshots: no request reaches the registry.
    fault_proxy.clear_requests()
    name = f"auto-run-{os.getpid()}"
    ran = ctrd.ctr("run", "--rm", reference, name, "cat", "/etc/greeting", timeout=120)
    assert ran.stdout == "hello from the prefetched snapshot\n"
    assert fault_proxy.requests == []

    # `prefetcher rm` there releases it as the agent would: unpinned, left to kubelet's GC.
    removed = prefetcher("rm", reference, "--root", root, env=on_node)
    assert removed.returncode == 0, removed.stderr
    line = next(row for row in ctrd.ctr("images", "ls").stdout.splitlines()
                if row.startswith(reference + " "))
    assert "io.cri-containerd.pinned" not in line and "io.cri-containerd.image=managed" in line
