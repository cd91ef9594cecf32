"""One entry's attempt series: backoff, backoffLimit, timeoutSeconds, permanent errors,
present images and the disk budget, against a fake image service on fake loop time."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest

from agent import metrics
from agent.images import backends, digests, errors, records, service
from agent.images.progress import events
from agent.node import collecting, credentials, pulling, reconciling, reporting

DIGEST = digests.Digest("sha256:" + "a" * 64)
Behaviour = Callable[[Callable[[events.ProgressEvent], None] | None], Any]


def result(reference: str) -> service.PullResult:
    return service.PullResult(
        reference=reference, digest=DIGEST, media_type="", manifest_digest=DIGEST,
        config_digest=DIGEST, platform="linux/amd64", layers=2, size=1000,
        bytes_downloaded=1000, chain_id="c", seconds=1.0, stalls=0, stall_cancellations=0,
        retries=0)


class FakeService:
    """``pull`` runs the next behaviour: an exception to raise, or an async callable."""

    backend = backends.LocalBackend(mock.Mock())  # unpacks: "present" needs a snapshot

    def __init__(self, *behaviours: Any, present: list[service.ImageStatus] | None = None):
        self.behaviours = list(behaviours)
        self.present = present or []
        self.pulls: list[dict[str, Any]] = []

    def list_images(self) -> list[service.ImageStatus]:
        return self.present

    async def pull(self, reference: str, **kwargs: Any) -> service.PullResult:
        self.pulls.append({"reference": reference, **kwargs})
        behaviour = self.behaviours.pop(0) if self.behaviours else None
        if isinstance(behaviour, BaseException):
            raise behaviour
        if behaviour is not None:
            await behaviour(kwargs.get("on_event"))
        return result(reference)


class FakeCollector:
    """A budget that reports ``problem``, or a store limit of ``max_store`` bytes."""

    def __init__(self, problem: str | None = None, *, size: int = 0,
                 max_store: int | None = None) -> None:
        self.problem = problem
        self.size = size
        self.max_store = max_store
        self.checks: list[tuple[int, int | None]] = []
        self.sweeps = 0

    def usage(self) -> collecting.StoreUsage:
        return collecting.StoreUsage(capacity=10**15, free=10**14, size=self.size)

    def check(self, expected: int, *, store_size: int | None = None) -> str | None:
        self.checks.append((expected, store_size))
        size = self.size if store_size is None else store_size
        if self.max_store is not None and size + expected > self.max_store:
            return f"the store would hold {size + expected} bytes"
        return self.problem

    async def sweep(self) -> None:
        self.sweeps += 1


@dataclasses.dataclass
class Setup:
    svc: FakeService
    puller: pulling.Puller
    reporter: reporting.StatusReporter
    events: list[tuple[str, str, str]]


def setup(svc: FakeService, collector: FakeCollector | None = None) -> Setup:
    async def write(_: dict[str, Any]) -> None:
        return None

    async def no_secret(_: str) -> None:
        return None

    posted: list[tuple[str, str, str]] = []
    reporter = reporting.StatusReporter(write, interval=2.0)
    puller = pulling.Puller(
        svc, credentials.RegistryPool(no_secret, lambda k: None, "ns"),  # type: ignore[arg-type,return-value]
        reporter, collector or FakeCollector(), metrics.AgentMetrics(),  # type: ignore[arg-type]
        lambda *e: posted.append(e), pulling.PullOptions("node-a", 10.0, 300.0))
    return Setup(svc, puller, reporter, posted)


def entry(**fields: Any) -> reconciling.Entry:
    return reconciling.parse_entry({"name": "app", "image": "reg.test/app:1", **fields})


async def run(s: Setup, e: reconciling.Entry) -> tuple[reconciling.Outcome,
                                                       reconciling.ImageState]:
    state = reconciling.ImageState(e.name)
    outcome = await s.puller.run(e, state)
    return outcome, state


@pytest.mark.looptime
async def test_temporary_errors_are_retried_with_doubling_backoff(looptime: float) -> None:
    s = setup(FakeService(errors.Unavailable("503"), errors.PullStalled("no progress in 2s")))
    outcome, state = await run(s, entry())
    assert outcome.ready and state.phase == "Ready" and state.attempts == 3
    assert looptime == 10 + 20
    assert state.digest == str(DIGEST)
    assert ("Normal", "Pulled") in [(t, r) for t, r, _ in s.events]


@pytest.mark.looptime
async def test_the_backoff_limit_ends_the_series_as_failed(looptime: float) -> None:
    s = setup(FakeService(*[errors.Unavailable("503")] * 5))
    outcome, state = await run(s, entry(backoffLimit=2))
    assert not outcome.ready and outcome.reason == "Unavailable"
    assert (state.phase, state.reason, state.attempts) == ("Failed", "Unavailable", 3)
    assert looptime == 10 + 20
    assert [r for t, r, _ in s.events if t == "Warning"] == ["Failed"]


@pytest.mark.looptime
async def test_a_permanent_error_fails_at_once(looptime: float) -> None:
    s = setup(FakeService(errors.Unauthorized("401", status=401)))
    outcome, state = await run(s, entry())
    assert (state.phase, state.reason, state.attempts) == ("Failed", "Unauthorized", 1)
    assert "pulled anonymously" in state.message
    assert looptime == 0


@pytest.mark.looptime
async def test_timeout_seconds_bounds_the_whole_series(looptime: float) -> None:
    async def hang(_: Any) -> None:
        await asyncio.sleep(3600)

    s = setup(FakeService(hang))
    outcome, state = await run(s, entry(timeoutSeconds=60))
    assert (state.phase, state.reason) == ("Failed", "Timeout")
    assert "60s (timeoutSeconds)" in state.message
    assert looptime == 60


async def test_a_present_image_is_ready_without_a_pull() -> None:
    record = records.ImageRecord(
        name="reg.test/app:1", digest=DIGEST, media_type="", size=1234,
        manifest_digest=DIGEST, config_digest=DIGEST, platform="linux/amd64", chain_id="c",
        blobs=(DIGEST, DIGEST, DIGEST, DIGEST))
    s = setup(FakeService(present=[service.ImageStatus(record, True)]))
    outcome, state = await run(s, entry())
    assert outcome.ready and s.svc.pulls == []
    assert (state.bytes_done, state.layers_total) == (1234, 2)
    s_always = setup(FakeService(present=[service.ImageStatus(record, True)]))
    await run(s_always, entry(pullPolicy="Always"))
    assert len(s_always.svc.pulls) == 1


async def test_the_pull_gets_the_entry_limits_labels_and_trace() -> None:
    s = setup(FakeService())
    await run(s, entry(progressTimeout="2s", pinned=True,
                       traceparent="00-" + "1" * 32 + "-" + "2" * 16 + "-01"))
    pull = s.svc.pulls[0]
    assert pull["progress_timeout"] == 2.0 and pull["pinned"] is True
    assert pull["labels"][reconciling.LABEL_MANAGED] == reconciling.MANAGED_BY
    assert pull["registry"] is None  # no pull secrets: the anonymous client


@pytest.mark.looptime
async def test_a_pull_that_does_not_fit_the_disk_stops_with_disk_pressure() -> None:
    async def download(on_event: Callable[[events.ProgressEvent], None]) -> None:
        snap = events.ProgressSnapshot(phase=events.Phase.DOWNLOADING, bytes_total=10**12)
        on_event(events.PhaseChanged(snapshot=snap, phase=events.Phase.DOWNLOADING))
        await asyncio.sleep(3600)

    s = setup(FakeService(download), FakeCollector("needs about 3 TiB"))
    outcome, state = await run(s, entry(backoffLimit=0))
    assert (state.phase, state.reason) == ("Failed", "DiskPressure")
    assert "needs about 3 TiB" in state.message


@pytest.mark.looptime
async def test_a_pull_is_stopped_once_what_it_unpacks_outgrows_the_budget() -> None:
    MiB = 1 << 20
    layer = DIGEST

    async def unpack_a_bomb(on_event: Callable[[events.ProgressEvent], None]) -> None:
        # 1 MiB of compressed blobs, which a compressed-size estimate lets through.
        snap = events.ProgressSnapshot(reference="reg.test/app:1", bytes_total=MiB,
                                       phase=events.Phase.DOWNLOADING)
        on_event(events.PhaseChanged(snapshot=snap, phase=events.Phase.DOWNLOADING))
        snap = dataclasses.replace(snap, bytes_done=MiB, phase=events.Phase.UNPACKING)
        on_event(events.PhaseChanged(snapshot=snap, phase=events.Phase.UNPACKING))
        for written in range(0, 10_000 * MiB, 16 * MiB):
            snap = dataclasses.replace(snap, bytes_unpacked=written)
            on_event(events.UnpackProgress(snapshot=snap, digest=layer, written=written))
            await asyncio.sleep(0.01)

    collector = FakeCollector(size=100 * MiB, max_store=1024 * MiB)
    s = setup(FakeService(unpack_a_bomb), collector)
    outcome, state = await run(s, entry(backoffLimit=0))

    assert (state.phase, state.reason) == ("Failed", "DiskPressure")
    assert "(after writing 961.0 MiB, of which 960.0 MiB unpacked)" in state.message
    # Checked as it wrote, every 64 MiB: stopped within that of the limit.
    last_expected, last_size = collector.checks[-1]
    assert last_size is not None and 1024 * MiB < last_size <= (1024 + 64) * MiB
    assert collector.sweeps == 1  # what it committed is collected at once


async def test_a_missing_pull_secret_copy_is_reported_by_name() -> None:
    s = setup(FakeService())
    outcome, state = await run(s, entry(pullSecrets=["ipf-1-regcred"], backoffLimit=0))
    assert (state.phase, state.reason) == ("Failed", "PullSecretNotFound")
    assert "ns/ipf-1-regcred" in state.message
