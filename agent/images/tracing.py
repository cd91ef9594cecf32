"""Tracing for the image service through the OpenTelemetry *API* only.

The SDK and exporters are configured at the edge (``agent/telemetry.py``); without them the
API's no-op tracer makes every span here free. Span names are ``<prefix>.<name>`` with a
per-module prefix (``agent.images.service.pull``); attribute keys are the constants below.
No credential or token ever becomes an attribute.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from opentelemetry import trace

IMAGE_REF = "image.ref"
LAYER_DIGEST = "layer.digest"
LAYER_SIZE = "layer.size"
LAYER_MEDIA_TYPE = "layer.media_type"

_tracer = trace.get_tracer("agent.images")


@contextlib.contextmanager
def span(
    prefix: str, name: str, attributes: Mapping[str, str | int | float | bool] | None = None
) -> Iterator[trace.Span]:
    """Start a span ``prefix.name`` as the current span."""
    with _tracer.start_as_current_span(f"{prefix}.{name}", attributes=attributes) as s:
        yield s


def record_error(s: trace.Span, error: BaseException) -> None:
    """Mark ``s`` as failed with ``error``'s type and message."""
    s.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
    s.set_attribute("error.type", type(error).__name__)
