"""End to end, all real processes: an agent restarted as a DaemonSet rollout restarts it
continues from the status it wrote. A watch on its NodeImageSet sees every status write of
the new process: none empties ``status.images`` or turns a Ready image Pending, the image
is not fetched again, and the ImagePrefetch stays Complete throughout."""

from __future__ import annotations

import json
import subprocess

from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.kube import leases
from tests.kube.cluster import Cluster

from .conftest import OPERATOR_NAMESPACE, Agent, ipf_status, node_images, prefetch


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
        def renewed() -> str:
            lease = cluster.get(leases.API_VERSION, "leases", leases.heartbeat_name("e2e-a"),
                                OPERATOR_NAMESPACE)
            return str((lease or {}).get("spec", {}).get("renewTime", ""))

        beat = renewed()
        agent.start()
        # The new process is up and past its start (it renewed its heartbeat Lease twice,
        # every second here); whatever it wrote to the status is in the watch below.
        for _ in range(2):
            cluster.wait_for(lambda: renewed() > beat, timeout=20)  # noqa: B023
            beat = renewed()
        assert ipf_status(cluster, "rollout").get("phase") == "Complete"
    finally:
        watch.terminate()
    writes = [json.loads(line)["object"] for line in watch.communicate()[0].splitlines()
              if line.strip()]
    assert writes  # the watch's first event: the status as the old process left it
    for nis in writes:
        statuses = (nis.get("status") or {}).get("images")
        assert statuses, nis.get("status")  # never written as []
        assert [(s["phase"], s["attempts"]) for s in statuses] == \
            [("Ready", before["attempts"])], statuses
    assert proxy.requests_to(f"/blobs/{image.layers[0].digest}", "GET") == []
