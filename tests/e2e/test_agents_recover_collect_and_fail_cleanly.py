"""End to end, all real processes: stalls, kill -9 mid-pull, deletion with GC, and
failures that stay confined to their own image."""

from __future__ import annotations

import base64
import json

import httpx
from fixtures import images, registries
from fixtures.faultproxy import FaultProxy
from prometheus_client.parser import text_string_to_metric_families

from tests.kube.cluster import Cluster

from .conftest import Agent, ipf_status, node_images, node_status, prefetch


def _phase(cluster: Cluster, node: str, ref: str) -> str:
    return str(node_images(cluster, node).get(ref, {}).get("phase", ""))


def _events(cluster: Cluster, node: str, reason: str) -> list[dict[str, object]]:
    return [e for e in cluster.list("v1", "events", "default")
            if e["involvedObject"].get("name") == node and e["reason"] == reason]


def _metrics(agent: Agent) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The agent's /metrics, scraped and parsed: (sample name, labels) → value."""
    text = httpx.get(f"http://127.0.0.1:{agent.metrics_port}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_a_stalled_pull_fails_with_pull_stalled_and_a_later_retry_succeeds(
        cluster: Cluster, clean_proxy: FaultProxy, agents: dict[str, Agent]) -> None:
    proxy = clean_proxy
    before = _metrics(agents["e2e-a"])
    image = images.Image([images.random_layer(400_000, seed=81)])
    images.push(proxy.upstream, "e2e/stall", "1", image)
    blob = f"/blobs/{image.layers[0].digest}"
    proxy.stall(blob, after=100_000, times=1)  # 100 kB, then silence...
    proxy.stall(blob, after=0)  # ...and every resume stays silent too
    ref = f"{proxy.host}/e2e/stall:1"

    cluster.apply(prefetch("stall", images=[ref], nodeNames=["e2e-a"],
                           progressTimeout="2s", backoffLimit=0))

    cluster.wait_for(lambda: _phase(cluster, "e2e-a", ref) == "Failed", timeout=30)
    st = node_images(cluster, "e2e-a")[ref]
    assert st["reason"] == "PullStalled"
    assert "no progress in 2s" in st["message"]
    assert st["stallCancellations"] == 1
    cluster.wait_for(lambda: ipf_status(cluster, "stall").get("stalledCancellations") == 1)
    cluster.wait_for(lambda: _events(cluster, "e2e-a", "PullStalled"))
    after = _metrics(agents["e2e-a"])

    def moved(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("prefetcher_pull_stall_cancellations_total") == 1
    assert moved("prefetcher_pulls_total", result="failure", reason="PullStalled") == 1
    assert moved("prefetcher_pull_stalls_total") >= 1  # the resumed silent requests

    proxy.clear()  # the registry is healthy again: the next attempt series succeeds
    cluster.wait_for(lambda: _phase(cluster, "e2e-a", ref) == "Ready", timeout=30)
    st = node_images(cluster, "e2e-a")[ref]
    assert st["stallCancellations"] == 1  # counted for the entry, across attempts
    assert st["digest"] == image.digest
    resumed = [r.range for r in proxy.requests_to(blob) if r.range]
    assert resumed and resumed[-1].startswith("bytes=100000-")
    cluster.wait_for(lambda: ipf_status(cluster, "stall").get("phase") == "Complete")


def test_an_agent_killed_mid_pull_resumes_where_it_stopped(
        cluster: Cluster, clean_proxy: FaultProxy, agents: dict[str, Agent]) -> None:
    proxy = clean_proxy
    image = images.Image([images.random_layer(3_000_000, seed=91)])
    images.push(proxy.upstream, "e2e/slow", "1", image)
    blob = f"/blobs/{image.layers[0].digest}"
    proxy.drip(blob, chunk=32_768, interval=0.04)
    ref = f"{proxy.host}/e2e/slow:1"
    agent = agents["e2e-b"]

    cluster.apply(prefetch("slow", images=[ref], nodeNames=["e2e-b"]))
    cluster.wait_for(lambda: node_images(cluster, "e2e-b").get(ref, {}).get("bytesDone", 0)
                     > 600_000, timeout=30)
    reported = node_images(cluster, "e2e-b")[ref]["bytesDone"]
    agent.process.kill()  # kill -9: no cleanup at all
    proxy.clear()
    proxy.clear_requests()

    agent.start()
    cluster.wait_for(lambda: _phase(cluster, "e2e-b", ref) == "Ready", timeout=30)
    fetches = proxy.requests_to(blob, "GET")
    assert len(fetches) == 1, [r.range for r in fetches]
    start = int((fetches[0].range or "bytes=0-").removeprefix("bytes=").split("-")[0])
    # What was on disk before the kill was not fetched again (bytesDone counts the config).
    assert start >= reported - image.config.size, (start, reported)
    assert node_images(cluster, "e2e-b")[ref]["digest"] == image.digest


def test_sigterm_mid_pull_exits_cleanly_and_says_so_in_the_status(
        cluster: Cluster, clean_proxy: FaultProxy, agents: dict[str, Agent]) -> None:
    proxy = clean_proxy
    image = images.Image([images.random_layer(1_000_000, seed=95)])
    images.push(proxy.upstream, "e2e/term", "1", image)
    blob = f"/blobs/{image.layers[0].digest}"
    proxy.drip(blob, chunk=16_384, interval=0.05)
    ref = f"{proxy.host}/e2e/term:1"
    agent = agents["e2e-a"]

    cluster.apply(prefetch("term", images=[ref], nodeNames=["e2e-a"]))
    cluster.wait_for(lambda: node_images(cluster, "e2e-a").get(ref, {}).get("bytesDone", 0)
                     > 100_000, timeout=30)
    assert agent.process.stop(timeout=10) == 0
    st = node_images(cluster, "e2e-a")[ref]
    assert (st["phase"], st["reason"]) == ("Pending", "AgentStopped")
    proxy.clear()
    agent.start()
    cluster.wait_for(lambda: _phase(cluster, "e2e-a", ref) == "Ready", timeout=30)


def test_deleting_the_prefetch_removes_its_entries_and_gc_removes_the_images(
        cluster: Cluster, registry: registries.Registry, agents: dict[str, Agent]) -> None:
    image = images.Image([images.random_layer(120_000, seed=101)])
    images.push(registry, "e2e/gone", "1", image)
    ref = f"{registry.host}/e2e/gone:1"
    layer = image.layers[0].digest.removeprefix("sha256:")
    stores = [agents[n].root / "content/blobs/sha256" / layer for n in ("e2e-a", "e2e-b")]

    cluster.apply(prefetch("gone", images=[ref], nodeNames=["e2e-a", "e2e-b"]))
    cluster.wait_for(lambda: ipf_status(cluster, "gone").get("phase") == "Complete", timeout=30)
    assert all(path.exists() for path in stores)

    cluster.kubectl("delete", "ipf", "gone", "-n", "team", "--wait=true")
    for node in ("e2e-a", "e2e-b"):
        cluster.wait_for(lambda node=node: ref not in node_images(cluster, node), timeout=20)
    cluster.wait_for(lambda: not any(path.exists() for path in stores), timeout=20,
                     message="GC removed the layer blobs")
    for node in ("e2e-a", "e2e-b"):
        names = [i["name"] for i in agents[node].images()]
        assert not any("e2e/gone" in n for n in names), names
        assert not any(st["name"].startswith("gone") for st in
                       node_status(cluster, node).get("images", []))


def test_bad_references_missing_secrets_and_unauthorized_pulls_fail_alone(
        cluster: Cluster, registry: registries.Registry,
        basic_registry: registries.Registry, agents: dict[str, Agent]) -> None:
    good = images.Image([images.random_layer(50_000, seed=111)])
    private = images.Image([images.random_layer(60_000, seed=112)])
    images.push(registry, "e2e/good", "1", good)
    images.push(basic_registry, "e2e/private", "1", private)
    missing = f"{registry.host}/e2e/does-not-exist:1"
    locked = f"{basic_registry.host}/e2e/private:1"
    fine = f"{registry.host}/e2e/good:1"
    assert basic_registry.auth is not None
    user, password = basic_registry.auth
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    config = json.dumps({"auths": {basic_registry.host: {"auth": auth}}})
    cluster.put("v1", "secrets", {
        "metadata": {"name": "regcred", "namespace": "team"},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": base64.b64encode(config.encode()).decode()}})

    # No secret of its own (the one it names does not exist): each image fails alone.
    cluster.apply(prefetch("broken", images=[missing, locked, fine], nodeNames=["e2e-b"],
                           imagePullSecrets=[{"name": "no-such-secret"}], backoffLimit=1))
    # The same private image with a valid secret, on the other node: it works.
    cluster.apply(prefetch("private", images=[locked], nodeNames=["e2e-a"],
                           imagePullSecrets=[{"name": "regcred"}]))

    cluster.wait_for(lambda: _phase(cluster, "e2e-b", locked) == "Failed", timeout=30)
    cluster.wait_for(lambda: _phase(cluster, "e2e-b", fine) == "Ready", timeout=30)
    st = node_images(cluster, "e2e-b")
    # The operator saw the registry's 404 when resolving: failed once, at the prefetch,
    # and never sent to the node.
    assert missing not in st
    assert st[locked]["reason"] == "Unauthorized", st[locked]
    assert "pulled anonymously" in st[locked]["message"]
    # A permanent error ends its series at once (no backoff within it); one later series
    # may run before this looks (backoffLimit 1 bounds those series; tests/node cover it).
    assert st[locked]["attempts"] in (1, 2)
    assert st[fine]["digest"] == good.digest
    cluster.wait_for(lambda: _events(cluster, "e2e-b", "Failed"))

    cluster.wait_for(lambda: _phase(cluster, "e2e-a", locked) == "Ready", timeout=30)
    assert node_images(cluster, "e2e-a")[locked]["digest"] == private.digest
    cluster.wait_for(lambda: {f["reason"] for f in ipf_status(cluster, "broken")
                              .get("failures", [])} == {"ImageNotFound", "Unauthorized"},
                     timeout=20)
    broken = ipf_status(cluster, "broken")
    assert broken["phase"] == "Failed"
    failed = next(c for c in broken["conditions"] if c["type"] == "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "ImageNotFound")
    assert missing in failed["message"]
    degraded = next(c for c in broken["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "PullSecretNotFound")
    assert "no-such-secret" in degraded["message"]
