"""Snapshot chains: how much of an image's chain a snapshotter already has.

A layer's snapshot is named by its chain ID (:func:`~agent.images.digests.chain_ids`), so
"is this layer unpacked" is "is its chain ID a committed snapshot". Every backend asks this
through these two functions: the local store's snapshotter, containerd's, the unpacker.
"""

from __future__ import annotations

from collections.abc import Sequence

from agent.images import digests, errors
from agent.images.snapshots import snapshotter as snapshots


def is_committed(sn: snapshots.Snapshotter, chain_id: str | digests.Digest) -> bool:
    """Whether ``chain_id`` is a committed snapshot of ``sn`` ("" never is)."""
    if not chain_id:
        return False
    try:
        return sn.stat(str(chain_id)).kind is snapshots.Kind.COMMITTED
    except errors.NotFound:
        return False


def committed_depth(sn: snapshots.Snapshotter, diff_ids: Sequence[digests.Digest]) -> int:
    """How many bottom layers of the chain of ``diff_ids`` are committed in ``sn``.

    A committed chain ID implies all of its parents (a snapshotter keeps a committed
    snapshot's parent), and a missing one that none above it is. So it asks about the top
    first (an image already unpacked: one question), then from the bottom up to the first
    missing layer (a new image: two questions; one sharing its base layers with another:
    one more per shared layer) rather than about every layer."""
    chain = digests.chain_ids(diff_ids)
    if not chain:
        return 0
    if is_committed(sn, chain[-1]):
        return len(chain)
    for depth in range(len(chain) - 1):
        if not is_committed(sn, chain[depth]):
            return depth
    return len(chain) - 1
