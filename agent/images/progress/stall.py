"""Stall detection, in two layers (STYLE guideline 10).

**Per pull** — :class:`StallWatchdog`, containerd's ``pullProgressReporter.start`` with its
fixes. It wakes every ``min(10s, timeout/2)`` (no minimum floor: a floor larger than
``timeout/2`` let a just-started request be judged on a stale timestamp) and reads two
numbers: active requests and total bytes read. The no-progress clock resets

* when bytes advanced since the last tick,
* when no request is active (waiting on a lock, unpacking, committing is not a stall — a
  request stops being active when its body hits EOF, not after its commit),
* on an idle→active transition (a request that just started gets a full timeout).

When requests are active and no byte arrived for ``timeout`` (measured from the last
reset), it calls the injected ``cancel`` with :class:`~agent.images.errors.PullStalled`
(``no progress in 5m0s``, the configured duration in Go's form) and reports a fatal stall
through the tracker. A new request alone does *not* reset the clock while others are
active, so a pull stuck retrying requests that never deliver a byte is still cancelled.

Optionally (``min_bytes_per_second`` > 0) a drip is a stall too: if requests stayed active
for a full ``timeout`` window and fewer than ``min_bytes_per_second * timeout`` bytes arrived
in it, the pull is cancelled. Any single byte resets the byte check, so this is the only
thing that catches a trickle; it is off by default and must be asked for.

**Per request** — the registry client's job, with the policy from here:
:func:`request_read_timeout` is how long one body may stay silent before that request is
aborted and resumed by ``Range`` (while other blobs keep flowing), and :class:`RetryPolicy`
says how long to back off and how many such stalls one blob may have before the pull fails.

All timing is on the event loop's clock, so tests run on fake loop time.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import random
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

from agent.images import digests, durations, errors

#: containerd's default ``image_pull_progress_timeout``: 5 minutes.
DEFAULT_STALL_TIMEOUT = 300.0

#: The watchdog never wakes less often than this (containerd's report interval).
MAX_CHECK_INTERVAL = 10.0

#: The per-request silence limit never exceeds this: a healthy registry does not leave a
#: blob body silent for a minute, and a resume by Range is cheap.
MAX_REQUEST_READ_TIMEOUT = 60.0

#: How many per-request stalls one blob may have (each resumed by Range) before the pull
#: is cancelled as stalled.
DEFAULT_MAX_REQUEST_STALLS = 3

# Loop-time arithmetic on floats: treat times this close as equal.
_EPSILON = 1e-6


class PullActivity(Protocol):
    """What the watchdog watches; :class:`~agent.images.progress.tracker.PullProgress`
    is one. ``active_requests`` and ``total_bytes_read`` are read once per tick;
    ``stalled`` is called once, when the watchdog cancels the pull."""

    @property
    def active_requests(self) -> int: ...

    @property
    def total_bytes_read(self) -> int: ...

    def stalled(self, digest: digests.Digest | None, message: str, *, fatal: bool) -> None: ...


def check_interval(timeout: float) -> float:
    """How often the watchdog wakes: ``min(10s, timeout/2)``, with no minimum floor."""
    return min(MAX_CHECK_INTERVAL, timeout / 2)


class StallWatchdog:
    """Cancels a pull that made no byte progress for ``timeout`` seconds while requests
    were active (see the module docstring for the exact rules).

    Args:
        progress: the pull's counters, usually its ``PullProgress``.
        timeout: seconds without progress before cancelling; ``0`` disables the watchdog
            (it never cancels and starts no task).
        cancel: called once, with the :class:`~agent.images.errors.PullStalled` to raise,
            e.g. a function that cancels the pull task or sets a future's exception.
        min_bytes_per_second: if > 0, also cancel when, with requests active throughout a
            full ``timeout`` window, fewer than ``min_bytes_per_second * timeout`` bytes
            arrived in it.

    Use as ``async with StallWatchdog(...):`` around the pull, or call :meth:`start` and
    ``await`` :meth:`stop`. The first observation is taken at start; ticks follow at
    :attr:`interval` on loop time, without drift. A stuck request that is active from the
    start is cancelled at the first tick at or after ``timeout`` (exactly ``timeout`` when
    ``timeout`` is a multiple of the interval, which ``timeout < 20 s`` always is); a request
    that starts later gets between ``timeout`` and ``timeout + interval``.
    """

    def __init__(
        self,
        progress: PullActivity,
        timeout: float,
        cancel: Callable[[errors.PullStalled], None],
        *,
        min_bytes_per_second: float = 0.0,
    ) -> None:
        if timeout < 0:
            raise ValueError(f"stall timeout must not be negative, got {timeout!r}")
        if min_bytes_per_second < 0:
            raise ValueError(
                f"min_bytes_per_second must not be negative, got {min_bytes_per_second!r}"
            )
        self.progress = progress
        self.timeout = float(timeout)
        self.min_bytes_per_second = float(min_bytes_per_second)
        self._cancel = cancel
        self._task: asyncio.Task[None] | None = None
        #: The error the watchdog cancelled the pull with, once it has.
        self.fired: errors.PullStalled | None = None
        # Tick state.
        self._last_bytes = 0
        self._started = 0.0
        self._last_seen = 0.0
        self._prev_active = 0
        self._window: collections.deque[tuple[float, int]] = collections.deque()

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    @property
    def interval(self) -> float:
        """Seconds between ticks: ``min(10, timeout/2)``; 0 when disabled."""
        return check_interval(self.timeout) if self.enabled else 0.0

    # -- lifecycle

    def start(self) -> None:
        """Take the first observation and start ticking (needs a running loop).

        Does nothing when disabled or already started.
        """
        if not self.enabled or self._task is not None:
            return
        loop = asyncio.get_running_loop()
        self._observe_start(loop.time())
        self._task = loop.create_task(self._run(loop), name="stall-watchdog")

    async def stop(self) -> None:
        """Stop ticking. Re-raises an error the ``cancel`` callback raised, if any."""
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        await asyncio.wait([task])
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]

    async def __aenter__(self) -> StallWatchdog:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- ticking

    async def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        interval = self.interval
        started = self._started
        ticks = 0
        while True:
            ticks += 1
            await asyncio.sleep(max(0.0, started + ticks * interval - loop.time()))
            error = self.check(loop.time())
            if error is not None:
                self._fire(error)
                return

    def _observe_start(self, now: float) -> None:
        active = self.progress.active_requests
        self._started = now
        self._last_bytes = self.progress.total_bytes_read
        self._last_seen = now
        self._prev_active = active
        self._window.clear()
        if active:
            self._window.append((now, self._last_bytes))

    def check(self, now: float) -> errors.PullStalled | None:
        """One tick at loop time ``now``: update the state, return the error if stalled.

        Public so the rules can be exercised without a loop; :meth:`start` calls it.
        """
        active = self.progress.active_requests
        total = self.progress.total_bytes_read
        idle = active <= 0
        just_started = not idle and self._prev_active <= 0
        self._prev_active = active

        if idle or just_started:
            self._window.clear()
        if not idle:
            self._window.append((now, total))

        if idle or just_started or total > self._last_bytes:
            self._last_bytes = total
            self._last_seen = now
        elif now - self._last_seen >= self.timeout - _EPSILON:
            return errors.PullStalled(f"no progress in {durations.format(self.timeout)}")

        if self.min_bytes_per_second > 0 and not idle:
            return self._check_rate(now, total)
        return None

    def _check_rate(self, now: float, total: int) -> errors.PullStalled | None:
        window = self._window
        horizon = now - self.timeout + _EPSILON
        # Keep the newest sample that is at least a full timeout old as the window's start.
        while len(window) >= 2 and window[1][0] <= horizon:
            window.popleft()
        since, bytes_then = window[0]
        if since > horizon:
            return None  # not active for a full window yet
        got = total - bytes_then
        wanted = self.min_bytes_per_second * self.timeout
        if got < wanted:
            return errors.PullStalled(
                f"too little progress in {durations.format(self.timeout)}: {got} bytes, "
                f"below the minimum of {self.min_bytes_per_second:g} bytes/s"
            )
        return None

    def _fire(self, error: errors.PullStalled) -> None:
        self.fired = error
        self.progress.stalled(None, str(error), fatal=True)
        self._cancel(error)


def request_read_timeout(stall_timeout: float) -> float | None:
    """How long one request's body may stay silent before the client aborts it and
    resumes it by ``Range``: ``min(stall_timeout / 2, 60s)``; ``None`` when stall detection
    is disabled (``stall_timeout == 0``).

    Half the pull's timeout leaves the other half for the abort, the back-off and the
    resumed request's first bytes before the pull-level watchdog (which needs a full
    ``stall_timeout`` of silence) could fire; so a single hung socket is resumed rather
    than failing the pull. The consequence: a body whose gaps between chunks exceed half
    the timeout is resumed (and counted as a recovered stall), never failed for it.
    """
    if stall_timeout <= 0:
        return None
    return min(stall_timeout / 2, MAX_REQUEST_READ_TIMEOUT)


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Back-off and limits for retrying one request (a stalled body, a 5xx, a reset).

    Attributes:
        max_request_stalls: stalls one blob may have, each resumed by Range; the next one
            fails the pull with :class:`~agent.images.errors.PullStalled`.
        base: the first back-off, in seconds; doubles per attempt.
        cap: the longest back-off, in seconds.
        jitter: the fraction of each back-off that is random (0..1): the delay is drawn
            from ``[d * (1 - jitter), d]`` so concurrent retries do not align.
        read_timeout: the per-request silence limit (:func:`request_read_timeout`), or
            ``None`` for none.
    """

    max_request_stalls: int = DEFAULT_MAX_REQUEST_STALLS
    base: float = 0.5
    cap: float = 10.0
    jitter: float = 0.5
    read_timeout: float | None = dataclasses.field(
        default_factory=lambda: request_read_timeout(DEFAULT_STALL_TIMEOUT)
    )

    @classmethod
    def for_stall_timeout(
        cls, stall_timeout: float, *, max_request_stalls: int = DEFAULT_MAX_REQUEST_STALLS
    ) -> RetryPolicy:
        """The policy matching a pull's stall timeout: its ``read_timeout``, and back-offs
        capped at a quarter of the timeout so a resumed request starts well inside the
        slack :func:`request_read_timeout` leaves."""
        if stall_timeout <= 0:
            return cls(max_request_stalls=max_request_stalls, read_timeout=None)
        cap = min(cls.cap, stall_timeout / 4)
        return cls(
            max_request_stalls=max_request_stalls,
            base=min(cls.base, cap),
            cap=cap,
            read_timeout=request_read_timeout(stall_timeout),
        )

    def backoff(self, attempt: int, *, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``attempt`` (1 for the first retry):
        ``min(cap, base * 2**(attempt-1))``, less up to ``jitter`` of it at random."""
        exponent = min(max(attempt, 1) - 1, 62)
        delay = min(self.cap, self.base * (2.0**exponent))
        return delay * (1.0 - self.jitter * rand())
