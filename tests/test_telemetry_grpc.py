"""OTLP over gRPC (the collector's ``:4317``) and the protocol variables, per the OTel spec:
``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` over ``OTEL_EXPORTER_OTLP_PROTOCOL``, default
``http/protobuf``. Real receivers on loopback, a real ``prefetcher pull``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import images
from fixtures.otlp import GrpcOtlpReceiver, OtlpReceiver, by_name
from fixtures.registries import Registry

from tests.test_telemetry_cli import PULL, env_for, prefetcher


@pytest.fixture
def grpc_receiver() -> Iterator[GrpcOtlpReceiver]:
    with GrpcOtlpReceiver() as r:
        yield r


@pytest.fixture
def http_receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def image_ref(registry: Registry) -> str:
    images.push(registry, "otel/grpc", "1", images.Image([images.random_layer(50_000, seed=97)]))
    return f"{registry.host}/otel/grpc:1"


def pull(image_ref: str, root: Path, env: dict[str, str]) -> list[str]:
    """``prefetcher pull`` with JSON logs; its stderr lines, each checked to be JSON."""
    out = prefetcher("pull", image_ref, "--root", str(root), "--no-unpack", "--verbose", "--json",
                     env=env | {"PREFETCHER_RUNTIME__LOG_FORMAT": "json"})
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    for line in lines:
        json.loads(line)  # gRPC's own C-core output would break a log collector's parsing
    return lines


def test_protocol_grpc_exports_the_pull_trace_to_a_grpc_collector(
    image_ref: str, grpc_receiver: GrpcOtlpReceiver, tmp_path: Path
) -> None:
    env = env_for(None, OTEL_EXPORTER_OTLP_ENDPOINT=grpc_receiver.endpoint,
                  OTEL_EXPORTER_OTLP_PROTOCOL="grpc", NODE_NAME="node-g")

    pull(image_ref, tmp_path, env)

    spans = grpc_receiver.wait_for(lambda s: bool(by_name(s, PULL)))
    [root] = by_name(spans, PULL)
    assert root.attributes["image.ref"] == image_ref
    assert root.resource["service.name"] == "prefetcher"
    assert root.resource["k8s.node.name"] == "node-g"
    assert {s.trace_id for s in spans} == {root.trace_id}
    assert len(spans) > 3  # resolve, fetch, blobs, HTTP client spans


def test_the_traces_protocol_variable_wins_over_the_general_one(
    image_ref: str, grpc_receiver: GrpcOtlpReceiver, http_receiver: OtlpReceiver,
    tmp_path: Path,
) -> None:
    env = env_for(None, OTEL_EXPORTER_OTLP_ENDPOINT=http_receiver.endpoint,
                  OTEL_EXPORTER_OTLP_PROTOCOL="http/protobuf",
                  OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=grpc_receiver.endpoint,
                  OTEL_EXPORTER_OTLP_TRACES_PROTOCOL="grpc")

    pull(image_ref, tmp_path, env)

    assert by_name(grpc_receiver.wait_for(lambda s: bool(by_name(s, PULL))), PULL)
    assert http_receiver.requests == 0


def test_without_a_protocol_variable_the_default_is_http_protobuf(
    image_ref: str, grpc_receiver: GrpcOtlpReceiver, http_receiver: OtlpReceiver,
    tmp_path: Path,
) -> None:
    env = env_for(None, OTEL_EXPORTER_OTLP_ENDPOINT=http_receiver.endpoint)

    pull(image_ref, tmp_path, env)

    assert by_name(http_receiver.wait_for(lambda s: bool(by_name(s, PULL))), PULL)
    assert grpc_receiver.requests == 0
