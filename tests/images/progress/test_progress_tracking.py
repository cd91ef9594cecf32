"""PullProgress: totals add up, requests stop being active at EOF, events carry snapshots."""

from __future__ import annotations

import asyncio

import pytest

from agent.images import descriptors, digests, mediatypes
from agent.images.progress import events, tracker

CHUNK = 64 * 1024


def blob(
    name: str, size: int, media_type: str = mediatypes.OCI_LAYER_GZIP
) -> descriptors.Descriptor:
    return descriptors.Descriptor(
        media_type=media_type, digest=digests.of(name.encode()), size=size
    )


CONFIG = blob("config", 1_234, mediatypes.OCI_CONFIG)
LAYER1 = blob("layer1", 300_000)
LAYER2 = blob("layer2", 5 * CHUNK + 17)


@pytest.fixture
def seen() -> list[events.ProgressEvent]:
    return []


@pytest.fixture
def pull(seen: list[events.ProgressEvent]) -> tracker.PullProgress:
    return tracker.PullProgress("docker.io/library/alpine:latest", seen.append, clock=lambda: 0.0)


def download(pull: tracker.PullProgress, desc: descriptors.Descriptor, offset: int = 0) -> None:
    with pull.request(desc.digest, offset=offset):
        remaining = desc.size - offset
        while remaining:
            n = min(CHUNK, remaining)
            pull.bytes_read(desc.digest, n)
            remaining -= n
    pull.blob_done(desc.digest)


def test_progress_events_add_up_to_the_blob_sizes(
    pull: tracker.PullProgress, seen: list[events.ProgressEvent]
) -> None:
    pull.set_phase(events.Phase.RESOLVING)
    pull.add_blobs([CONFIG, LAYER1, LAYER2])
    pull.blob_present(LAYER1)
    pull.set_phase(events.Phase.DOWNLOADING)
    download(pull, CONFIG)
    download(pull, LAYER2)
    pull.set_phase(events.Phase.UNPACKING)
    pull.layer_unpacked(LAYER1.digest)
    pull.layer_unpacked(LAYER2.digest)
    pull.set_phase(events.Phase.COMMITTING)
    pull.set_phase(events.Phase.READY)

    final = seen[-1].snapshot
    assert final == pull.snapshot()
    assert final.bytes_done == final.bytes_total == CONFIG.size + LAYER1.size + LAYER2.size
    assert (final.blobs_done, final.blobs_total) == (3, 3)
    assert (final.layers_done, final.layers_total) == (2, 2)
    assert final.active_requests == 0
    assert final.phase is events.Phase.READY
    assert final.fraction == 1.0
    # Only downloaded bytes went over the network; the present layer did not.
    assert pull.total_bytes_read == CONFIG.size + LAYER2.size

    phases = [e.phase for e in seen if isinstance(e, events.PhaseChanged)]
    assert phases == [
        events.Phase.RESOLVING,
        events.Phase.DOWNLOADING,
        events.Phase.UNPACKING,
        events.Phase.COMMITTING,
        events.Phase.READY,
    ]
    done = [e for e in seen if isinstance(e, events.BlobDone)]
    assert [(e.digest, e.present) for e in done] == [
        (LAYER1.digest, True),
        (CONFIG.digest, False),
        (LAYER2.digest, False),
    ]
    progress = [e.snapshot.bytes_done for e in seen if isinstance(e, events.BlobProgress)]
    assert progress == sorted(progress)
    assert len(progress) == 1 + 6  # the config in one chunk, layer 2 in six


def test_already_present_blobs_count_as_done_even_if_not_added_first(
    pull: tracker.PullProgress,
) -> None:
    pull.blob_present(LAYER1)
    snap = pull.snapshot()
    assert (snap.bytes_done, snap.bytes_total) == (LAYER1.size, LAYER1.size)
    assert (snap.blobs_done, snap.layers_total, snap.layers_done) == (1, 1, 0)


def test_request_stops_being_active_at_eof_not_after_the_commit(
    pull: tracker.PullProgress,
) -> None:
    pull.add_blobs([LAYER2])
    with pull.request(LAYER2.digest):
        assert pull.active_requests == 1
        pull.bytes_read(LAYER2.digest, LAYER2.size)
    assert pull.active_requests == 0  # EOF: the slow commit comes after this
    assert pull.snapshot().blobs_done == 0
    pull.blob_done(LAYER2.digest)
    assert pull.snapshot().blobs_done == 1


def test_failed_body_stops_being_active_too(pull: tracker.PullProgress) -> None:
    pull.add_blobs([LAYER2])
    with pytest.raises(ConnectionError), pull.request(LAYER2.digest):
        raise ConnectionError("reset")
    assert pull.active_requests == 0


def test_an_unmatched_finish_is_ignored(pull: tracker.PullProgress) -> None:
    pull.request_started(LAYER2.digest)
    pull.request_finished(LAYER2.digest)
    pull.request_finished(LAYER2.digest)
    pull.request_finished(None)
    assert pull.active_requests == 0


def test_concurrent_requests_are_counted_each(pull: tracker.PullProgress) -> None:
    pull.add_blobs([LAYER1, LAYER2])
    pull.request_started(None)  # a manifest
    pull.request_started(LAYER1.digest)
    pull.request_started(LAYER2.digest)
    assert pull.active_requests == pull.snapshot().active_requests == 3
    pull.request_finished(LAYER1.digest)
    assert pull.active_requests == 2


