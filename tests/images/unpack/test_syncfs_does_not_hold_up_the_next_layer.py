"""``--sync-fs``: a layer is committed only after a ``syncfs`` that followed its writes, but
the next layer is applied while that ``syncfs`` runs.

Instrumented, not timed: ``syncfs`` is the real one, made slow for the first layer — it
returns only once the next layer's apply has started (or after a generous deadline, which an
unpacker that flushes inline always reaches). The order of events is then checked.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pytest
from fixtures import layers as L

from agent.images import digests, snapshots
from agent.images.unpack import archive, unpacker

DEADLINE = 10.0  # seconds a held-up syncfs waits for the next layer before giving up


def image() -> L.Image:
    tars = []
    for n in range(3):
        layer = L.Layer().dir(f"l{n}")
        for i in range(30):
            layer.file(f"l{n}/f{i}", L.random_bytes(3000, seed=n * 100 + i))
        tars.append(layer.tar())
    return L.image(tars)


@pytest.mark.parametrize("concurrency", [1, 2])
def test_a_layer_commits_after_its_syncfs_while_the_next_one_is_applied(
    concurrency: int, overlay_sn: snapshots.OverlaySnapshotter, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = image()
    chain = [str(c) for c in digests.chain_ids(L.diff_ids_of(img))]
    log: list[tuple[str, str]] = []  # (event, layer's chain ID), in the order they happened
    lock = threading.Lock()
    target_of: dict[str, str] = {}  # upper directory → chain ID
    next_started = threading.Event()

    def record(event: str, chain_id: str) -> None:
        with lock:
            log.append((event, chain_id))

    prepare, commit = overlay_sn.prepare, overlay_sn.commit

    def traced_prepare(
        key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[snapshots.Mount]:
        mounts = prepare(key, parent, labels)
        target_of[unpacker._target(mounts)] = key.split(" ")[1]
        return mounts

    def traced_commit(name: str, key: str, **kwargs: object) -> None:
        record("commit", name)
        commit(name, key, **kwargs)  # type: ignore[arg-type]

    real_syncfs, real_apply = snapshots.syncfs, archive.apply

    def slow_syncfs(path: str) -> None:
        chain_id = target_of[path]
        record("syncfs-start", chain_id)
        if chain_id == chain[0]:
            next_started.wait(DEADLINE)
        real_syncfs(path)
        record("syncfs-end", chain_id)

    def traced_apply(stream: object, target: str, **kwargs: object) -> archive.ApplyResult:
        chain_id = target_of[target]
        record("apply-start", chain_id)
        if chain_id == chain[1]:
            next_started.set()
        result = real_apply(stream, target, **kwargs)  # type: ignore[arg-type]
        record("apply-end", chain_id)
        return result

    monkeypatch.setattr(overlay_sn, "prepare", traced_prepare)
    monkeypatch.setattr(overlay_sn, "commit", traced_commit)
    monkeypatch.setattr(snapshots, "syncfs", slow_syncfs)
    monkeypatch.setattr(archive, "apply", traced_apply)

    u = unpacker.Unpacker(
        L.MemoryProvider(img.blobs), overlay_sn, sync_fs=True, concurrency=concurrency
    )
    assert u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img)) == chain[-1]

    def at(event: str, chain_id: str) -> int:
        return log.index((event, chain_id))

    # The second layer was being applied while the first one's syncfs ran.
    assert at("apply-start", chain[1]) < at("syncfs-end", chain[0]), log
    for c in chain:
        # Each commit follows a syncfs that started after the layer's last write.
        synced = [
            i for i, e in enumerate(log)
            if e == ("syncfs-end", c) and log.index(("syncfs-start", c)) > at("apply-end", c)
        ]
        assert synced and synced[0] < at("commit", c), log
    assert [c for e, c in log if e == "commit"] == chain  # in chain order
    # Every layer committed (walk lists them by when they were prepared, which concurrent
    # applies do in either order; the chain order is the commits' above).
    assert sorted(i.name for i in overlay_sn.walk() if i.kind is snapshots.Kind.COMMITTED) == \
        sorted(chain)


def test_a_failed_syncfs_commits_nothing_of_that_layer(
    overlay_sn: snapshots.OverlaySnapshotter, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = image()

    def failing_syncfs(path: str) -> None:
        raise OSError(5, f"syncfs({path}): Input/output error")

    monkeypatch.setattr(snapshots, "syncfs", failing_syncfs)
    u = unpacker.Unpacker(L.MemoryProvider(img.blobs), overlay_sn, sync_fs=True)
    with pytest.raises(OSError, match="Input/output error"):
        u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
    assert list(overlay_sn.walk()) == []  # no committed layer, no active snapshot left

