"""Prometheus metrics: real pulls (one fine, one stalled) recorded, served and parsed."""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy
from fixtures.registries import Registry
from prometheus_client.parser import text_string_to_metric_families

from agent import metrics
from agent.images import backends, descriptors, errors, service
from agent.images.progress import events
from agent.images.registry import client, hosts
from tests.images.pulling import FAST_RETRY

AMD64 = descriptors.Platform("linux", "amd64")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def agent_metrics() -> Iterator[tuple[metrics.AgentMetrics, metrics.MetricsServer]]:
    m = metrics.AgentMetrics()
    server = metrics.serve("127.0.0.1:0", m.registry)
    assert server is not None
    yield m, server
    server.close()


async def recorded_pull(
    m: metrics.AgentMetrics, root: Path, reference: str, **options: object
) -> service.PullResult:
    """Pull as the agent will: the recorder inside ``on_event``, finished by the result."""
    seen: list[events.ProgressEvent] = []
    async with client.RegistryClient(hosts.RegistryHosts(None), None, retry=FAST_RETRY) as rc:
        svc = service.ImageService(root, rc, service.ServiceOptions(**options),
                                   backend=backends.LocalBackend(None))  # type: ignore[arg-type]
        try:
            with m.pulls.recording(reference) as recorder:
                result = await svc.pull(
                    reference, platform=AMD64, on_event=metrics.tee(seen.append, recorder)
                )
                recorder.observe_result(result)
                return result
        finally:
            svc.close()


async def test_a_pull_and_a_stalled_pull_move_the_counters(
    agent_metrics: tuple[metrics.AgentMetrics, metrics.MetricsServer],
    fault_proxy: FaultProxy,
    tmp_path: Path,
) -> None:
    m, server = agent_metrics
    fine = images.Image([images.random_layer(200_000, seed=101)])
    images.push(fault_proxy.upstream, "metrics/fine", "1", fine)
    stuck = images.Image([images.random_layer(300_000, seed=102)])
    images.push(fault_proxy.upstream, "metrics/stuck", "1", stuck)
    fault_proxy.stall(f"/blobs/{stuck.layers[0].digest}", after=50_000)

    before = parse(scrape(server.url))
    result = await recorded_pull(m, tmp_path / "a", f"{fault_proxy.host}/metrics/fine:1")
    with pytest.raises(errors.PullStalled):
        await recorded_pull(
            m, tmp_path / "b", f"{fault_proxy.host}/metrics/stuck:1", progress_timeout=2.0
        )
    text = scrape(server.url)
    after = parse(text)

    assert value(before, "prefetcher_pulls_total", result="success", reason="Pulled") == 0
    assert value(after, "prefetcher_pulls_total", result="success", reason="Pulled") == 1
    assert value(after, "prefetcher_pulls_total", result="failure", reason="PullStalled") == 1
    assert value(after, "prefetcher_pull_stall_cancellations_total") == 1
    # The stalled blob was aborted and resumed three times (recovered stalls) before the
    # fourth stall cancelled the pull; each resume is a retry.
    assert value(after, "prefetcher_pull_stalls_total") == 3
    assert value(after, "prefetcher_pull_retries_total") == 3
    # Bytes: all of the fine pull, plus the stalled pull's config and the 4 × 50 000 bytes
    # of its layer that did arrive.
    stalled_bytes = stuck.config.size + 4 * 50_000
    assert value(after, "prefetcher_pull_bytes_total") == result.bytes_downloaded + stalled_bytes
    assert value(after, "prefetcher_pull_duration_seconds_count", result="success") == 1
    assert value(after, "prefetcher_pull_duration_seconds_count", result="failure") == 1
    assert value(after, "prefetcher_pulls_in_flight") == 0
    assert value(after, "prefetcher_build_info", version=__import__("agent").__version__,
                 component="agent") == 1
    # Low cardinality: no digest or reference as a label value.
    label_values = {v for (_, labels) in after for _, v in labels}
    assert not [v for v in label_values if "sha256" in v or fault_proxy.host in v]
    assert "sha256:" not in "".join(line for line in text.splitlines() if not line.startswith("#"))


async def test_an_image_already_present_counts_as_already_present(
    agent_metrics: tuple[metrics.AgentMetrics, metrics.MetricsServer],
    registry: Registry,
    tmp_root: Path,
) -> None:
    m, server = agent_metrics
    image = images.Image([images.random_layer(10_000, seed=103)])
    images.push(registry, "metrics/twice", "1", image)
    ref = f"{registry.host}/metrics/twice:1"
    await recorded_pull(m, tmp_root, ref)
    await recorded_pull(m, tmp_root, ref)
    after = parse(scrape(server.url))
    assert value(after, "prefetcher_pulls_total", result="success", reason="Pulled") == 1
    assert value(after, "prefetcher_pulls_total", result="success", reason="AlreadyPresent") == 1


