"""``NodeImageSet.status`` writes: folded, throttled, and retried.

Progress events arrive per chunk; the :class:`StatusReporter` keeps the latest status of
every entry and writes the whole ``status`` (images, summary, heartbeat,
observedGeneration) as one merge patch of the status subresource:

- at most one write per ``interval`` while only counters move (bytes, layers);
- at once when a change is *urgent* (a phase change, an entry added or removed), still one
  write at a time, so a burst of changes costs one or two writes, never one per event;
- a failed write (409 Conflict, 5xx, network) is retried after a growing delay with the
  then-current document, so nothing is lost and nothing stale is written over newer state;
- while the object does not exist (the operator creates a node's NodeImageSet on its first
  dispatch, and the agent may not create it) writes wait until :meth:`object_exists`.

The agent owns ``status`` entirely, so a merge patch without a resourceVersion is safe: no
read-modify-write, nothing to conflict with but a (retried) API server hiccup.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from agent.kube import specs
from agent.node import reconciling

logger = logging.getLogger("agent.node")

Writer = Callable[[dict[str, Any]], Awaitable[Any]]

RETRY_INITIAL = 0.5
RETRY_MAX = 30.0
#: Seconds between write attempts while the object does not exist (no event came).
MISSING_RECHECK = 30.0


class StatusReporter:
    """Folds per-entry updates into throttled status writes (see the module docstring).

    Args:
        write: sends one ``status`` document (e.g. :meth:`kubeapi.Client.patch_status`).
        interval: least seconds between two non-urgent writes.
        clock: the loop's clock by default (so ``looptime`` tests run instantly).
    """

    def __init__(self, write: Writer, *, interval: float,
                 clock: Callable[[], float] | None = None,
                 missing: Callable[[Exception], bool] = lambda e: False) -> None:
        self._write = write
        self._is_missing = missing
        self._exists = asyncio.Event()
        self._exists.set()
        self.interval = interval
        self._clock = clock
        self._images: dict[str, specs.ImageStatus] = {}
        self._order: list[str] = []
        self._heartbeat: specs.AgentHeartbeat | None = None
        self._generation: int | None = None
        self._dirty = asyncio.Event()
        self._urgent = asyncio.Event()
        self._last_write: float | None = None
        self._lock = asyncio.Lock()
        #: writes that succeeded, and failures retried (for tests and metrics)
        self.writes = 0
        self.failures = 0

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # Updates (cheap, synchronous; callable from on_event callbacks).

    def set_image(self, status: specs.ImageStatus, *, urgent: bool = False) -> None:
        name = status["name"]
        if name not in self._images:
            urgent = True
            if name not in self._order:
                self._order.append(name)
        self._images[name] = status
        self._mark(urgent)

    def drop_image(self, name: str) -> None:
        if self._images.pop(name, None) is not None:
            self._mark(urgent=True)

    def order(self, names: Iterable[str]) -> None:
        """Show entries in this order (the spec's); others follow."""
        names = list(names)
        self._order = names + [n for n in self._order if n not in names]

    def set_heartbeat(self, heartbeat: specs.AgentHeartbeat, *, urgent: bool = False) -> None:
        self._heartbeat = heartbeat
        self._mark(urgent)

    def set_generation(self, generation: int | None) -> None:
        if generation is not None and generation != self._generation:
            self._generation = generation
            self._mark(urgent=False)

    def object_exists(self) -> None:
        """The object is there (again): write what waited for it."""
        if not self._exists.is_set():
            self._exists.set()
            self._mark(urgent=True)

    def image(self, name: str) -> specs.ImageStatus | None:
        return self._images.get(name)

    def _mark(self, urgent: bool) -> None:
        self._dirty.set()
        if urgent:
            self._urgent.set()

    # The document.

    def document(self) -> dict[str, Any]:
        """The whole ``status`` as it would be written now."""
        images = [self._images[n] for n in self._order if n in self._images]
        doc: dict[str, Any] = {"images": images, "summary": reconciling.summary(images)}
        if self._heartbeat is not None:
            doc["agent"] = dict(self._heartbeat)
        if self._generation is not None:
            doc["observedGeneration"] = self._generation
        return doc

    @property
    def pending(self) -> bool:
        """Whether changes wait to be written."""
        return self._dirty.is_set()

    # Writing.

    async def run(self) -> None:
        """Write changes until cancelled (run it as a task)."""
        retry = RETRY_INITIAL
        while True:
            await self._dirty.wait()
            if not self._exists.is_set():  # re-checked now and then, in case we missed it
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._exists.wait(), timeout=MISSING_RECHECK)
            if not self._urgent.is_set() and self._last_write is not None:
                wait = self._last_write + self.interval - self._now()
                if wait > 0:
                    try:
                        await asyncio.wait_for(self._urgent.wait(), timeout=wait)
                    except TimeoutError:
                        pass
            if await self._write_once():
                retry = RETRY_INITIAL
            else:
                await asyncio.sleep(retry)
                retry = min(retry * 2, RETRY_MAX)

    async def flush(self) -> bool:
        """Write now if anything is pending (shutdown). True when nothing is left unwritten
        (or the object does not exist, so there is nothing to write to)."""
        if not self._dirty.is_set() or not self._exists.is_set():
            return True
        return await self._write_once()

    async def _write_once(self) -> bool:
        async with self._lock:
            if not self._dirty.is_set():
                return True
            self._dirty.clear()
            self._urgent.clear()
            doc = self.document()
            self._last_write = self._now()
            try:
                await self._write(doc)
            except asyncio.CancelledError:
                self._dirty.set()
                raise
            except Exception as e:  # 409, 5xx, network: retried with the then-current state
                self._dirty.set()
                if self._is_missing(e):
                    self._exists.clear()
                    logger.debug(f"status not written, the object does not exist yet: {e}")
                    return True
                self.failures += 1
                logger.warning(f"status write failed, retrying: {e}")
                return False
            self.writes += 1
            return True
