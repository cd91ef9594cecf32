"""One OpenTelemetry trace per prefetch, across processes: the operator's dispatch span and
every node's pull spans share a trace id, and each node's pull is a child of the dispatch
span (its context travels in the NodeImageSet entry's ``traceparent``). The operator and agents
export over OTLP/HTTP to a real receiver (``tests/fixtures/otlp.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from fixtures import images, registries
from fixtures.otlp import OtlpReceiver, by_name

from tests.kube.cluster import Cluster

from .conftest import Agent, ipf_status, prefetch

OTEL = {
    "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
    "OTEL_BSP_SCHEDULE_DELAY": "200",
}


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        saved = {k: os.environ.get(k) for k in [*OTEL, "OTEL_EXPORTER_OTLP_ENDPOINT"]}
        os.environ.update(OTEL, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
        try:
            yield receiver
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def cluster(otlp: OtlpReceiver, cluster: Cluster) -> Cluster:
    """The module's emulator, created after the OTLP variables are set, so the operator and
    agents started for this module export to the receiver."""
    return cluster


def test_the_operators_dispatch_and_every_nodes_pull_form_one_trace(
    cluster: Cluster, otlp: OtlpReceiver, registry: registries.Registry,
    agents: dict[str, Agent],
) -> None:
    image = images.Image([images.random_layer(100_000, seed=91), images.layer({"a": "b"})])
    images.push(registry, "e2e/traced", "1", image)
    cluster.apply(prefetch("traced", images=[f"{registry.host}/e2e/traced:1"],
                           nodeSelector={"matchLabels": {"pool": "e2e"}}))
    cluster.wait_for(lambda: ipf_status(cluster, "traced").get("phase") == "Complete",
                     timeout=60, message="the prefetch completes")

    spans = otlp.wait_for(
        lambda s: len(by_name(s, "agent.images.service.pull")) >= 2
        and len(by_name(s, "agent.node.pull")) >= 2 and by_name(s, "agent.operator.dispatch"),
        timeout=20,
    )
    [dispatch] = [s for s in by_name(spans, "agent.operator.dispatch")]
    [reconcile] = by_name(spans, "agent.operator.reconcile")
    assert dispatch.parent_id == reconcile.span_id
    assert reconcile.attributes["prefetch.name"] == "traced"
    assert reconcile.resource["service.name"] == "prefetcher-operator"

    # dispatch → agent.node.pull (each node's attempt) → agent.images.service.pull → work
    node_pulls = by_name(spans, "agent.node.pull")
    assert {p.resource["k8s.node.name"] for p in node_pulls} == {"e2e-a", "e2e-b"}
    assert all(p.parent_id == dispatch.span_id for p in node_pulls)
    pulls = by_name(spans, "agent.images.service.pull")
    assert {p.parent_id for p in pulls} == {p.span_id for p in node_pulls}
    for pull in pulls:
        assert pull.trace_id == dispatch.trace_id == reconcile.trace_id
        children = {s.name for s in spans if s.parent_id == pull.span_id}
        assert {"agent.images.service.resolve", "agent.images.service.fetch"} <= children
