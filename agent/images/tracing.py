"""Tracing for the image service through the OpenTelemetry *API* only.

The SDK and exporters are configured at the edge (``agent/telemetry.py``); without them the
API's no-op tracer makes every span here free. Span names are ``<prefix>.<name>`` with a
per-module prefix (``agent.images.service.pull``); attribute keys are the constants below.
No credential or token ever becomes an attribute.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping
from typing import ParamSpec, TypeVar

from opentelemetry import trace

IMAGE_REF = "image.ref"
LAYER_DIGEST = "layer.digest"
LAYER_SIZE = "layer.size"
LAYER_MEDIA_TYPE = "layer.media_type"

Attributes = Mapping[str, str | int | float | bool]
Span = trace.Span

_P = ParamSpec("_P")
_R = TypeVar("_R")

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


def start_span(prefix: str, name: str, attributes: Attributes | None = None) -> trace.Span:
    """Start a span ``prefix.name`` under the current one, *without* making it current.

    For work that ends in another thread or call than it starts (an unpacked layer is
    committed later, by the committing thread): make it current with :func:`use` where the
    work runs, and :func:`end` it once.
    """
    return _tracer.start_span(f"{prefix}.{name}", attributes=attributes)


@contextlib.contextmanager
def use(s: trace.Span, *, end: bool = False) -> Iterator[trace.Span]:
    """Make ``s`` current in this block; an exception leaving it marks ``s`` failed.

    ``end``: end ``s`` when the block exits, however it exits.
    """
    try:
        with trace.use_span(s, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):
            yield s
    except BaseException as e:
        record_error(s, e)
        raise
    finally:
        if end:
            s.end()


def end(s: trace.Span | None, error: BaseException | None = None) -> None:
    """End ``s`` (started by :func:`start_span`), failed with ``error`` if given."""
    if s is None:
        return
    if error is not None:
        record_error(s, error)
    s.end()


def set_attributes(attributes: Attributes) -> None:
    """Set ``attributes`` on the current span (a no-op without one)."""
    trace.get_current_span().set_attributes(attributes)


def in_current_span(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """``fn`` run, in whatever thread, under the span current *now* (the caller's).

    Worker threads of a ``ThreadPoolExecutor`` do not inherit the submitter's context, so
    spans they start would begin new traces: submit ``in_current_span(fn)`` instead.
    """
    parent = trace.get_current_span()

    @functools.wraps(fn)
    def run(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with trace.use_span(parent, end_on_exit=False, record_exception=False,
                            set_status_on_exception=False):
            return fn(*args, **kwargs)

    return run

#: Prefix of the image service's spans (the pipeline and the modules it drives).
SERVICE_SPANS = "agent.images.service"
