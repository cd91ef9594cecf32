"""W3C ``traceparent`` for a NodeImageSet entry: the current span's, else a fresh one."""

from __future__ import annotations

import re
import secrets

from opentelemetry import propagate

_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def current() -> str:
    """The traceparent of the current span (injected through the global propagator), or a
    new sampled trace id and span id when no span is recording (no SDK configured)."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    value = carrier.get("traceparent", "")
    if _TRACEPARENT.match(value) and not value.startswith("00-" + "0" * 32):
        return value
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"
