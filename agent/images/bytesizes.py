"""Byte counts for people: ``format(34359738368)`` → ``"32.0 GiB"`` (binary units, as
Kubernetes quantities and containerd's messages use them)."""

from __future__ import annotations

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


def format(n: int) -> str:  # noqa: A001 - read as bytesizes.format
    """``512`` → ``"512 B"``, ``1536`` → ``"1.5 KiB"``; TiB is the largest unit."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover
