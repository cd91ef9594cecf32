"""End to end, all real processes: ``kubectl apply`` an ImagePrefetch and the images land
on exactly the selected nodes, as the operator, three agents and a registry cooperate."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
from fixtures import images, registries

from tests.kube.cluster import Cluster
from tests.kube.processes import PREFETCHER

from .conftest import Agent, ipf_status, node_images, node_status, prefetch


def test_two_selected_nodes_pull_both_images_and_the_third_stays_untouched(
        cluster: Cluster, registry: registries.Registry, agents: dict[str, Agent],
        tmp_path: Path) -> None:
    web = images.Image([images.layer({"etc/motd": "hello from web\n", "bin/": b""}),
                        images.random_layer(200_000, seed=71)])
    db = images.Image([images.random_layer(150_000, seed=72),
                       images.layer({"etc/motd": "db\n"})])
    images.push(registry, "e2e/web", "1", web)
    images.push(registry, "e2e/db", "1", db)
    refs = [f"{registry.host}/e2e/web:1", f"{registry.host}/e2e/db:1"]

    cluster.apply(prefetch("pair", images=refs, nodeSelector={"matchLabels": {"pool": "e2e"}}))

    cluster.wait_for(lambda: ipf_status(cluster, "pair").get("summary", {}).get("ready")
                     == "2/2", timeout=60, message="2/2 nodes ready")
    status = ipf_status(cluster, "pair")
    assert status["summary"] == {"images": 2, "ready": "2/2", "progress": "100%"}
    assert status["phase"] == "Complete"
    table = cluster.kubectl("get", "ipf", "pair", "-n", "team").stdout
    assert "2/2" in table and "100%" in table, table

    digests = {refs[0]: web.digest, refs[1]: db.digest}
    for node in ("e2e-a", "e2e-b"):
        reported = node_images(cluster, node)
        assert {r: s["phase"] for r, s in reported.items()} == dict.fromkeys(refs, "Ready")
        for ref, st in reported.items():
            assert st["digest"] == digests[ref]
            assert st["bytesDone"] == st["bytesTotal"] > 0
            assert st["layersDone"] == st["layersTotal"] == 2
            assert st["attempts"] == 1 and st["stallCancellations"] == 0
        agent_status = node_status(cluster, node)
        assert agent_status["summary"] == {"images": 2, "ready": 2, "pulling": 0, "failed": 0}
        assert agent_status["agent"]["storeCapacityBytes"] > 0

    # The snapshots mount as the images' root filesystems, on each node's own store.
    for node in ("e2e-a", "e2e-b"):
        target = tmp_path / f"mnt-{node}"
        target.mkdir()
        root = str(agents[node].root)
        ref = f"{registry.host}/e2e/web@{web.digest}"
        subprocess.run([PREFETCHER, "mount", "--root", root, ref, str(target)], check=True,
                       capture_output=True, timeout=30)
        try:
            assert (target / "etc/motd").read_text() == "hello from web\n"
            assert (target / "data/71/0000.bin").stat().st_size == 200_000
        finally:
            subprocess.run([PREFETCHER, "umount", "--root", root, str(target)], check=True,
                           capture_output=True, timeout=30)

    # Health and metrics of an agent that pulled.
    a = agents["e2e-a"]
    assert httpx.get(f"http://127.0.0.1:{a.health_port}/healthz").status_code == 200
    assert httpx.get(f"http://127.0.0.1:{a.health_port}/readyz").status_code == 200
    scrape = httpx.get(f"http://127.0.0.1:{a.metrics_port}/metrics").text
    assert 'prefetcher_pulls_total{reason="Pulled",result="success"} 2.0' in scrape
    assert "prefetcher_store_images 2.0" in scrape

    # Each agent watches only its own NodeImageSet (server-side field selector), and makes
    # only the calls the chart's RBAC grants: get/patch-status its object, get secret copies
    # in the operator namespace, create Events, renew its heartbeat Lease there.
    calls = cluster.calls()
    for node in agents:
        assert any(c.verb == "watch" and c.resource == "nodeimagesets"
                   and c.field_selector == f"metadata.name={node}" for c in calls), node
    own = {(c.verb, c.resource, c.subresource, c.namespace) for c in calls
           if c.user_agent.startswith("image-prefetcher-agent")}
    assert own <= {("get", "nodeimagesets", "", ""), ("patch", "nodeimagesets", "status", ""),
                   ("get", "secrets", "", "prefetcher-system"),
                   ("create", "events", "", "default"),
                   ("get", "leases", "", "prefetcher-system"),
                   ("create", "leases", "", "prefetcher-system"),
                   ("update", "leases", "", "prefetcher-system")}, own

    # The third node was not selected: nothing dispatched, nothing pulled.
    third = cluster.get("prefetcher.dev/v1alpha1", "nodeimagesets", "e2e-c") or {}
    assert not (third.get("spec") or {}).get("images")
    assert agents["e2e-c"].images() == []
    assert not list((agents["e2e-c"].root / "content").rglob("sha256/*"))
