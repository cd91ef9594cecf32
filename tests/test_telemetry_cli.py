"""``prefetcher pull`` exporting its trace over OTLP/HTTP to a real receiver on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import images
from fixtures.otlp import OtlpReceiver, ReceivedSpan, by_name
from fixtures.registries import Registry

import agent

PREFETCHER = str(Path(sys.executable).with_name("prefetcher"))
PULL = "agent.images.service.pull"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


def env_for(endpoint: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PREFETCHER_"))}
    if endpoint is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
    env.update(extra)
    return env


def prefetcher(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PREFETCHER, *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def ancestors(span: ReceivedSpan, spans: list[ReceivedSpan]) -> list[str]:
    """Names of ``span``'s ancestors, nearest first."""
    by_id = {s.span_id: s for s in spans}
    names = []
    while span.parent_id:
        span = by_id[span.parent_id]
        names.append(span.name)
    return names


def all_attribute_text(spans: list[ReceivedSpan]) -> str:
    return json.dumps([[s.attributes, s.resource, s.name] for s in spans])


def test_a_cli_pull_exports_one_connected_trace_with_layer_spans(
    registry: Registry, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    image = images.Image(
        [images.layer({"etc/a.txt": "a"}), images.random_layer(300_000, files=3, seed=91)]
    )
    images.push(registry, "otel/app", "1", image)
    ref = f"{registry.host}/otel/app:1"
    env = env_for(
        receiver.endpoint,
        NODE_NAME="node-a",
        POD_NAME="agent-x1",
        POD_NAMESPACE="prefetcher-system",
        OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test",
        PREFETCHER_RUNTIME__LOG_FORMAT="json",
    )

    out = prefetcher("pull", ref, "--root", str(tmp_path / "store"), "--sync-fs", "--verbose",
                     env=env)

    assert out.returncode == 0, out.stderr
    spans = receiver.wait_for(lambda s: bool(by_name(s, PULL)))
    assert receiver.errors == []
    [pull] = by_name(spans, PULL)
    assert pull.parent_id == ""
    assert pull.attributes["image.ref"] == ref
    assert pull.attributes["image.bytes_downloaded"] > 300_000
    # One trace: every span the pull made (registry client spans included) is in it.
    assert {s.trace_id for s in spans} == {pull.trace_id}
    for name in ("resolve", "fetch", "unpack"):
        [span] = by_name(spans, f"agent.images.service.{name}")
        assert PULL in ancestors(span, spans), name

    blobs = by_name(spans, "agent.images.service.fetch_blob")
    assert len(blobs) == len(image.layers) + 1  # and the config
    layer_blobs = {b.attributes["layer.digest"]: b for b in blobs}
    for layer in image.layers:
        blob = layer_blobs[layer.digest]
        assert blob.attributes["layer.size"] == layer.size
        assert "layer" in blob.attributes["layer.media_type"]
        assert blob.attributes["blob.bytes_downloaded"] == layer.size
        assert blob.attributes["blob.retries"] == 0 and blob.attributes["blob.stalls"] == 0
        assert "agent.images.service.fetch" in ancestors(blob, spans)

    [unpack] = by_name(spans, "agent.images.service.unpack")
    layers = by_name(spans, "agent.images.unpack.layer")
    assert sorted(s.attributes["layer.digest"] for s in layers) == sorted(
        layer.digest for layer in image.layers
    )
    for span in layers:
        assert span.parent_id == unpack.span_id
        assert span.attributes["layer.size"] > 0 and span.attributes["layer.media_type"]
        [commit] = [s for s in spans if s.parent_id == span.span_id
                    and s.name == "agent.images.unpack.commit"]
        # The commit waits for the layer's syncfs (which ran beside the next layers' apply).
        [syncfs] = [s for s in spans if s.name == "agent.images.unpack.syncfs"
                    and s.parent_id in (span.span_id, commit.span_id)]
        assert syncfs.end_ns <= commit.end_ns
        assert span.status_code != 2  # not ERROR

    # Registry requests as HTTP client spans, under the service's spans.
    http = [s for s in spans if s.scope.startswith("opentelemetry.instrumentation.httpx")]
    assert http, sorted({s.scope for s in spans})
    assert all(s.parent_id for s in http)

    assert pull.resource["service.name"] == "prefetcher"
    assert pull.resource["service.version"] == agent.__version__
    assert pull.resource["k8s.node.name"] == "node-a"
    assert pull.resource["k8s.pod.name"] == "agent-x1"
    assert pull.resource["k8s.namespace.name"] == "prefetcher-system"
    assert pull.resource["deployment.environment"] == "test"

    # The JSON summary lines are written inside the pull span: they carry its ids.
    records = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    summary = {r["message"]: r for r in records if r["logger"] == "agent.pull"}
    assert set(summary) == {"pull started", "pull finished"}
    for record in summary.values():
        assert record["trace_id"] == pull.trace_id
    assert summary["pull finished"]["span_id"] == pull.span_id
    assert summary["pull finished"]["bytes_downloaded"] == pull.attributes["image.bytes_downloaded"]


def test_no_credential_or_token_query_reaches_any_span(
    basic_registry: Registry, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    username, password = basic_registry.auth
    image = images.Image([images.random_layer(20_000, seed=92)])
    images.push(basic_registry, "otel/private", "1", image)
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(
        json.dumps({"auths": {basic_registry.host: {"username": username, "password": password}}})
    )
    ref = f"{basic_registry.host}/otel/private:1"

    out = prefetcher(
        "pull", ref, "--root", str(tmp_path / "store"), "--no-unpack",
        "--auth-file", str(auth_file), env=env_for(receiver.endpoint),
    )

    assert out.returncode == 0, out.stderr
    spans = receiver.wait_for(lambda s: bool(by_name(s, PULL)))
    text = all_attribute_text(spans)
    assert password not in text
    assert "Basic " not in text and "Bearer " not in text
    http = [s for s in spans if s.scope.startswith("opentelemetry.instrumentation.httpx")]
    assert http
    for s in http:
        for key in ("url.full", "http.url"):
            if key in s.attributes:
                assert "?" not in s.attributes[key] and "@" not in s.attributes[key]


def test_token_requests_keep_their_query_out_of_spans(
    token_registry: Registry, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    username, password = token_registry.auth
    image = images.Image([images.random_layer(10_000, seed=93)])
    images.push(token_registry, "otel/tokens", "1", image)
    auth_file = tmp_path / "auth.json"
    auth_file.write_text(
        json.dumps({"auths": {token_registry.host: {"username": username, "password": password}}})
    )

    out = prefetcher(
        "pull", f"{token_registry.host}/otel/tokens:1", "--root", str(tmp_path / "store"),
        "--no-unpack", "--auth-file", str(auth_file), env=env_for(receiver.endpoint),
    )

    assert out.returncode == 0, out.stderr
    spans = receiver.wait_for(lambda s: bool(by_name(s, PULL)))
    text = all_attribute_text(spans)
    assert password not in text
    assert "scope=" not in text and "account=" not in text and "access_token" not in text


def test_the_sampler_comes_from_the_standard_variables(
    registry: Registry, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    images.push(registry, "otel/sampled", "1", images.Image([images.random_layer(10_000, seed=95)]))
    env = env_for(receiver.endpoint, OTEL_TRACES_SAMPLER="always_off")
    out = prefetcher(
        "pull", f"{registry.host}/otel/sampled:1", "--root", str(tmp_path), "--no-unpack", env=env
    )
    assert out.returncode == 0, out.stderr
    assert receiver.spans == []


def test_without_an_endpoint_nothing_is_exported_and_the_pull_works(
    registry: Registry, receiver: OtlpReceiver, tmp_path: Path
) -> None:
    images.push(registry, "otel/off", "1", images.Image([images.random_layer(10_000, seed=94)]))
    env = env_for(None)
    out = prefetcher(
        "pull", f"{registry.host}/otel/off:1", "--root", str(tmp_path), "--no-unpack", env=env
    )
    assert out.returncode == 0, out.stderr
    time.sleep(0.2)
    assert receiver.requests == 0
