"""``chains.committed_depth``: how much of an image's chain a snapshotter has, answered with
few questions (each is a gRPC round trip when the snapshotter is containerd's, before the
first layer of a pull can start)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.images import digests, snapshots
from agent.images.snapshots import chains

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bind mounts")

DIFF_IDS = [digests.Digest("sha256:" + f"{i:x}" * 64) for i in range(1, 6)]


class CountingStats:
    """The snapshotter, counting the ``stat`` calls made through it."""

    def __init__(self, inner: snapshots.Snapshotter) -> None:
        self.inner = inner
        self.stats: list[str] = []

    def stat(self, key: str) -> snapshots.Info:
        self.stats.append(key)
        return self.inner.stat(key)


def commit_bottom(sn: snapshots.Snapshotter, count: int) -> None:
    chain = digests.chain_ids(DIFF_IDS)
    parent = ""
    for i in range(count):
        sn.prepare(f"extract-{i}", parent)
        sn.commit(str(chain[i]), f"extract-{i}")
        parent = str(chain[i])


@pytest.mark.parametrize(
    ("committed", "questions"),
    [(0, 2), (1, 3), (3, 5), (4, 5), (5, 1)],
    ids=["new", "base-shared", "most-shared", "all-but-top", "unpacked"],
)
def test_committed_depth_asks_the_top_then_from_the_bottom(
    tmp_path: Path, committed: int, questions: int
) -> None:
    sn = snapshots.NaiveSnapshotter(tmp_path / "root")
    try:
        commit_bottom(sn, committed)
        counting = CountingStats(sn)
        depth = chains.committed_depth(counting, DIFF_IDS)  # type: ignore[arg-type]
        assert depth == committed
        assert len(counting.stats) == questions
        chain = [str(c) for c in digests.chain_ids(DIFF_IDS)]
        assert counting.stats[0] == chain[-1]  # an unpacked image costs one question
    finally:
        sn.close()


def test_committed_depth_of_no_layers_asks_nothing(tmp_path: Path) -> None:
    sn = snapshots.NaiveSnapshotter(tmp_path / "root")
    try:
        counting = CountingStats(sn)
        assert chains.committed_depth(counting, []) == 0  # type: ignore[arg-type]
        assert counting.stats == []
    finally:
        sn.close()
