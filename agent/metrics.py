"""Prometheus metrics of the node agent and the operator (``prometheus-client``).

Each process keeps its metrics in its own :class:`CollectorRegistry` (not the library's
global one, so tests and embedded uses never collide) and serves it with :func:`serve` on
``runtime.metrics_address``. Names follow the Prometheus conventions (``prefetcher_`` prefix,
``_total`` counters, ``_seconds`` and ``_bytes`` units) and labels are low-cardinality
enums: never an image reference, digest or node name.

The agent records each pull through a :class:`PullRecorder`::

    metrics = AgentMetrics()
    metrics.register_store(lambda: latest_stats)        # refreshed every stats period
    server = serve(settings.runtime.metrics_address, metrics.registry)
    ...
    with metrics.pulls.recording() as recorder:         # in-flight while inside
        result = await svc.pull(ref, on_event=tee(reporter, recorder))
        recorder.observe_result(result)                 # an exception: observe_error()

Agent metrics: ``prefetcher_pulls_total{result,reason}``, ``prefetcher_pull_bytes_total``,
``prefetcher_pull_retries_total``, ``prefetcher_pull_stalls_total``,
``prefetcher_pull_stall_cancellations_total``, ``prefetcher_pull_duration_seconds{result}``,
``prefetcher_unpack_duration_seconds``, ``prefetcher_pulls_in_flight``,
``prefetcher_store_size_bytes``, ``prefetcher_store_free_bytes``, ``prefetcher_store_blobs``,
``prefetcher_store_snapshots``, ``prefetcher_store_images``, ``prefetcher_build_info``.

Operator metrics: ``prefetcher_operator_prefetches{phase}``,
``prefetcher_operator_nodes{state}``, ``prefetcher_operator_reconcile_duration_seconds
{result}``, ``prefetcher_operator_api_errors_total{verb,code}``,
``prefetcher_operator_dispatches_total``, ``prefetcher_build_info``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

import agent
from agent.images.progress import events
from agent.logs import PullTally, tee

if TYPE_CHECKING:
    from agent.images import service

__all__ = [
    "DURATION_BUCKETS",
    "AgentMetrics",
    "MetricsServer",
    "OperatorMetrics",
    "PullMetrics",
    "PullRecorder",
    "PullTally",
    "StoreStats",
    "failure_reason",
    "measure_store",
    "serve",
    "tee",
]

logger = logging.getLogger("agent.metrics")

#: Seconds: pulls take from a fraction of a second (all present) to an hour (huge images).
DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 3600)
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

SUCCESS = "success"
FAILURE = "failure"
#: Result of a pull stopped by its caller (entry changed or removed, shutdown): not a failure.
CANCELLED_RESULT = "cancelled"
#: Success reasons: something was downloaded, or everything was already on the node.
PULLED = "Pulled"
ALREADY_PRESENT = "AlreadyPresent"
#: Failure reasons besides an ImageError's own ``reason``.
CANCELLED = "Cancelled"
INTERNAL = "Internal"


def failure_reason(error: BaseException) -> str:
    """A low-cardinality reason for a failed pull: the ImageError's ``reason`` (``NotFound``,
    ``PullStalled``, ``Unauthorized``…), ``Cancelled``, or ``Internal`` for anything else."""
    if isinstance(error, asyncio.CancelledError):
        return CANCELLED
    reason = getattr(error, "reason", None)
    if isinstance(reason, str) and reason.isidentifier() and len(reason) <= 40:
        return reason
    return INTERNAL


class PullMetrics:
    """The pull metrics of one registry; record each pull through :meth:`recording`."""

    def __init__(self, registry: CollectorRegistry):
        self.pulls = Counter(
            "prefetcher_pulls", "Image pulls finished, by result (success|failure|cancelled:"
            " stopped by a spec change, a delete or shutdown, not a failure) and reason"
            " (Pulled, AlreadyPresent, Cancelled, or the failure's reason such as PullStalled).",
            ["result", "reason"], registry=registry,
        )
        self.bytes = Counter(
            "prefetcher_pull_bytes", "Blob bytes downloaded from registries (failed pulls"
            " included).", registry=registry,
        )
        self.retries = Counter(
            "prefetcher_pull_retries", "Registry requests retried during pulls (any cause).",
            registry=registry,
        )
        self.stalls = Counter(
            "prefetcher_pull_stalls", "Hung requests aborted and resumed (recovered stalls).",
            registry=registry,
        )
        self.stall_cancellations = Counter(
            "prefetcher_pull_stall_cancellations", "Pulls cancelled for making no progress.",
            registry=registry,
        )
        self.duration = Histogram(
            "prefetcher_pull_duration_seconds", "Duration of finished pulls, by result.",
            ["result"], buckets=DURATION_BUCKETS, registry=registry,
        )
        self.unpack_duration = Histogram(
            "prefetcher_unpack_duration_seconds", "Unpack window of successful pulls that"
            " unpacked: first blob committed to last layer unpacked (overlaps downloading).",
            buckets=DURATION_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "prefetcher_pulls_in_flight", "Pulls in progress.", registry=registry,
        )
        # Pre-create the usual series so rate() works from the first scrape.
        self.pulls.labels(SUCCESS, PULLED)
        self.pulls.labels(SUCCESS, ALREADY_PRESENT)
        self.duration.labels(SUCCESS)
        self.duration.labels(FAILURE)

    def start(self, reference: str = "") -> PullRecorder:
        """A recorder for one pull starting now (counted in flight until it finishes)."""
        return PullRecorder(self, reference)

    @contextlib.contextmanager
    def recording(self, reference: str = "") -> Iterator[PullRecorder]:
        """:meth:`start`, finishing the recorder on exit: an exception is observed as the
        failure; a normal exit without :meth:`PullRecorder.observe_result` is judged from the
        final phase the events reported."""
        recorder = self.start(reference)
        try:
            yield recorder
        except BaseException as e:
            recorder.observe_error(e)
            raise
        finally:
            recorder.finish()


class PullRecorder:
    """One pull's metrics. Use it as (or inside) ``on_event``; finish with exactly one of
    :meth:`observe_result` / :meth:`observe_error` (later calls are ignored).

    Live counters (bytes, retries, stalls, stall cancellations) move as events arrive, so
    a scrape during a long pull sees them; the pull counter and histograms move at the end.
    """

    def __init__(self, metrics: PullMetrics, reference: str = ""):
        self._m = metrics
        self.tally = PullTally(reference)
        self._finished = False
        self._lock = threading.Lock()
        metrics.in_flight.inc()

    def __call__(self, event: events.ProgressEvent) -> None:
        self.observe_event(event)

    def observe_event(self, event: events.ProgressEvent) -> None:
        before = self.tally.bytes_downloaded
        self.tally(event)
        if self.tally.bytes_downloaded > before:
            self._m.bytes.inc(self.tally.bytes_downloaded - before)
        if isinstance(event, events.Retry):
            self._m.retries.inc()
            if event.stalled:
                self._m.stalls.inc()
        elif isinstance(event, events.Stalled):
            if event.fatal:
                self._m.stall_cancellations.inc()
            else:
                self._m.stalls.inc()

    def observe_result(self, result: service.PullResult, reason: str | None = None) -> None:
        """The pull succeeded. ``reason`` defaults to Pulled, or AlreadyPresent when it
        downloaded nothing."""
        if not self._claim():
            return
        if result.bytes_downloaded > self.tally.bytes_downloaded:  # events were not fed
            self._m.bytes.inc(result.bytes_downloaded - self.tally.bytes_downloaded)
        reason = reason or (PULLED if result.bytes_downloaded else ALREADY_PRESENT)
        self._m.pulls.labels(SUCCESS, reason).inc()
        self._m.duration.labels(SUCCESS).observe(result.seconds or self.tally.elapsed)
        unpack = self.tally.unpack_seconds
        if unpack is not None:
            self._m.unpack_duration.observe(unpack)

    def observe_error(self, error: BaseException, reason: str | None = None) -> None:
        """The pull failed with ``error`` (reason: :func:`failure_reason` unless given)."""
        if not self._claim():
            return
        reason = reason or failure_reason(error)
        result = CANCELLED_RESULT if reason == CANCELLED else FAILURE
        self._m.pulls.labels(result, reason).inc()
        self._m.duration.labels(result).observe(self.tally.elapsed)

    def finish(self) -> None:
        """Finish from the events alone when neither observe_* was called."""
        if self._finished:
            return
        phase = self.tally.phase
        if phase is events.Phase.READY:
            if not self._claim():  # pragma: no cover - a race with observe_*
                return
            got = self.tally.bytes_downloaded
            self._m.pulls.labels(SUCCESS, PULLED if got else ALREADY_PRESENT).inc()
            self._m.duration.labels(SUCCESS).observe(self.tally.elapsed)
            if (unpack := self.tally.unpack_seconds) is not None:
                self._m.unpack_duration.observe(unpack)
            return
        stalled = phase is events.Phase.STALLED or self.tally.snapshot.stall_cancellations
        reason = "PullStalled" if stalled else (INTERNAL if phase.final else CANCELLED)
        if self._claim():
            result = CANCELLED_RESULT if reason == CANCELLED else FAILURE
            self._m.pulls.labels(result, reason).inc()
            self._m.duration.labels(result).observe(self.tally.elapsed)

    def _claim(self) -> bool:
        with self._lock:
            if self._finished:
                return False
            self._finished = True
        self._m.in_flight.dec()
        return True


# Store usage: measured every runtime stats period by the agent, read at scrape time.


@dataclass(frozen=True)
class StoreStats:
    """Usage of the store under ``runtime.root``."""

    size_bytes: int = 0
    free_bytes: int = 0
    blobs: int = 0
    snapshots: int = 0
    images: int = 0


def measure_store(svc: service.ImageService) -> StoreStats:
    """Measure ``svc``'s store (blocking: walks the content store; run it in a thread)."""
    size = 0
    blobs = 0
    for info in svc.content.walk():
        blobs += 1
        size += info.size
    size += sum(ingest.offset for ingest in svc.content.ingests())  # partial downloads
    snapshots = 0
    if svc.snapshotter is not None:
        snapshots = sum(1 for _ in svc.snapshotter.walk())
    st = os.statvfs(svc.root)
    return StoreStats(
        size_bytes=size,
        free_bytes=st.f_bavail * st.f_frsize,
        blobs=blobs,
        snapshots=snapshots,
        images=sum(1 for _ in svc.records),
    )