async def test_store_usage_is_reported_from_the_callback(
    registry: Registry, tmp_root: Path
) -> None:
    image = images.Image([images.random_layer(30_000, seed=104), images.layer({"b": "b"})])
    images.push(registry, "metrics/store", "1", image)
    m = metrics.AgentMetrics()
    async with client.RegistryClient(hosts.RegistryHosts(None), None, retry=FAST_RETRY) as rc:
        svc = service.ImageService(tmp_root, rc, service.ServiceOptions(),
                                    backend=backends.open_store(tmp_root, "naive"))
        try:
            await svc.pull(f"{registry.host}/metrics/store:1", platform=AMD64)
            stats = metrics.measure_store(svc)
        finally:
            svc.close()
    m.register_store(lambda: stats)
    from prometheus_client import generate_latest

    samples = parse(generate_latest(m.registry).decode())
    assert value(samples, "prefetcher_store_blobs") == 4  # manifest, config, two layers
    assert value(samples, "prefetcher_store_size_bytes") == stats.size_bytes > 30_000
    assert value(samples, "prefetcher_store_snapshots") == 2
    assert value(samples, "prefetcher_store_images") == 1
    assert value(samples, "prefetcher_store_free_bytes") > 0


def test_a_failing_store_callback_does_not_fail_the_scrape() -> None:
    m = metrics.AgentMetrics()

    def broken() -> metrics.StoreStats:
        raise OSError("gone")

    m.register_store(broken)
    from prometheus_client import generate_latest

    text = generate_latest(m.registry).decode()
    assert "prefetcher_pulls_in_flight" in text and "prefetcher_store_blobs" not in text


def test_a_recorder_without_a_result_is_judged_by_its_final_phase() -> None:
    m = metrics.AgentMetrics()
    snap = events.ProgressSnapshot(reference="r", phase=events.Phase.READY)
    with m.pulls.recording() as recorder:
        recorder(events.PhaseChanged(snapshot=snap, phase=events.Phase.READY, message="r@x"))
    with pytest.raises(errors.NotFound), m.pulls.recording():
        raise errors.NotFound("no such image")
    from prometheus_client import generate_latest

    samples = parse(generate_latest(m.registry).decode())
    assert value(samples, "prefetcher_pulls_total", result="success",
                 reason="AlreadyPresent") == 1
    assert value(samples, "prefetcher_pulls_total", result="failure", reason="NotFound") == 1
    assert value(samples, "prefetcher_pulls_in_flight") == 0


def test_operator_metrics_are_served_with_conventional_names() -> None:
    m = metrics.OperatorMetrics()
    server = metrics.serve("127.0.0.1:0", m.registry)
    assert server is not None
    try:
        m.set_prefetches({"Progressing": 2, "Complete": 5})
        m.set_nodes({"ready": 7, "pulling": 3})
        with m.time_reconcile():
            pass
        with pytest.raises(RuntimeError), m.time_reconcile():
            raise RuntimeError("boom")
        m.api_error("PATCH", 409)
        m.dispatches.inc(3)
        samples = parse(scrape(server.url))
    finally:
        server.close()
    assert value(samples, "prefetcher_operator_prefetches", phase="Progressing") == 2
    assert value(samples, "prefetcher_operator_prefetches", phase="Failed") == 0
    assert value(samples, "prefetcher_operator_nodes", state="pulling") == 3
    assert value(samples, "prefetcher_operator_reconcile_duration_seconds_count",
                 result="success") == 1
    assert value(samples, "prefetcher_operator_reconcile_duration_seconds_count",
                 result="error") == 1
    assert value(samples, "prefetcher_operator_api_errors_total", verb="patch", code="409") == 1
    assert value(samples, "prefetcher_operator_dispatches_total") == 3


def test_metrics_addresses() -> None:
    assert metrics.parse_address(":9090") == ("0.0.0.0", 9090)
    assert metrics.parse_address("[::1]:9090") == ("::1", 9090)
    assert metrics.parse_address("127.0.0.1:0") == ("127.0.0.1", 0)
    assert metrics.parse_address("") is None
    assert metrics.serve("", metrics.AgentMetrics().registry) is None