def test_range_resume_keeps_the_bytes_before_the_offset(
    pull: tracker.PullProgress, seen: list[events.ProgressEvent]
) -> None:
    pull.add_blobs([LAYER2])
    with pull.request(LAYER2.digest):
        pull.bytes_read(LAYER2.digest, 2 * CHUNK)
    pull.retry(LAYER2.digest, 1, "no data for 1s", stalled=True)
    download(pull, LAYER2, offset=2 * CHUNK)
    snap = pull.snapshot()
    assert snap.bytes_done == LAYER2.size
    assert pull.total_bytes_read == LAYER2.size
    starts = [e for e in seen if isinstance(e, events.BlobStarted)]
    assert [e.offset for e in starts] == [0, 2 * CHUNK]


def test_restart_from_zero_takes_bytes_back_but_not_from_the_network_count(
    pull: tracker.PullProgress,
) -> None:
    pull.add_blobs([LAYER2])
    with pull.request(LAYER2.digest):
        pull.bytes_read(LAYER2.digest, 2 * CHUNK)
    download(pull, LAYER2, offset=0)  # the registry ignored Range
    assert pull.snapshot().bytes_done == LAYER2.size
    assert pull.total_bytes_read == LAYER2.size + 2 * CHUNK


def test_bytes_of_a_blob_never_exceed_its_size(pull: tracker.PullProgress) -> None:
    pull.add_blobs([CONFIG])
    pull.request_started(CONFIG.digest)
    pull.bytes_read(CONFIG.digest, CONFIG.size * 3)
    assert pull.snapshot().bytes_done == CONFIG.size
    assert pull.total_bytes_read == CONFIG.size * 3


def test_unknown_requests_count_for_the_watchdog_but_not_in_the_totals(
    pull: tracker.PullProgress, seen: list[events.ProgressEvent]
) -> None:
    with pull.request(None):
        pull.bytes_read(None, 500)
    assert pull.total_bytes_read == 500
    assert pull.snapshot().bytes_done == 0
    assert seen == []


def test_last_progress_time_follows_the_clock() -> None:
    now = [5.0]
    pull = tracker.PullProgress("x", clock=lambda: now[0])
    assert pull.last_progress_at == 5.0
    now[0] = 9.0
    pull.bytes_read(None, 1)
    assert pull.last_progress_at == 9.0


def test_retries_and_recovered_stalls_are_counted(
    pull: tracker.PullProgress, seen: list[events.ProgressEvent]
) -> None:
    pull.retry(LAYER1.digest, 1, "503 Service Unavailable", stalled=False)
    pull.retry(LAYER1.digest, 2, "no data for 30s", stalled=True)
    snap = pull.snapshot()
    assert (snap.retries, snap.stalls, snap.stall_cancellations) == (2, 1, 0)
    retry = seen[-1]
    assert isinstance(retry, events.Retry)
    assert (retry.attempt, retry.stalled, retry.reason) == (2, True, "no data for 30s")


def test_a_fatal_stall_is_counted_and_moves_the_phase_to_stalled(
    pull: tracker.PullProgress, seen: list[events.ProgressEvent]
) -> None:
    pull.set_phase(events.Phase.DOWNLOADING)
    pull.stalled(None, "no progress in 5m0s", fatal=True)
    event = seen[-1]
    assert isinstance(event, events.Stalled)
    assert (event.digest, event.message, event.fatal) == (None, "no progress in 5m0s", True)
    assert event.snapshot.phase is events.Phase.STALLED
    assert (event.snapshot.stalls, event.snapshot.stall_cancellations) == (0, 1)
    assert pull.phase.final


def test_setting_the_same_phase_again_emits_nothing(
    pull: tracker.PullProgress, seen: list[events.ProgressEvent]
) -> None:
    pull.set_phase(events.Phase.DOWNLOADING)
    pull.set_phase(events.Phase.DOWNLOADING)
    pull.set_phase(events.Phase.DOWNLOADING, "3 blobs")
    assert len(seen) == 2


def test_blobs_and_layers_are_counted_once(pull: tracker.PullProgress) -> None:
    pull.add_blobs([LAYER1, LAYER1, CONFIG])
    pull.add_blobs([LAYER1])
    pull.blob_done(LAYER1.digest)
    pull.blob_done(LAYER1.digest)
    pull.layer_unpacked(LAYER1.digest)
    pull.layer_unpacked(LAYER1.digest)
    snap = pull.snapshot()
    assert (snap.blobs_total, snap.blobs_done, snap.layers_total, snap.layers_done) == (2, 1, 1, 1)
    assert snap.bytes_total == LAYER1.size + CONFIG.size


def test_events_serialise_to_plain_dicts(
    pull: tracker.PullProgress, seen: list[events.ProgressEvent]
) -> None:
    pull.add_blobs([CONFIG])
    pull.set_phase(events.Phase.DOWNLOADING, "1 blob")
    data = seen[-1].to_dict()
    assert data["kind"] == "PhaseChanged"
    assert data["phase"] == "Downloading"
    assert data["snapshot"]["phase"] == "Downloading"
    assert data["snapshot"]["bytes_total"] == CONFIG.size


def test_without_a_callback_nothing_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    pull = tracker.PullProgress("x", clock=lambda: 0.0)
    monkeypatch.setattr(pull, "snapshot", lambda: pytest.fail("snapshot built"))
    pull.add_blobs([LAYER2])
    download(pull, LAYER2)
    assert pull.total_bytes_read == LAYER2.size


@pytest.mark.looptime(start=100)
async def test_the_default_clock_is_the_loop_time() -> None:
    pull = tracker.PullProgress("x")
    assert pull.last_progress_at == 100
    await asyncio.sleep(7)
    pull.bytes_read(None, 1)
    assert pull.last_progress_at == asyncio.get_running_loop().time() == 107