class _StoreCollector(Collector):
    def __init__(self, source: Callable[[], StoreStats | None]):
        self._source = source

    def collect(self) -> Iterable[GaugeMetricFamily]:
        try:
            stats = self._source()
        except Exception:  # a scrape must not fail for it
            logger.warning("store statistics unavailable", exc_info=True)
            stats = None
        if stats is None:
            return []
        return [
            GaugeMetricFamily("prefetcher_store_size_bytes",
                              "Bytes of committed blobs and partial downloads in the content"
                              " store.",
                              value=stats.size_bytes),
            GaugeMetricFamily("prefetcher_store_free_bytes",
                              "Bytes available on the store's filesystem.",
                              value=stats.free_bytes),
            GaugeMetricFamily("prefetcher_store_blobs", "Committed blobs in the content store.",
                              value=stats.blobs),
            GaugeMetricFamily("prefetcher_store_snapshots", "Snapshots (committed and active).",
                              value=stats.snapshots),
            GaugeMetricFamily("prefetcher_store_images", "Image records in the store.",
                              value=stats.images),
        ]

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return []


def _build_info(registry: CollectorRegistry, component: str) -> None:
    info = Gauge("prefetcher_build_info", "Always 1; the running version and component.",
                 ["version", "component"], registry=registry)
    info.labels(agent.__version__, component).set(1)


