"""The agent's loops: reconcile entries into attempt series, heartbeat, GC, store stats.

:class:`Supervisor` is the agent's memory. The kopf handlers feed it the NodeImageSet as
watched (:meth:`Supervisor.observe`); its reconcile loop is level-triggered: on every
change and every ``node.resync_interval`` it asks :func:`reconciling.plan` which attempt
series to start (new or changed entries, Ready images that must stay present and vanished,
Failed entries due for another series) and which to cancel (entries removed or changed),
and runs each series as a task (:meth:`agent.node.pulling.Puller.run`). After a restart it
has no memory, so every entry starts a series, and an image already in the store becomes
Ready without a download.

When entries disappear, their series are cancelled (the service stops cleanly, ingests
stay resumable), their status items are dropped, and the collector removes their images.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import agent
from agent.kube import specs
from agent.node import (
    collecting,
    credentials,
    errors,
    health,
    pulling,
    reconciling,
    reporting,
)

logger = logging.getLogger("agent.node")

SHUTDOWN_FLUSH_TIMEOUT = 5.0


#: Free-space change (fraction of the store's capacity) that is worth a status write.
FREE_SPACE_STEP = 0.05


class Supervisor:
    """Starts and stops attempt series for the entries of one node's NodeImageSet."""

    def __init__(
        self,
        *,
        node: str,
        puller: pulling.Puller,
        reporter: reporting.StatusReporter,
        collector: collecting.Collector,
        pool: credentials.RegistryPool,
        probes: health.Health,
        resync_interval: float = 60.0,
        heartbeat_interval: float = 30.0,
        gc_period: float = 600.0,
        stats_period: float = 10.0,
        failed_retry_interval: float = 300.0,
        renew_lease: Callable[[], Awaitable[object]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.node = node
        self.puller = puller
        self.reporter = reporter
        self.collector = collector
        self.pool = pool
        self.probes = probes
        self.resync_interval = resync_interval
        self.heartbeat_interval = heartbeat_interval
        self.gc_period = gc_period
        self.stats_period = stats_period
        self.failed_retry_interval = failed_retry_interval
        #: Renews the node's heartbeat Lease (:class:`agent.node.heartbeating.LeaseRenewals`,
        #: which logs its own failures).
        self.renew_lease = renew_lease
        self.clock = clock
        self.wanted: dict[str, reconciling.Entry] = {}
        self.generation: int | None = None
        self.uid = ""
        self.states: dict[str, reconciling.ImageState] = {}
        self.outcomes: dict[str, reconciling.Outcome] = {}
        self._series: dict[str, tuple[tuple[Any, ...], asyncio.Task[None]]] = {}
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task[None]] = []
        self._reporter_task: asyncio.Task[None] | None = None
        self._started = False
        self._seeded = False

    # Input.

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """The watched NodeImageSet changed (``DELETED``: every entry is gone)."""
        meta = body.get("metadata") or {}
        if meta.get("name") != self.node:
            return  # the server-side field selector makes this impossible; be sure anyway
        if event_type == "DELETED":
            wanted: dict[str, reconciling.Entry] = {}
            self.uid = ""
        else:
            wanted = reconciling.parse_entries(body.get("spec"))
            self.uid = str(meta.get("uid", ""))
            self.reporter.object_exists()
        if not self._seeded and event_type != "DELETED":
            self._seed(wanted, body.get("status"))
        generation = meta.get("generation")
        if wanted != self.wanted or generation != self.generation:
            self.wanted = wanted
            self.generation = generation if isinstance(generation, int) else None
            self._wake.set()

    def _seed(self, wanted: Mapping[str, reconciling.Entry],
              status: Mapping[str, Any] | None) -> None:
        """Continue from the status a previous agent process wrote (once, at the first
        observation): statuses of entries still wanted are kept as they were, so nothing
        regresses Ready → Pending and attempts keep counting; a Failed entry is retried
        after the backoff, not at once (a DaemonSet rollout must not re-pull in lock-step)."""
        self._seeded = True
        now = self.clock()
        for raw in (status or {}).get("images") or []:
            name = str(raw.get("name", "")) if isinstance(raw, Mapping) else ""
            if name not in wanted or name in self.states:
                continue
            state = reconciling.ImageState.from_status(raw)
            self.states[name] = state
            self.reporter.set_image(state.to_status())
            entry = wanted[name]
            if state.phase in reconciling.FAILED_PHASES and state.image == entry.reference:
                state.version = entry.key
                self.outcomes[name] = reconciling.Outcome(entry.key, False, state.reason, now)

    # Lifecycle.

    async def start(self) -> None:
        """Start the loops (after the NodeImageSet was read once: GC needs the entries)."""
        self._started = True
        self._reporter_task = asyncio.create_task(self.reporter.run(), name="status-writer")
        self._loops = [
            asyncio.create_task(self._reconcile_loop(), name="reconcile"),
            asyncio.create_task(self._every(self.heartbeat_interval, self.heartbeat),
                                name="heartbeat"),
            asyncio.create_task(self._every(self.stats_period, self.collector.measure),
                                name="store-stats"),
        ]
        if self.gc_period > 0:
            self._loops.append(asyncio.create_task(
                self._every(self.gc_period, self.collect, first=self.gc_period), name="gc"))
        for task in self._loops:
            task.add_done_callback(self._loop_died)

    async def stop(self) -> None:
        """Cancel everything cleanly and write the final status (SIGTERM)."""
        self.probes.stopping = True
        for task in self._loops:
            task.remove_done_callback(self._loop_died)
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        await self._cancel(list(self._series))
        for state in self.states.values():
            if state.phase in reconciling.PULLING_PHASES:
                state.phase, state.reason = "Pending", "AgentStopped"
                state.message = "the agent stopped; the pull resumes where it was when it restarts"
                self.reporter.set_image(state.to_status(), urgent=True)
        if self._started:
            self.report_agent(force=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(SHUTDOWN_FLUSH_TIMEOUT):
                while not await self.reporter.flush():
                    await asyncio.sleep(0.2)
        if self._reporter_task is not None:
            self._reporter_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reporter_task
        await self.pool.aclose()

    def _loop_died(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.probes.broken = f"the {task.get_name()} loop died: {task.exception()}"
            logger.error(self.probes.broken, exc_info=task.exception())

    # Loops.

    async def _reconcile_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                wake_in = await self.reconcile()
            except Exception:
                logger.exception("reconcile failed; retrying")
                wake_in = 5.0
            timeout = self.resync_interval if wake_in is None else min(wake_in,
                                                                       self.resync_interval)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(timeout, 0.05))

    async def _every(self, period: float, step: Callable[[], Any], *,
                     first: float = 0.0) -> None:
        await asyncio.sleep(first)
        while True:
            try:
                result = step()
                if isinstance(result, Awaitable):
                    await result
            except Exception:
                logger.exception("periodic step failed")
            await asyncio.sleep(period)

    async def reconcile(self) -> float | None:
        """One level-triggered pass; returns when it wants to run again (or None)."""
        wanted = dict(self.wanted)
        present = await asyncio.to_thread(self._present)
        plan = reconciling.plan(
            wanted, {n: key for n, (key, _) in self._series.items()}, self.outcomes, present,
            now=self.clock(), failed_retry_interval=self.failed_retry_interval,
            hopeless=errors.HOPELESS_REASONS, permanent=errors.PERMANENT_REASONS,
        )
        await self._cancel(list(plan.cancel))
        gone = [name for name in self.states if name not in wanted]
        for name in gone:
            del self.states[name]
            self.outcomes.pop(name, None)
            self.reporter.drop_image(name)
        for name in plan.start:
            entry = wanted[name]
            state = self.states.setdefault(name, reconciling.ImageState(name))
            # Before observedGeneration moves on (below): a status written with the new
            # generation must not carry the previous version's result.
            if state.prepare(entry, reconciling.timestamp()):
                self.reporter.set_image(state.to_status(), urgent=True)
            task = asyncio.create_task(self._run_series(entry, state), name=f"pull/{name}")
            self._series[name] = (entry.key, task)
        self.reporter.order(wanted)
        self.reporter.set_generation(self.generation)
        self.pool.retain(e.pull_secrets for e in wanted.values())
        if gone:
            await self.collect()
        return plan.wake_in

    async def _run_series(self, entry: reconciling.Entry, state: reconciling.ImageState) -> None:
        try:
            outcome = await self.puller.run(entry, state)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug: report it rather than dying silently
            logger.exception(f"attempt series of {entry.name} crashed")
            state.phase, state.reason, state.message = "Failed", errors.INTERNAL, str(e)
            self.reporter.set_image(state.to_status(), urgent=True)
            outcome = reconciling.Outcome(entry.key, False, errors.INTERNAL, self.clock())
        if not outcome.ready:
            jitter = 1 + random.uniform(-reconciling.JITTER, reconciling.JITTER)
            outcome = dataclasses.replace(outcome, jitter=jitter)
        outcome = outcome.after(self.outcomes.get(entry.name))
        self.outcomes[entry.name] = outcome
        wait = reconciling.retry_in(outcome, entry, self.failed_retry_interval,
                                    errors.HOPELESS_REASONS, errors.PERMANENT_REASONS)
        if wait is not None:  # say when (the operator counts the node as still busy)
            state.next_retry_time = reconciling.timestamp(
                datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=wait))
            self.reporter.set_image(state.to_status(), urgent=True)
        current = self._series.get(entry.name)
        if current is not None and current[1] is asyncio.current_task():
            del self._series[entry.name]
        self._wake.set()

    async def _cancel(self, names: list[str]) -> None:
        tasks = [self._series.pop(n)[1] for n in names if n in self._series]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _present(self) -> set[str]:
        return {i.record.name for i in self.puller.svc.list_images() if i.unpacked}

    # Heartbeat and GC.

    async def heartbeat(self) -> None:
        """Renew the node's heartbeat Lease (the operator judges liveness by it), and
        update ``status.agent`` when what it says changed (:meth:`report_agent`)."""
        self.report_agent()
        if self.renew_lease is not None:
            await self.renew_lease()

    def report_agent(self, *, force: bool = False) -> None:
        """Set ``status.agent`` (version, store capacity and free space) when it is new,
        the version or capacity changed, or free space moved by more than
        :data:`FREE_SPACE_STEP` of the capacity: a steady agent writes no status at all
        (the heartbeat is the Lease). ``force``: set the current values anyway (shutdown)."""
        usage = self.collector.usage()
        info: specs.AgentHeartbeat = {"version": agent.__version__,
                                      "storeCapacityBytes": usage.capacity,
                                      "storeFreeBytes": usage.free,
                                      "runtime": self.puller.svc.backend.info.to_json()}
        old = self.reporter.document().get("agent")
        if old is None:
            self.reporter.set_heartbeat(info, urgent=True)
            return
        moved = abs(int(old.get("storeFreeBytes") or 0) - usage.free) \
            > FREE_SPACE_STEP * max(usage.capacity, 1)
        if force or moved or old.get("version") != info["version"] \
                or old.get("storeCapacityBytes") != info["storeCapacityBytes"] \
                or old.get("runtime") != info["runtime"]:
            self.reporter.set_heartbeat(info)

    async def collect(self) -> list[str]:
        """Remove the images no entry wants (pinned ones stay)."""
        return await self.collector.collect(e.reference for e in self.wanted.values())
