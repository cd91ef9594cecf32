"""OpenTelemetry SDK setup for the entry points (CLI, node agent, operator).

The image service uses only the OpenTelemetry *API* (``agent/images/tracing.py``); this module
is the one place that installs an SDK ``TracerProvider`` and an OTLP exporter, as containerd
splits ``pkg/tracing`` from its OTLP plugin. Entry points call :func:`setup` once at start and
:meth:`Telemetry.shutdown` (or :func:`shutdown`) on the way out::

    tel = telemetry.setup("prefetcher-agent", node_name=settings.runtime.node_name,
                          enabled=settings.tracing.enabled,
                          http_client_spans=settings.tracing.http_client_spans)
    try:
        ...
    finally:
        tel.shutdown()

Configuration is the standard variables, read by the SDK and exporters themselves:
``OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT``, ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL``
(``grpc`` or ``http/protobuf``, the default), ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`` /
``_TIMEOUT`` / ``_CERTIFICATE`` / ``_INSECURE``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER[_ARG]`` (default
``parentbased_always_on``), ``OTEL_BSP_*``, ``OTEL_SDK_DISABLED`` and
``OTEL_TRACES_EXPORTER=none``.

Nothing is set up (the API's no-op tracer stays, and the SDK is not even imported) unless an
endpoint variable is set or ``force`` is passed. A collector that is down or slow never
blocks a pull: spans go to a bounded in-memory queue (``OTEL_BSP_MAX_QUEUE_SIZE``, 2048;
spans beyond it are dropped) exported by a background thread with a short per-export
timeout (:data:`DEFAULT_EXPORT_TIMEOUT` unless ``OTEL_EXPORTER_OTLP[_TRACES]_TIMEOUT`` says
otherwise), and shutdown flushes for at most a deadline, then gives up.

Cross-process traces (operator dispatch → agent pull) travel as a W3C ``traceparent`` string:
the operator stores :func:`current_traceparent` in the ``NodeImageSet`` entry; the agent runs
the pull inside ``with telemetry.remote_parent(entry_traceparent):``.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

import agent

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "DEFAULT_EXPORT_TIMEOUT",
    "DEFAULT_SHUTDOWN_TIMEOUT",
    "Telemetry",
    "context_from_traceparent",
    "current_traceparent",
    "redact_url",
    "remote_parent",
    "resource_attributes",
    "setup",
    "shutdown",
]

logger = logging.getLogger("agent.telemetry")

#: Seconds one export request may take (the OTLP default is 10 s) unless the variables say.
DEFAULT_EXPORT_TIMEOUT = 2.0
#: Seconds :meth:`Telemetry.shutdown` waits for the last spans to be exported.
DEFAULT_SHUTDOWN_TIMEOUT = 3.0

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_TIMEOUT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT")
_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
_PROPAGATOR = TraceContextTextMapPropagator()
#: Header attributes the httpx instrumentation may capture that must never be exported.
_SECRET_HEADER_WORDS = ("authorization", "cookie", "token", "secret", "key", "password")
_REDACTED = "REDACTED"

_lock = threading.Lock()
_current: Telemetry | None = None


@dataclass
class Telemetry:
    """What :func:`setup` installed. ``enabled`` is false when it installed nothing."""

    enabled: bool = False
    provider: TracerProvider | None = None
    protocol: str = ""
    http_client_spans: bool = False
    resource: dict[str, Any] = field(default_factory=dict)
    _done: bool = False

    def shutdown(self, timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
        """Flush the queued spans and stop exporting, waiting ``timeout`` seconds at most.

        Returns whether everything finished in time. Safe to call more than once and when
        nothing was set up. Never raises: telemetry must not fail the process.
        """
        global _current
        if self._done or self.provider is None:
            self._done = True
            return True
        self._done = True
        provider = self.provider
        if self.http_client_spans:
            _uninstrument_httpx()

        def stop() -> None:
            try:
                provider.shutdown()
            except Exception:  # pragma: no cover - the SDK logs its own failures
                logger.debug("tracer provider shutdown failed", exc_info=True)

        # provider.shutdown() waits up to 30 s for the export thread; bound it here.
        worker = threading.Thread(target=stop, name="telemetry-shutdown", daemon=True)
        worker.start()
        worker.join(max(0.0, timeout))
        with _lock:
            if _current is self:
                _current = None
        if worker.is_alive():
            logger.warning("spans not exported within %.1fs at shutdown: dropped", timeout)
            return False
        return True


def setup(
    service_name: str = "prefetcher",
    *,
    enabled: bool = True,
    http_client_spans: bool = True,
    node_name: str = "",
    force: bool = False,
    exporter: SpanExporter | None = None,
    extra_resource: Mapping[str, str] | None = None,
) -> Telemetry:
    """Install the SDK tracer provider and OTLP exporter per the ``OTEL_*`` variables.

    Args:
        service_name: ``service.name`` unless ``OTEL_SERVICE_NAME`` (or
            ``OTEL_RESOURCE_ATTRIBUTES``) names one: ``prefetcher-agent``,
            ``prefetcher-operator``, ``prefetcher`` for the CLI.
        enabled: ``tracing.enabled`` from the settings; false installs nothing.
        http_client_spans: ``tracing.http_client_spans``: a client span per registry
            request (httpx instrumentation), with query strings and credentials removed.
        node_name: ``k8s.node.name`` (``runtime.node_name``; else ``$NODE_NAME``).
        force: set up even without an endpoint variable (exporting to the OTLP default
            ``localhost:4318``/``4317``, or to ``exporter``).
        exporter: export to this instead of OTLP (tests: an in-memory exporter).
        extra_resource: more resource attributes (the variables still win).

    Returns:
        A :class:`Telemetry`; call its ``shutdown()`` before exiting. A second call in the
        same process returns the first one's result (a provider can be installed once).
    """
    global _current
    with _lock:
        if _current is not None:
            return _current
        env = os.environ
        if not enabled or _truthy(env.get("OTEL_SDK_DISABLED")):
            return Telemetry()
        if env.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none" and exporter is None:
            return Telemetry()
        if exporter is None and not force and not any(env.get(v) for v in _ENDPOINT_VARS):
            return Telemetry()

        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        attributes = resource_attributes(service_name, node_name=node_name, extra=extra_resource)
        provider = TracerProvider(  # sampler: OTEL_TRACES_SAMPLER[_ARG], read by the SDK
            resource=Resource.create(attributes), shutdown_on_exit=False
        )
        protocol = "custom"
        if exporter is None:
            exporter, protocol = _otlp_exporter()
        # Bounded queue (OTEL_BSP_MAX_QUEUE_SIZE, default 2048), background export thread.
        provider.add_span_processor(BatchSpanProcessor(exporter))
        trace.set_tracer_provider(provider)
        telemetry = Telemetry(
            enabled=True,
            provider=provider,
            protocol=protocol,
            http_client_spans=http_client_spans and _instrument_httpx(provider),
            resource=dict(provider.resource.attributes),
        )
        _current = telemetry
        atexit.register(telemetry.shutdown)
        return telemetry


def shutdown(timeout: float = DEFAULT_SHUTDOWN_TIMEOUT) -> bool:
    """Shut down what :func:`setup` installed in this process (a no-op if nothing)."""
    current = _current
    return current.shutdown(timeout) if current is not None else True


def resource_attributes(
    service_name: str, *, node_name: str = "", extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The resource: our defaults, then ``extra``, then ``OTEL_RESOURCE_ATTRIBUTES`` and
    ``OTEL_SERVICE_NAME`` on top (an operator's explicit variables win).

    ``k8s.node.name``, ``k8s.pod.name`` and ``k8s.namespace.name`` come from
    ``node_name``/``$NODE_NAME``, ``$POD_NAME`` (else ``$HOSTNAME``, the pod name in a
    pod) and ``$POD_NAMESPACE`` — the Downward API variables the chart sets.
    """
    from opentelemetry.sdk.resources import OTELResourceDetector

    env = os.environ
    attrs: dict[str, str] = {
        "service.name": service_name,
        "service.namespace": "image-prefetcher",
        "service.version": agent.__version__,
    }
    k8s = {
        "k8s.node.name": node_name or env.get("NODE_NAME", ""),
        "k8s.pod.name": env.get("POD_NAME", "") or (
            env.get("HOSTNAME", "") if env.get("KUBERNETES_SERVICE_HOST") else ""
        ),
        "k8s.namespace.name": env.get("POD_NAMESPACE", ""),
    }
    attrs.update({k: v for k, v in k8s.items() if v})
    attrs.update(extra or {})
    attrs.update({k: str(v) for k, v in OTELResourceDetector().detect().attributes.items()})
    return attrs


