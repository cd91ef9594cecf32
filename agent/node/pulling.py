"""One entry's attempt series: present check, attempts with backoff, limits, the result.

:meth:`Puller.run` is called by the supervisor for an entry version and returns how the
series ended (:class:`reconciling.Outcome`); it writes the entry's status as it goes
(through the :class:`~agent.node.reporting.StatusReporter`) and posts Events:

1. ``IfNotPresent`` and the image is in the store, unpacked: Ready at once, nothing pulled;
2. otherwise attempts, each holding one of the node's pull slots (``node.max_concurrent_pulls``):
   read the entry's secret copies → a registry client with only those → ``pull`` with the
   entry's ``progressTimeout``, inside the operator's trace (``traceparent``), recorded in
   the metrics and the pull log; a pull whose remaining bytes do not fit the disk budget is
   stopped with ``DiskPressure`` before it fills the disk;
3. a temporary failure waits ``backoff`` (doubling from ``node.backoff_initial``) and tries
   again, up to ``backoffLimit`` retries; a permanent one fails at once; the whole series
   is bounded by ``timeoutSeconds`` (reason ``Timeout``).

Cancellation (entry removed or changed, shutdown) propagates into the service, which
stops its downloads cleanly: ingests stay on disk and the next pull resumes them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from agent import logs, metrics, telemetry
from agent.images import bytesizes, service
from agent.images import errors as image_errors
from agent.images.progress import events
from agent.node import collecting, credentials, errors, reconciling, reporting

logger = logging.getLogger("agent.node")
tracer = trace.get_tracer("agent.node")

EventPoster = Callable[[str, str, str], None]


@dataclasses.dataclass(frozen=True)
class PullOptions:
    """Plain settings of the attempt series."""

    node: str
    backoff_initial: float = 10.0
    backoff_max: float = 300.0


class _DiskGuard:
    """Stops a pull (``DiskPressure``) once it does not fit the disk budget: checked when its
    size is known, then again every :data:`~reconciling.BUDGET_CHECK_BYTES` it writes.

    Each check counts the blobs still to download against the free space measured now
    (which already reflects every byte written, unpacked layers included), and, for the
    store limit, the store's size when the pull began plus what the pull has written since:
    blobs downloaded and uncompressed bytes unpacked.
    """

    _PHASES = (events.Phase.DOWNLOADING, events.Phase.UNPACKING)

    def __init__(self, collector: collecting.Collector, task: asyncio.Task[Any] | None) -> None:
        self._collector = collector
        self._task = task
        self.checked = False
        self.error: image_errors.DiskPressure | None = None
        self._store_size = 0  # when the pull's size became known
        self._to_download = 0
        self._next_check = 0

    def __call__(self, event: events.ProgressEvent) -> None:
        snap = event.snapshot
        if self.error is not None or snap.phase not in self._PHASES or not snap.bytes_total:
            return
        remaining = reconciling.expected_bytes(snap)
        if not self.checked:
            self.checked = True
            self._store_size = self._collector.usage().size
            self._to_download = remaining
        written = max(self._to_download - remaining, 0) + snap.bytes_unpacked
        if written < self._next_check:
            return
        self._next_check = written + reconciling.BUDGET_CHECK_BYTES
        problem = self._collector.check(remaining, store_size=self._store_size + written)
        if problem is not None and self._task is not None:
            wrote = (f" (after writing {bytesizes.format(written)}, of which"
                     f" {bytesizes.format(snap.bytes_unpacked)} unpacked)" if written else "")
            self.error = image_errors.DiskPressure(f"{snap.reference}: {problem}{wrote}")
            self._task.cancel()


class Puller:
    """Runs attempt series; one instance serves every entry of the node."""

    def __init__(
        self,
        svc: service.ImageService,
        pool: credentials.RegistryPool,
        reporter: reporting.StatusReporter,
        collector: collecting.Collector,
        agent_metrics: metrics.AgentMetrics,
        post_event: EventPoster,
        options: PullOptions,
        *,
        max_concurrent_pulls: int = 3,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.svc = svc
        self.pool = pool
        self.reporter = reporter
        self.collector = collector
        self.metrics = agent_metrics
        self.post_event = post_event
        self.options = options
        self.slots = asyncio.Semaphore(max_concurrent_pulls)
        self.clock = clock

    async def run(self, entry: reconciling.Entry, state: reconciling.ImageState
                  ) -> reconciling.Outcome:
        """Bring ``entry`` to Ready or Failed; ``state`` carries counters across series
        (:meth:`~reconciling.ImageState.prepare` resets them for a new entry version; the
        supervisor calls it before the series starts)."""
        if state.prepare(entry, reconciling.timestamp()):
            self.reporter.set_image(state.to_status(), urgent=True)

        if entry.pull_policy != "Always" and await self._present(entry, state):
            return self._outcome(entry, ready=True)
        if state.phase not in reconciling.PULLING_PHASES:  # Ready before, gone now; Failed
            state.phase, state.completion_time = "Pending", ""
            self.reporter.set_image(state.to_status(), urgent=True)

        last: BaseException | None = None
        deadline = asyncio.timeout(entry.timeout_seconds)
        try:
            async with deadline:
                for attempt in range(1, entry.backoff_limit + 2):
                    try:
                        async with self.slots:
                            result = await self._attempt(entry, state)
                    except asyncio.CancelledError:
                        raise
                    except Exception as e:
                        last = e
                        if not errors.is_temporary(e) or attempt > entry.backoff_limit:
                            break
                        await self._back_off(entry, state, attempt, e)
                    else:
                        self._ready(entry, state, result)
                        return self._outcome(entry, ready=True)
        except TimeoutError:
            if not deadline.expired():
                raise
            detail = f"; last error: {last}" if last is not None else ""
            return self._failed(entry, state, errors.TIMEOUT, (
                f"gave up after {entry.timeout_seconds:g}s (timeoutSeconds) and"
                f" {state.attempts} attempt(s){detail}"))
        assert last is not None
        return self._failed(entry, state, errors.reason(last), _message(entry, last))

    # Steps.

    async def _present(self, entry: reconciling.Entry, state: reconciling.ImageState) -> bool:
        name = reconciling.normalise(entry.reference)
        images = await asyncio.to_thread(self.svc.list_images)
        found = next((i for i in images if i.record.name == name), None)
        needs_unpack = self.svc.backend.unpacks
        if found is None or (needs_unpack and not found.unpacked):
            return False
        record = found.record
        layers = max(len(record.blobs) - (2 if record.digest == record.manifest_digest else 3), 0)
        state.phase, state.digest = "Ready", str(record.digest)
        state.bytes_done = state.bytes_total = record.size
        state.layers_done = state.layers_total = layers
        state.completion_time = reconciling.timestamp()
        state.message = "already present on the node"
        self.reporter.set_image(state.to_status(), urgent=True)
        return True

    async def _attempt(self, entry: reconciling.Entry, state: reconciling.ImageState
                       ) -> service.PullResult:
        state.begin_attempt(reconciling.timestamp())
        state.phase, state.reason, state.message = "Resolving", "", ""
        self.reporter.set_image(state.to_status(), urgent=True)
        if state.attempts == 1:
            self.post_event("Normal", "Pulling", f"pulling {entry.reference}")
        guard = _DiskGuard(self.collector, asyncio.current_task())
        pull_log = logs.PullLogger(reference=entry.reference,
                                   fields={"node": self.options.node, "entry": entry.name,
                                           "attempt": state.attempts})

        def on_event(event: events.ProgressEvent) -> None:
            urgent = state.observe(event.snapshot, reconciling.timestamp())
            if isinstance(event, events.Stalled) and event.fatal:
                self.post_event("Warning", "PullStalled", f"{entry.reference}: {event.message}"
                                f" (attempt {state.attempts}); cancelled")
            self.reporter.set_image(state.to_status(), urgent=urgent)
            guard(event)

        labels = {reconciling.LABEL_MANAGED: reconciling.MANAGED_BY,
                  reconciling.LABEL_ENTRY: entry.name,
                  reconciling.LABEL_IMAGE: reconciling.normalise(entry.image)}
        attributes: dict[str, str | int] = {
            "image.ref": entry.reference, "k8s.node.name": self.options.node,
            "prefetcher.entry": entry.name, "prefetcher.attempt": state.attempts,
        }
        try:
            async with self.pool.registry(entry.pull_secrets) as registry:
                with telemetry.remote_parent(entry.traceparent), \
                        tracer.start_as_current_span("agent.node.pull", attributes=attributes), \
                        self.metrics.pulls.recording(entry.reference) as recorder:
                    try:
                        result = await self.svc.pull(
                            entry.reference,
                            on_event=logs.tee(on_event, recorder, pull_log),
                            progress_timeout=entry.progress_timeout,
                            labels=labels,
                            # Kept from kubelet's image GC while a prefetch wants it (the
                            # collector unpins it when none does any more).
                            pinned=True,
                            registry=registry,
                        )
                    except asyncio.CancelledError:
                        task = asyncio.current_task()
                        if guard.error is None or task is None:
                            raise
                        task.uncancel()
                        # What the stopped pull committed is unused: free it now, not at
                        # the next periodic collection.
                        await self.collector.sweep()
                        raise guard.error from None
                    recorder.observe_result(result)
        except asyncio.CancelledError:
            pull_log.finish()  # "cancelled"
            raise
        except BaseException as e:
            pull_log.finish(e)
            raise
        return result

    async def _back_off(self, entry: reconciling.Entry, state: reconciling.ImageState,
                        attempt: int, error: BaseException) -> None:
        delay = reconciling.backoff(attempt, self.options.backoff_initial,
                                    self.options.backoff_max)
        retry_after = getattr(error, "retry_after", None)
        if isinstance(retry_after, int | float) and retry_after > delay:
            delay = float(retry_after)
        state.phase, state.reason = "Pending", errors.reason(error)
        state.message = (f"attempt {attempt} of {entry.backoff_limit + 1} failed: {error};"
                         f" retrying in {delay:g}s")
        self.reporter.set_image(state.to_status(), urgent=True)
        logger.info("pull attempt failed, backing off",
                    extra={"entry": entry.name, "reference": entry.reference,
                           "reason": state.reason, "delay_seconds": delay})
        await asyncio.sleep(delay)

    def _ready(self, entry: reconciling.Entry, state: reconciling.ImageState,
               result: service.PullResult) -> None:
        state.phase, state.reason, state.announced = "Ready", "", ""
        state.digest = str(result.digest)
        state.bytes_done = state.bytes_total = result.size
        state.layers_done = state.layers_total = result.layers
        state.completion_time = reconciling.timestamp()
        state.message = (f"pulled {result.bytes_downloaded} bytes in {result.seconds:.1f}s"
                         if result.bytes_downloaded else "every blob was already present")
        self.reporter.set_image(state.to_status(), urgent=True)
        self.post_event("Normal", "Pulled", f"{entry.reference} is ready ({result.digest},"
                        f" {result.bytes_downloaded} bytes downloaded in {result.seconds:.1f}s)")

    def _failed(self, entry: reconciling.Entry, state: reconciling.ImageState, reason: str,
                message: str) -> reconciling.Outcome:
        state.phase, state.reason, state.message = "Failed", reason, message
        state.completion_time = reconciling.timestamp()
        self.reporter.set_image(state.to_status(), urgent=True)
        if state.announced != reason:  # a later series failing alike stays quiet
            state.announced = reason
            self.post_event("Warning", "Failed", f"{entry.reference}: {reason}: {message}")
        return self._outcome(entry, ready=False, reason=reason)

    def _outcome(self, entry: reconciling.Entry, *, ready: bool, reason: str = ""
                 ) -> reconciling.Outcome:
        return reconciling.Outcome(entry.key, ready, reason, self.clock())


def _message(entry: reconciling.Entry, error: BaseException) -> str:
    """The status message of a failed series: the error, and what to do about secrets."""
    text = str(error) or type(error).__name__
    if isinstance(error, image_errors.Unauthorized | image_errors.Denied):
        if entry.pull_secrets:
            text += f" (pulled with the pull secret copies {', '.join(entry.pull_secrets)})"
        else:
            text += " (pulled anonymously: add imagePullSecrets to the ImagePrefetch)"
    if not isinstance(error, image_errors.ImageError | errors.MissingPullSecret):
        logger.error("pull failed unexpectedly", exc_info=error)
    return text

