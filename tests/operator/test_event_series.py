"""Repeated Events are a Kubernetes event series: one Event object per (object, type,
reason) whose ``count`` and ``lastTimestamp`` are patched on every repeat (as client-go's
recorder does), so ``kubectl describe`` / ``kubectl events`` show "x2", not two rows."""

from __future__ import annotations

import asyncio
import time

from agent.kube import connections
from agent.operator import event_series, kubeapi
from tests.kube.cluster import Cluster

from .conftest import Operator, entries_of, ipf, prefetch


def events_about(cluster: Cluster, name: str, reason: str,
                 namespace: str = "default") -> list[dict[str, object]]:
    return [e for e in cluster.list("v1", "events", namespace)
            if e["involvedObject"].get("name") == name and e["reason"] == reason]


def test_repeats_of_a_reason_patch_one_event_and_an_expired_one_is_created_again(
        cluster: Cluster) -> None:
    cluster.put("v1", "namespaces", {"metadata": {"name": "series"}})
    target = {"apiVersion": "prefetcher.dev/v1alpha1", "kind": "ImagePrefetch",
              "metadata": {"name": "p", "namespace": "series", "uid": "uid-p"}}

    async def main() -> None:
        client = kubeapi.Client(connections.Connection(server=cluster.url))
        recorder = event_series.EventRecorder(client, instance="operator-0")
        try:
            for n in range(1, 4):
                recorder.record(target, "Warning", "PullFailed", f"{2 ** n} node(s) failed")
            recorder.record(target, "Normal", "Started", "dispatching to 8 node(s)")
            await recorder.flush()
            await asyncio.sleep(1.1)  # a later repeat has a later lastTimestamp
            recorder.record(target, "Warning", "PullFailed", "16 node(s) failed")
            await recorder.flush()
            (failed,) = events_about(cluster, "p", "PullFailed", "series")
            assert failed["count"] == 4 and failed["message"] == "16 node(s) failed"
            assert failed["lastTimestamp"] > failed["firstTimestamp"]
            assert failed["involvedObject"] == {
                "apiVersion": "prefetcher.dev/v1alpha1", "kind": "ImagePrefetch",
                "name": "p", "namespace": "series", "uid": "uid-p"}
            assert failed["reportingInstance"] == "operator-0"
            assert [e["count"] for e in events_about(cluster, "p", "Started", "series")] == [1]
            # The API server dropped it (its event TTL): the next repeat starts a new one.
            cluster.delete("v1", "events", failed["metadata"]["name"], "series")  # type: ignore[index]
            recorder.record(target, "Warning", "PullFailed", "32 node(s) failed")
            await recorder.flush()
            (again,) = events_about(cluster, "p", "PullFailed", "series")
            assert again["count"] == 1 and again["message"] == "32 node(s) failed"
        finally:
            await recorder.close()
            await client.aclose()

    asyncio.run(main())
    calls = [(c.verb, c.resource) for c in cluster.calls() if c.namespace == "series"]
    # Three repeats patched, one patch found the Event gone; three Events created in all.
    assert calls.count(("patch", "events")) == 4
    assert calls.count(("create", "events")) == 3


def test_the_operator_patches_a_repeated_reason_into_one_event(
        cluster: Cluster, operator: Operator) -> None:
    """A node name that is not a node, then another one after an edit: one NodeNotFound
    Event, counted twice, saying the latest, as kubectl shows it."""
    cluster.add_node("series-a", {"pool": "series"})
    cluster.apply(prefetch("series", "default", images=["nginx:1.27"],
                           nodeNames=["series-a", "series-typo"]))
    cluster.wait_for(lambda: events_about(cluster, "series", "NodeNotFound"))
    cluster.wait_for(lambda: entries_of(cluster, "series-a", "series"))
    cluster.apply(prefetch("series", "default", images=["nginx:1.27"],
                           nodeNames=["series-a", "series-other-typo"]))
    cluster.wait_for(lambda: "series-other-typo" in str(
        [e["message"] for e in events_about(cluster, "series", "NodeNotFound")]))
    time.sleep(1)  # a second Event would have been posted by now
    found = events_about(cluster, "series", "NodeNotFound")
    assert len(found) == 1, found
    assert found[0]["count"] == 2
    assert ipf(cluster, "series", "default")["metadata"]["uid"] == \
        found[0]["involvedObject"]["uid"]  # type: ignore[index]
    shown = cluster.kubectl("events", "-n", "default", "--for", "imageprefetch/series").stdout
    rows = [line for line in shown.splitlines() if "NodeNotFound" in line]
    assert len(rows) == 1 and "(x2 over" in rows[0], shown