# Cross-process context (the NodeImageSet entry's ``traceparent``).


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current span, or ``None`` when not tracing.

    The operator stores it on the ``NodeImageSet`` entry it dispatches, inside its
    dispatch span.
    """
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def context_from_traceparent(traceparent: str | None) -> otel_context.Context:
    """A context whose parent is the span ``traceparent`` names (empty if invalid/None)."""
    if not traceparent:
        return otel_context.Context()
    return _PROPAGATOR.extract({"traceparent": traceparent})


@contextlib.contextmanager
def remote_parent(traceparent: str | None) -> Iterator[None]:
    """Spans started in this block join the trace ``traceparent`` names (the agent's pull
    joins the operator's dispatch). Without a valid one, the block's spans start new traces.
    """
    if not traceparent:
        yield
        return
    token = otel_context.attach(context_from_traceparent(traceparent))
    try:
        yield
    finally:
        otel_context.detach(token)


# Exporter and httpx instrumentation.


def _otlp_exporter() -> tuple[SpanExporter, str]:
    env = os.environ
    protocol = next((env[v] for v in _PROTOCOL_VARS if env.get(v)), "http/protobuf")
    protocol = protocol.strip().lower()
    timeout = None if any(env.get(v) for v in _TIMEOUT_VARS) else DEFAULT_EXPORT_TIMEOUT
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter(timeout=timeout), protocol
    if protocol != "http/protobuf":
        logger.warning(
            "OTEL_EXPORTER_OTLP_PROTOCOL=%r is not supported (grpc or http/protobuf):"
            " using http/protobuf", protocol,
        )
        protocol = "http/protobuf"
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpExporter,
    )

    return HttpExporter(timeout=timeout), protocol


def redact_url(url: str) -> str:
    """``url`` without user info, query string or fragment: what a span may record.

    Token requests carry ``account``/``scope`` (and some realms secrets) in the query;
    blob redirects to object storage carry signatures there.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return _REDACTED
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{host}:{port}" if port is not None else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _scrub(span: Any, *_: Any) -> None:
    """Overwrite the URL and any secret-looking captured header on an httpx client span."""
    attributes = getattr(span, "attributes", None) or {}
    for key in ("url.full", "http.url"):
        value = attributes.get(key)
        if isinstance(value, str):
            span.set_attribute(key, redact_url(value))
    for key in list(attributes):
        if key.startswith(("http.request.header.", "http.response.header.")) and any(
            word in key for word in _SECRET_HEADER_WORDS
        ):
            span.set_attribute(key, [_REDACTED])


async def _async_scrub(span: Any, *rest: Any) -> None:
    _scrub(span, *rest)


def _instrument_httpx(provider: TracerProvider) -> bool:
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    except ImportError:  # pragma: no cover - an optional dependency
        logger.info("opentelemetry-instrumentation-httpx is not installed: no HTTP client spans")
        return False
    HTTPXClientInstrumentor().instrument(
        tracer_provider=provider,
        request_hook=_scrub,
        response_hook=_scrub,
        async_request_hook=_async_scrub,
        async_response_hook=_async_scrub,
    )
    return True


def _uninstrument_httpx() -> None:
    try:
        from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    except ImportError:  # pragma: no cover
        return
    HTTPXClientInstrumentor().uninstrument()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")
