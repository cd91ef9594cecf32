"""Garbage collection and the disk budget of the node's store.

An image record the agent wrote (label ``prefetcher.dev/managed-by=node-agent``) is garbage
once no spec entry wants its reference and ``images.pinned_images`` does not name it; the
collector removes such records and then lets :meth:`ImageService.gc` delete the blobs and
snapshots nothing reaches any more (in-flight pulls are leased by the service). Records
other tools wrote into the same root (``prefetcher pull``) are left alone.

Pinned references match record names after normalisation; a pinned ``name@digest`` also
matches any record of that digest. The disk budget (:class:`reconciling.Budget`) is checked
before a pull grows the store and as it writes (:meth:`Collector.check`); the store
statistics it needs (size, free space, capacity) are measured every ``stats_collect_period``
and feed the metrics and the heartbeat too. The store's size for the budget is its blobs,
its partial downloads and its committed snapshots' disk usage (the uncompressed layers;
measured once per snapshot, as a committed snapshot never changes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Iterable

from agent import metrics
from agent.images import errors as image_errors
from agent.images import references, service, snapshots
from agent.node import reconciling

logger = logging.getLogger("agent.node")


@dataclasses.dataclass(frozen=True)
class StoreUsage:
    """The store's filesystem and size, as the heartbeat and the budget see them."""

    capacity: int = 0
    free: int = 0
    size: int = 0


class Collector:
    """Removes unclaimed images and checks the disk budget for one :class:`ImageService`."""

    def __init__(self, svc: service.ImageService, budget: reconciling.Budget,
                 pinned: Iterable[str] = ()) -> None:
        self.svc = svc
        self.budget = budget
        self.pinned = {reconciling.normalise(p) for p in pinned}
        self._pinned_digests = {str(r.digest) for r in _parse_all(pinned) if r.digest}
        self.stats: metrics.StoreStats | None = None
        #: disk usage of the committed snapshots, by name, as last measured
        self._unpacked: dict[str, int] = {}
        self._lock = asyncio.Lock()
        self.collections = 0

    # Usage.

    def usage(self) -> StoreUsage:
        """Capacity and free space now (statvfs), store size as last measured."""
        st = os.statvfs(self.svc.root)
        size = self.stats.size_bytes if self.stats is not None else 0
        return StoreUsage(capacity=st.f_blocks * st.f_frsize, free=st.f_bavail * st.f_frsize,
                          size=size + sum(self._unpacked.values()))

    async def measure(self) -> metrics.StoreStats:
        """Walk the store (in a thread) and keep the result for metrics and the budget."""
        self.stats = await asyncio.to_thread(metrics.measure_store, self.svc)
        self._unpacked = await asyncio.to_thread(self._measure_snapshots)
        return self.stats

    def _measure_snapshots(self) -> dict[str, int]:
        """Disk usage of each committed snapshot (blocking; new ones only are walked)."""
        snapshotter = self.svc.snapshotter
        if snapshotter is None:
            return {}
        sizes: dict[str, int] = {}
        for info in snapshotter.walk():
            if info.kind is not snapshots.Kind.COMMITTED:
                continue  # a pull in progress counts what it writes itself
            size = self._unpacked.get(info.name)
            if size is None:
                try:
                    size = snapshotter.usage(info.name).size
                except image_errors.NotFound:
                    continue
            sizes[info.name] = size
        return sizes

    def check(self, expected: int, *, store_size: int | None = None) -> str | None:
        """None when ``expected`` more bytes fit the budget; else why not. ``store_size``
        replaces the last measured size (a pull counts what it wrote since)."""
        u = self.usage()
        size = u.size if store_size is None else store_size
        return self.budget.check(expected, capacity=u.capacity, free=u.free, store_size=size)

    # Collection.

    def garbage(self, wanted: Iterable[str]) -> list[str]:
        """Record names to remove while the entries want the references ``wanted``."""
        records = [(r.name, r.labels) for r in self.svc.records
                   if str(r.digest) not in self._pinned_digests]
        keep = {reconciling.normalise(w) for w in wanted}
        return reconciling.garbage(records, keep, self.pinned)

    async def collect(self, wanted: Iterable[str]) -> list[str]:
        """Remove garbage records, then unreachable blobs and snapshots. Returns the
        removed record names. Never raises for a busy store (logged, tried next time)."""
        async with self._lock:
            names = await asyncio.to_thread(self.garbage, list(wanted))
            removed: list[str] = []
            for name in names:
                try:
                    await self.svc.forget(name)  # unpins it in the runtime, if any
                    removed.append(name)
                except image_errors.NotFound:
                    continue
                except image_errors.ImageError as e:
                    # The record stays (the image is still ours), so the next collection
                    # tries again; the others go on.
                    logger.warning(f"could not release {name}; kept, retried at the next"
                                   f" collection: {e}")
            try:
                result = await self.svc.gc()
            except image_errors.Unavailable as e:
                logger.warning(f"garbage collection skipped: {e}")
                return removed
            self.collections += 1
            if removed or result.blobs:
                logger.info("garbage collected", extra={"images": removed, **result.to_json()})
            await self.measure()
            return removed


    async def sweep(self) -> None:
        """Remove the blobs and snapshots no record and no pull in flight needs (what a pull
        stopped for the disk budget committed), then measure again. Never raises for a busy
        store."""
        async with self._lock:
            try:
                result = await self.svc.gc()
            except image_errors.Unavailable as e:
                logger.warning(f"garbage collection skipped: {e}")
                return
            if result.blobs or result.snapshots:
                logger.info("garbage collected", extra=result.to_json())
            await self.measure()


def _parse_all(refs: Iterable[str]) -> list[references.Reference]:
    out = []
    for text in refs:
        try:
            out.append(references.parse(text))
        except image_errors.ImageError:
            logger.warning(f"images.pinned_images: {text!r} is not a valid reference; ignored")
    return out
