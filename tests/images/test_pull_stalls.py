"""Stall detection end to end: the real registry behind the fault proxy, real time, short
timeouts. The watchdog's own timing is covered on fake loop time in tests/images/progress."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from fixtures import images
from fixtures.faultproxy import FaultProxy

from agent.images import descriptors, errors
from agent.images.content import local
from agent.images.progress import events
from tests.images.pulling import pull, stored_blobs

AMD64 = descriptors.Platform("linux", "amd64")


def push_one_layer(proxy: FaultProxy, repo: str, size: int, seed: int) -> images.Image:
    image = images.Image([images.random_layer(size, seed=seed)])
    images.push(proxy.upstream, repo, "1", image)
    return image


async def test_a_blob_that_stalls_once_is_resumed_and_the_pull_completes(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = push_one_layer(fault_proxy, "stall/once", 300_000, 31)
    blob = image.layers[0]
    fault_proxy.stall(f"/blobs/{blob.digest}", after=100_000, times=1)
    seen: list[events.ProgressEvent] = []

    result = await pull(
        tmp_root,
        f"{fault_proxy.host}/stall/once:1",
        platform=AMD64,
        progress_timeout=2.0,
        on_event=seen,
    )

    assert result.stalls == 1 and result.stall_cancellations == 0
    gets = fault_proxy.requests_to(f"/blobs/{blob.digest}", "GET")
    assert [g.range for g in gets] == [None, "bytes=100000-"]
    assert blob.digest in stored_blobs(tmp_root)
    retries = [e for e in seen if isinstance(e, events.Retry)]
    assert [(r.digest, r.stalled) for r in retries] == [(blob.digest, True)]


async def test_a_blob_that_keeps_stalling_cancels_the_pull_with_the_stall_reason(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = push_one_layer(fault_proxy, "stall/always", 300_000, 32)
    blob = image.layers[0]
    fault_proxy.stall(f"/blobs/{blob.digest}", after=50_000)
    seen: list[events.ProgressEvent] = []

    started = time.monotonic()
    with pytest.raises(errors.PullStalled, match=blob.digest) as caught:
        await pull(
            tmp_root,
            f"{fault_proxy.host}/stall/always:1",
            platform=AMD64,
            progress_timeout=2.0,
            on_event=seen,
        )
    elapsed = time.monotonic() - started

    assert elapsed < 10, "cancelled within a few seconds of the 2 s timeout"
    assert "stalled" in str(caught.value)
    assert seen[-1].snapshot.stall_cancellations == 1
    assert seen[-1].snapshot.phase in (events.Phase.FAILED, events.Phase.STALLED)
    gets = fault_proxy.requests_to(f"/blobs/{blob.digest}", "GET")
    # Every retry resumed where the silent one stopped (each got 50000 more bytes in).
    assert [g.range for g in gets] == [None] + [f"bytes={50_000 * i}-" for i in range(1, len(gets))]
    assert len(gets) == 4  # the first request and three resumes, then the pull gave up
    # The partial ingest stays for the next attempt; nothing was committed.
    assert blob.digest not in stored_blobs(tmp_root)


async def test_a_registry_that_hangs_before_answering_is_cancelled_by_the_watchdog(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    push_one_layer(fault_proxy, "stall/headers", 10_000, 33)
    fault_proxy.delay("/manifests/", 30)

    started = time.monotonic()
    with pytest.raises(errors.PullStalled, match="no progress in 1s"):
        await pull(tmp_root, f"{fault_proxy.host}/stall/headers:1", progress_timeout=1.0)
    assert time.monotonic() - started < 5


async def test_a_slow_but_steady_body_completes_without_a_stall(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = push_one_layer(fault_proxy, "stall/steady", 100_000, 34)
    fault_proxy.drip(f"/blobs/{image.layers[0].digest}", chunk=20_000, interval=0.4)

    result = await pull(
        tmp_root, f"{fault_proxy.host}/stall/steady:1", platform=AMD64, progress_timeout=2.0
    )

    assert result.stalls == 0 and result.retries == 0


async def test_a_slow_commit_after_the_body_ended_is_not_a_stall(
    fault_proxy: FaultProxy, tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = push_one_layer(fault_proxy, "stall/slow-commit", 100_000, 35)
    real_commit = local.LocalWriter.commit

    def slow_commit(self: local.LocalWriter, size: int, expected: str) -> object:
        time.sleep(2.5)  # an fsync under heavy I/O pressure, in the commit thread
        return real_commit(self, size, expected)  # type: ignore[arg-type]

    monkeypatch.setattr(local.LocalWriter, "commit", slow_commit)
    result = await pull(
        tmp_root,
        f"{fault_proxy.host}/stall/slow-commit:1",
        platform=AMD64,
        progress_timeout=1.0,
    )
    assert result.stall_cancellations == 0
    assert image.layers[0].digest in stored_blobs(tmp_root)


async def test_timeout_zero_never_cancels(fault_proxy: FaultProxy, tmp_root: Path) -> None:
    image = push_one_layer(fault_proxy, "stall/never", 100_000, 36)
    rule = fault_proxy.stall(f"/blobs/{image.layers[0].digest}", after=10_000, times=1)

    async def release_later() -> None:
        await asyncio.sleep(2.5)
        rule.release()  # the proxy then closes the silent connection

    releaser = asyncio.create_task(release_later())
    result = await pull(
        tmp_root, f"{fault_proxy.host}/stall/never:1", platform=AMD64, progress_timeout=0
    )
    await releaser
    assert result.stall_cancellations == 0 and result.stalls == 0
    assert result.seconds >= 2.4  # it waited for the silent socket instead of giving up


async def test_the_minimum_rate_catches_a_drip_that_the_byte_check_misses(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = push_one_layer(fault_proxy, "stall/drip", 200_000, 37)
    fault_proxy.drip(f"/blobs/{image.layers[0].digest}", chunk=1_000, interval=0.1)

    with pytest.raises(errors.PullStalled, match="too little progress"):
        await pull(
            tmp_root,
            f"{fault_proxy.host}/stall/drip:1",
            platform=AMD64,
            progress_timeout=1.0,
            min_bytes_per_second=100_000,
        )


async def test_progress_events_add_up_and_phases_arrive_in_order(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = images.Image([images.random_layer(120_000, seed=38), images.layer({"x": "y"})])
    images.push(fault_proxy.upstream, "stall/events", "1", image)
    seen: list[events.ProgressEvent] = []

    await pull(tmp_root, f"{fault_proxy.host}/stall/events:1", platform=AMD64, on_event=seen)

    phases = [e.phase for e in seen if isinstance(e, events.PhaseChanged)]
    assert phases == [
        events.Phase.RESOLVING,
        events.Phase.DOWNLOADING,
        events.Phase.COMMITTING,
        events.Phase.READY,
    ]
    final = seen[-1].snapshot
    assert final.bytes_done == final.bytes_total == sum(b.size for b in image.blobs)
    assert final.blobs_done == final.blobs_total == 3
    done = {e.digest for e in seen if isinstance(e, events.BlobDone)}
    assert done == {b.digest for b in image.blobs}
