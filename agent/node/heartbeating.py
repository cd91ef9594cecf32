"""``LeaseRenewals``: the agent's heartbeat Lease renewals, and what their failures log.

A renewal that fails (the API server unreachable, a 5xx, a policy refusing the write) is one
WARNING line naming the Lease, the reason and when the agent tries again; the traceback is
logged at DEBUG only. A Lease that stays unrenewed for longer than its duration is past the
point where the operator counts the agent as unavailable: from then on each failure is an
ERROR saying so. The first renewal that works again says, at INFO, how long it failed.
The heartbeat loop never sees the exception: the next renewal is the retry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from agent.images import durations

logger = logging.getLogger("agent.node")


class LeaseRenewals:
    """Renews through ``renew`` (:meth:`agent.kube.leases.Heartbeat.renew`) and logs its
    failures as the module doc says; ``name`` is the Lease's, ``duration`` its
    ``leaseDurationSeconds``, ``interval`` the time to the next attempt."""

    def __init__(self, renew: Callable[[], Awaitable[None]], *, name: str, duration: float,
                 interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._renew = renew
        self.name = name
        self.duration = duration
        self.interval = interval
        self.clock = clock
        #: when the last renewal worked (``None``: none yet)
        self.renewed_at: float | None = None
        #: when the first of the current run of failures happened (``None``: renewing)
        self.failing_since: float | None = None
        #: failures in the current run
        self.failures = 0

    async def renew(self) -> bool:
        """One renewal; whether it worked. Never raises (but for cancellation)."""
        try:
            await self._renew()
        except Exception as e:
            self._failed(e)
            return False
        now = self.clock()
        if self.failing_since is not None:
            since = self.failing_since if self.renewed_at is None else self.renewed_at
            logger.info(
                f"heartbeat Lease {self.name} renewed again, after"
                f" {self.failures} failed renewal(s) ({durations.format(round(now - since))}"
                " without a renewal)"
            )
        self.renewed_at, self.failing_since, self.failures = now, None, 0
        return True

    def _failed(self, error: Exception) -> None:
        now = self.clock()
        if self.failing_since is None:
            self.failing_since = now
        self.failures += 1
        failing = now - (self.failing_since if self.renewed_at is None else self.renewed_at)
        reason = str(error) or type(error).__name__
        retry = f"retrying in {durations.format(self.interval)}"
        if failing > self.duration:
            logger.error(
                f"could not renew heartbeat Lease {self.name} ({reason}); not renewed for"
                f" {durations.format(round(failing))}, longer than its duration"
                f" ({durations.format(self.duration)}): the operator counts this agent as"
                " unavailable and its prefetches on this node wait until a renewal works;"
                f" {retry}. Check the agent's access to the API server"
            )
        else:
            logger.warning(f"could not renew heartbeat Lease {self.name} ({reason}); {retry}")
        logger.debug(f"heartbeat Lease {self.name} renewal failure", exc_info=error)