class AgentMetrics:
    """The node agent's (and CLI's) metrics in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        _build_info(self.registry, "agent")
        self.pulls = PullMetrics(self.registry)
        self._store: _StoreCollector | None = None

    def register_store(self, source: Callable[[], StoreStats | None]) -> None:
        """Report ``source()`` (cheap: cached :func:`measure_store` output) at each scrape."""
        if self._store is not None:
            self.registry.unregister(self._store)
        self._store = _StoreCollector(source)
        self.registry.register(self._store)


class OperatorMetrics:
    """The operator's metrics in their own registry."""

    #: Phases of an ImagePrefetch and states of a node the gauges always report (0 if none).
    #: ``agent.kube.specs.PrefetchPhase`` and the keys of ``NodeCounts`` (less ``desired``).
    PHASES = ("Pending", "Progressing", "Complete", "Failed")
    NODE_STATES = ("pending", "pulling", "ready", "failed", "agentUnavailable")

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        _build_info(self.registry, "operator")
        self.prefetches = Gauge(
            "prefetcher_operator_prefetches", "ImagePrefetch objects by phase.", ["phase"],
            registry=self.registry,
        )
        self.nodes = Gauge(
            "prefetcher_operator_nodes", "Node/prefetch pairs by state, over all prefetches.",
            ["state"], registry=self.registry,
        )
        self.reconcile_duration = Histogram(
            "prefetcher_operator_reconcile_duration_seconds", "Duration of one reconcile of an"
            " ImagePrefetch, by result (success|error).", ["result"],
            buckets=RECONCILE_BUCKETS, registry=self.registry,
        )
        self.api_errors = Counter(
            "prefetcher_operator_api_errors", "Kubernetes API calls that failed, by verb"
            " (get|list|create|patch|delete|watch) and HTTP status code (or 'network').",
            ["verb", "code"], registry=self.registry,
        )
        self.dispatches = Counter(
            "prefetcher_operator_dispatches", "Image entries dispatched to NodeImageSets.",
            registry=self.registry,
        )
        self.set_prefetches({})
        self.set_nodes({})

    def set_prefetches(self, by_phase: Mapping[str, int]) -> None:
        """Set the prefetch counts per phase (phases not given become 0)."""
        for phase in {*self.PHASES, *by_phase}:
            self.prefetches.labels(phase).set(by_phase.get(phase, 0))

    def set_nodes(self, by_state: Mapping[str, int]) -> None:
        """Set the node counts per state (states not given become 0)."""
        for state in {*self.NODE_STATES, *by_state}:
            self.nodes.labels(state).set(by_state.get(state, 0))

    @contextlib.contextmanager
    def time_reconcile(self) -> Iterator[None]:
        """Observe the block's duration, with result ``error`` if it raises."""
        started = time.monotonic()
        result = "success"
        try:
            yield
        except BaseException:
            result = "error"
            raise
        finally:
            self.reconcile_duration.labels(result).observe(time.monotonic() - started)

    def api_error(self, verb: str, code: int | str) -> None:
        """Count a failed API call (``code``: the HTTP status, or ``"network"``)."""
        self.api_errors.labels(verb.lower(), str(code)).inc()


# Exposition.


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP server; :meth:`close` stops it."""

    host: str
    port: int
    _server: Any
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def parse_address(address: str) -> tuple[str, int] | None:
    """``":9090"`` → ``("0.0.0.0", 9090)``, ``"[::1]:9090"`` → ``("::1", 9090)``; ``""`` → None."""
    if not address:
        return None
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def serve(address: str, registry: CollectorRegistry) -> MetricsServer | None:
    """Serve ``registry`` on ``address`` (``runtime.metrics_address``: ``HOST:PORT``, port 0
    for any free one; ``""`` disables and returns ``None``) from a daemon thread."""
    parsed = parse_address(address)
    if parsed is None:
        return None
    host, port = parsed
    server, thread = start_http_server(port, host, registry=registry)
    return MetricsServer(host, int(server.server_port), server, thread)
