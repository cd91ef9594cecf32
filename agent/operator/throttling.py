"""At most one status write per interval per object, but at once on a condition change."""

from __future__ import annotations


class Throttle:
    """Remembers when each object's status was last written.

    ``delay(key, now, urgent)`` is 0 when a write may go now, else the seconds to wait;
    urgent writes (a condition changed) always go now.
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._last: dict[str, float] = {}

    def delay(self, key: str, now: float, urgent: bool = False) -> float:
        last = self._last.get(key)
        if urgent or last is None:
            return 0.0
        return max(0.0, last + self.interval - now)

    def written(self, key: str, now: float) -> None:
        self._last[key] = now

    def forget(self, key: str) -> None:
        self._last.pop(key, None)
