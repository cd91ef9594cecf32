"""The unpacker: skips committed chains, verifies diff IDs, reports progress, cancels cleanly."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from fixtures import layers as L

from agent.images import digests, errors, snapshots
from agent.images.unpack import unpacker


def tars(n: int = 3) -> list[bytes]:
    return [L.Layer().file(f"f{i}", L.random_bytes(1000, seed=i)).tar() for i in range(n)]


def make(
    sn: snapshots.Snapshotter, img: L.Image, **kwargs: object
) -> tuple[unpacker.Unpacker, L.MemoryProvider]:
    provider = L.MemoryProvider(img.blobs)
    return unpacker.Unpacker(provider, sn, **kwargs), provider  # type: ignore[arg-type]


def committed(sn: snapshots.Snapshotter) -> list[str]:
    return [i.name for i in sn.walk() if i.kind is snapshots.Kind.COMMITTED]


def test_layers_are_committed_under_their_chain_ids_on_their_parents(
    overlay_sn: snapshots.OverlaySnapshotter,
) -> None:
    img = L.image(tars())
    u, _ = make(overlay_sn, img, concurrency=3)
    top = u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
    chain = digests.chain_ids(img.diff_ids)
    assert top == chain[-1]
    assert [(overlay_sn.stat(c).parent) for c in chain] == ["", chain[0], chain[1]]
    assert all(overlay_sn.stat(c).labels == {} for c in chain)  # the owner label is gone


def test_a_second_unpack_of_the_same_image_reads_no_blob(
    overlay_sn: snapshots.OverlaySnapshotter,
) -> None:
    img = L.image(tars())
    events: list[unpacker.UnpackEvent] = []
    u, provider = make(overlay_sn, img, on_progress=events.append)
    u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
    provider.opened.clear()
    events.clear()
    u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
    assert provider.opened == []
    assert [e.kind for e in events] == ["skipped"] * 3


def test_an_image_sharing_base_layers_unpacks_only_its_own(
    overlay_sn: snapshots.OverlaySnapshotter,
) -> None:
    base = tars(2)
    first = L.image(base)
    second = L.image([*base, L.Layer().file("app", b"app").tar()])
    make(overlay_sn, first)[0].unpack_blocking(L.descriptors_of(first), L.diff_ids_of(first))
    u, provider = make(overlay_sn, second)
    u.unpack_blocking(L.descriptors_of(second), L.diff_ids_of(second))
    assert provider.opened == [second.layers[2][1]]
    assert len(committed(overlay_sn)) == 3


@pytest.mark.parametrize("concurrency", [1, 3])
def test_a_diff_id_mismatch_commits_nothing_from_that_layer_up(
    concurrency: int, overlay_sn: snapshots.OverlaySnapshotter
) -> None:
    img = L.image(tars())
    diff_ids = L.diff_ids_of(img)
    diff_ids[1] = digests.Digest(L.sha256(b"something else"))
    u, _ = make(overlay_sn, img, concurrency=concurrency)
    with pytest.raises(errors.DigestMismatch, match="diff ID"):
        u.unpack_blocking(L.descriptors_of(img), diff_ids)
    assert committed(overlay_sn) == [img.diff_ids[0]]
    assert [i.kind for i in overlay_sn.walk()] == [snapshots.Kind.COMMITTED]
    assert len(list((overlay_sn.root / "snapshots").iterdir())) == 1


def test_a_layer_committed_meanwhile_by_another_unpack_counts_as_done(
    naive_sn: snapshots.NaiveSnapshotter,
) -> None:
    img = L.image(tars(1))
    u, _ = make(naive_sn, img)
    real_commit = naive_sn.commit

    def racing_commit(name: str, key: str, labels: object = None, *, parent: object = None) -> None:
        naive_sn.prepare("other", "")
        real_commit(name, "other")
        real_commit(name, key)  # raises AlreadyExists

    naive_sn.commit = racing_commit  # type: ignore[method-assign]
    top = u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
    assert committed(naive_sn) == [top]
    assert [i.kind for i in naive_sn.walk()] == [snapshots.Kind.COMMITTED]


def test_progress_events_come_per_layer_and_commits_in_chain_order(
    overlay_sn: snapshots.OverlaySnapshotter,
) -> None:
    img = L.image(tars(4))
    events: list[unpacker.UnpackEvent] = []
    lock = threading.Lock()

    def record(e: unpacker.UnpackEvent) -> None:
        with lock:
            events.append(e)

    u, _ = make(overlay_sn, img, concurrency=4, on_progress=record)
    u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
    assert [e.index for e in events if e.kind == "done"] == [0, 1, 2, 3]
    for i in range(4):
        kinds = [e.kind for e in events if e.index == i]
        assert kinds[0] == "started" and kinds[-1] == "done" and "progress" in kinds
        last_progress = [e for e in events if e.index == i and e.kind == "progress"][-1]
        assert last_progress.uncompressed_bytes == len(tars(4)[i])
        assert last_progress.compressed_bytes == img.layers[i][2]


def test_a_missing_blob_leaves_no_active_snapshot(
    overlay_sn: snapshots.OverlaySnapshotter,
) -> None:
    img = L.image(tars(2))
    del img.blobs[img.layers[1][1]]
    u, _ = make(overlay_sn, img, concurrency=2)
    with pytest.raises(errors.NotFound):
        u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
    assert [i.kind for i in overlay_sn.walk()] == [snapshots.Kind.COMMITTED]


def test_layers_and_diff_ids_must_match_in_number(
    overlay_sn: snapshots.OverlaySnapshotter,
) -> None:
    img = L.image(tars(2))
    u, _ = make(overlay_sn, img)
    with pytest.raises(errors.InvalidManifest):
        u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img)[:1])


async def test_async_unpack_returns_the_top_chain_id(
    overlay_sn: snapshots.OverlaySnapshotter,
) -> None:
    img = L.image(tars())
    u, _ = make(overlay_sn, img)
    assert (
        await u.unpack(L.descriptors_of(img), L.diff_ids_of(img))
        == digests.chain_ids(img.diff_ids)[-1]
    )


async def test_cancelling_an_async_unpack_removes_its_active_snapshots(
    overlay_sn: snapshots.OverlaySnapshotter,
) -> None:
    big = [L.Layer().file(f"f{j}", L.random_bytes(4096, seed=j)).tar() for j in range(1)]
    many = L.Layer()
    for j in range(3000):
        many.file(f"d/f{j}", b"x" * 100)
    img = L.image([*big, many.tar(), many.tar() + bytes(512)])
    started = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_progress(e: unpacker.UnpackEvent) -> None:
        if e.kind == "started" and e.index == 1:
            loop.call_soon_threadsafe(started.set)

    u, _ = make(overlay_sn, img, concurrency=2, on_progress=on_progress)
    task = asyncio.create_task(u.unpack(L.descriptors_of(img), L.diff_ids_of(img)))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert all(i.kind is snapshots.Kind.COMMITTED for i in overlay_sn.walk())


def test_overlay_snapshots_get_overlay_whiteouts_and_naive_ones_removals(
    overlay_sn: snapshots.OverlaySnapshotter, naive_sn: snapshots.NaiveSnapshotter
) -> None:
    img = L.image([L.Layer().file("x", b"").tar(), L.Layer().whiteout("x").tar()])
    tops = [
        make(sn, img)[0].unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
        for sn in (overlay_sn, naive_sn)
    ]
    lowerdir = overlay_sn.mounts(tops[0])[0].option("lowerdir") or ""
    assert Path(lowerdir.split(":")[0], "x").is_char_device()
    assert not Path(naive_sn.mounts(tops[1])[0].source, "x").exists()
