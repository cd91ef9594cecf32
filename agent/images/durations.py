"""Go-style durations: parse ``"5m"``, ``"1m30s"``, ``"250ms"``, ``"0"``; format as Go does.

containerd's settings and messages use Go's ``time.Duration`` text form (``no progress in
5m0s``); operators read these every day, so this service speaks the same form.
"""

from __future__ import annotations

import re

_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def parse(text: str | int | float) -> float:
    """Return the duration in seconds.

    Accepts Go's form (``"1h2m3.5s"``, ``"300ms"``), a bare ``"0"``, or a number of seconds
    (an int or float, or a numeric string). Negative durations are rejected.

    Raises:
        ValueError: naming the text and the accepted form.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}: expected e.g. '5m', '1m30s', '0'")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        return float(text)
    s = text.strip()
    if s in ("0", ""):
        if s == "":
            raise ValueError("invalid duration '': expected e.g. '5m', '1m30s', '0'")
        return 0.0
    try:
        value = float(s)
    except ValueError:
        pass
    else:
        if value < 0:
            raise ValueError(f"invalid duration {text!r}: must not be negative")
        return value
    if s.startswith("-"):
        raise ValueError(f"invalid duration {text!r}: must not be negative")
    pos = 0
    total = 0.0
    s = s.lstrip("+")
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(s) or pos == 0:
        raise ValueError(
            f"invalid duration {text!r}: expected a number with units ns, us, ms, s, m, h "
            "(e.g. '5m', '1m30s', '250ms') or '0'"
        )
    return total


def format(seconds: float) -> str:  # noqa: A001 - the Go name, on purpose
    """Format seconds as Go's ``time.Duration.String()`` does: ``300`` → ``"5m0s"``."""
    if seconds == 0:
        return "0s"
    neg = seconds < 0
    ns = round(abs(seconds) * 1e9)
    sign = "-" if neg else ""
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_trim(ns / 1e3)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_trim(ns / 1e6)}ms"
    hours, rem = divmod(ns, 3600 * 10**9)
    minutes, rem = divmod(rem, 60 * 10**9)
    secs = rem / 1e9
    out = sign
    if hours:
        out += f"{hours}h"
    if hours or minutes:
        out += f"{minutes}m"
    return out + f"{_trim(secs)}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"
