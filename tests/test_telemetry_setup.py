"""``agent.telemetry`` pieces that need no collector: redaction, resource, traceparent."""

from __future__ import annotations

import subprocess
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

import agent
from agent import telemetry


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://auth.example.com/token?account=bob&scope=repository:a:pull&service=r",
         "https://auth.example.com/token"),
        ("https://bob:s3cret@registry.example.com:5000/v2/", "https://registry.example.com:5000/v2/"),
        ("https://bucket.s3.amazonaws.com/blob?X-Amz-Signature=abc#frag",
         "https://bucket.s3.amazonaws.com/blob"),
        ("http://[::1]:8080/v2/a/blobs/sha256:x", "http://[::1]:8080/v2/a/blobs/sha256:x"),
    ],
)
def test_urls_lose_credentials_and_queries(url: str, expected: str) -> None:
    assert telemetry.redact_url(url) == expected


def test_resource_defaults_yield_to_the_standard_variables(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("POD_NAME", "KUBERNETES_SERVICE_HOST", "OTEL_SERVICE_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NODE_NAME", "from-env")
    monkeypatch.setenv("POD_NAMESPACE", "ns")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "k8s.namespace.name=override,team=img")
    attrs = telemetry.resource_attributes("prefetcher-agent", node_name="node-1")
    assert attrs["service.name"] == "prefetcher-agent"
    assert attrs["service.version"] == agent.__version__
    assert attrs["k8s.node.name"] == "node-1"
    assert attrs["k8s.namespace.name"] == "override"
    assert attrs["team"] == "img"
    assert "k8s.pod.name" not in attrs
    monkeypatch.setenv("OTEL_SERVICE_NAME", "custom")
    assert telemetry.resource_attributes("prefetcher-agent")["service.name"] == "custom"


def test_a_traceparent_carries_the_dispatch_span_to_the_pull() -> None:
    tracer = TracerProvider().get_tracer("test")
    assert telemetry.current_traceparent() is None
    with tracer.start_as_current_span("dispatch") as dispatch:
        traceparent = telemetry.current_traceparent()
    assert traceparent is not None
    with telemetry.remote_parent(traceparent):
        with tracer.start_as_current_span("pull") as pull:
            pass
    parent = pull.parent
    assert parent is not None and parent.span_id == dispatch.get_span_context().span_id
    assert pull.get_span_context().trace_id == dispatch.get_span_context().trace_id
    # Outside the block, and with no or a bad traceparent, new traces start.
    assert trace.get_current_span().get_span_context().is_valid is False
    with telemetry.remote_parent(None), tracer.start_as_current_span("alone") as alone:
        assert alone.parent is None
    with telemetry.remote_parent("garbage"), tracer.start_as_current_span("alone") as alone:
        assert alone.parent is None


def run_python(code: str, **env: str) -> str:
    clean = {"PATH": "/usr/bin:/bin", **env}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=clean
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_without_an_endpoint_nothing_is_set_up_and_the_sdk_is_not_loaded() -> None:
    code = (
        "import sys; from agent import telemetry; t = telemetry.setup();"
        "print(t.enabled, 'opentelemetry.sdk.trace' in sys.modules, t.shutdown())"
    )
    assert run_python(code) == "False False True"
    assert run_python(code, OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:1",
                      OTEL_SDK_DISABLED="true") == "False False True"


def test_a_forced_setup_exports_to_the_given_exporter_and_instruments_httpx() -> None:
    code = """
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from agent import telemetry
from agent.images import tracing
exporter = InMemorySpanExporter()
t = telemetry.setup("svc", exporter=exporter, http_client_spans=True)
assert telemetry.setup("other") is t
with tracing.span("agent.test", "work", {"a": 1}):
    pass
print(t.enabled, t.http_client_spans, t.shutdown(), t.shutdown())
print([s.name for s in exporter.get_finished_spans()], t.resource["service.name"])
"""
    assert run_python(code).splitlines() == ["True True True True", "['agent.test.work'] svc"]
