"""End to end, all real processes: an agent restarted as a DaemonSet rollout restarts it
continues from the status it wrote. A watch on its NodeImageSet sees every status write of
the new process: none empties ``status.images`` or turns a Ready image Pending, the image
is not fetched again, and the ImagePrefetch stays Complete throughout."""

from __future__ import annotations

import json
import subprocess

from fixtures import images
from fixtures.faultproxy import FaultProxy

from tests.kube.cluster import Cluster

from .conftest import Agent, ipf_status, node_images, node_status, prefetch


def test_a_restarted_agent_keeps_ready_images_ready(
        cluster: Cluster, clean_proxy: FaultProxy, agents: dict[str, Agent]) -> None:
    proxy = clean_proxy
    image = images.Image([images.random_layer(80_000, seed=131)])
    images.push(proxy.upstream, "e2e/rollout", "1", image)
    ref = f"{proxy.host}/e2e/rollout:1"
    cluster.apply(prefetch("rollout", images=[ref], nodeNames=["e2e-a"]))
    cluster.wait_for(lambda: ipf_status(cluster, "rollout").get("phase") == "Complete",
                     timeout=30)
    before = node_images(cluster, "e2e-a")[ref]
    proxy.clear_requests()

    watch = subprocess.Popen(
        ["kubectl", "--kubeconfig", str(cluster.kubeconfig_path), "get", "nis", "e2e-a",
         "-w", "-o", "json", "--output-watch-events"], stdout=subprocess.PIPE, text=True)
    try:
        agent = agents["e2e-a"]
        assert agent.process.stop() == 0  # SIGTERM, as a rollout does
        beat = node_status(cluster, "e2e-a")["agent"]["heartbeatTime"]
        agent.start()
        # The new process has written (heartbeats every second here).
        cluster.wait_for(lambda: node_status(cluster, "e2e-a")["agent"]["heartbeatTime"]
                         > beat, timeout=20)
        assert ipf_status(cluster, "rollout").get("phase") == "Complete"
    finally:
        watch.terminate()
    writes = [json.loads(line)["object"] for line in watch.communicate()[0].splitlines()
              if line.strip()]
    assert len(writes) > 1
    for nis in writes:
        statuses = (nis.get("status") or {}).get("images")
        assert statuses, nis.get("status")  # never written as []
        assert [(s["phase"], s["attempts"]) for s in statuses] == \
            [("Ready", before["attempts"])], statuses
    assert proxy.requests_to(f"/blobs/{image.layers[0].digest}", "GET") == []
