"""Garbage collection: remove blobs and snapshots that no image record reaches.

Roots are the image records (and whatever in-flight pulls lease). From each record the
collector keeps its index, manifest and config blobs, its layer blobs (unless the layers
are unpacked and ``discard_unpacked_layers`` is on, as in containerd), and the snapshot
chain from its top chain ID down through the parents. Everything else goes: committed
snapshots leaf first (a parent is never removed before its children), then blobs.
Views (mounts the user made with ``prefetcher mount``) are roots too: their parents stay.

Ingests (partial downloads) are collected too: one that no writer holds (each writer
``flock``s its ingest, in any process), that no in-flight pull leases, and that was not
written to for ``ingest_expiry`` seconds is a download nobody will resume (its pull was
cancelled by a spec edit, a delete or a stall) and goes. A pull retrying after a short
back-off still resumes its ingest; one that comes back after the expiry starts over.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from agent.images import digests, errors, mediatypes, records
from agent.images.content import local
from agent.images.descriptors import Manifest, media_type_of
from agent.images.snapshots import snapshotter as snapshotter_api

#: Seconds an ingest nobody holds may sit unwritten before garbage collection removes it.
INGEST_EXPIRY = 30 * 60.0


@dataclass
class Result:
    """What a collection removed."""

    blobs: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    #: refs of the abandoned ingests removed (a pull names an ingest by its blob's digest)
    ingests: list[str] = field(default_factory=list)
    bytes_freed: int = 0

    def to_json(self) -> dict[str, object]:
        return {
            "blobs_removed": self.blobs,
            "snapshots_removed": self.snapshots,
            "ingests_removed": self.ingests,
            "bytes_freed": self.bytes_freed,
        }


def collect(
    content: local.LocalStore,
    snapshotter: snapshotter_api.Snapshotter | None,
    image_records: Iterable[records.ImageRecord],
    *,
    leased: Callable[[str], bool] = lambda name: False,
    lease_lock: threading.Lock | None = None,
    discard_unpacked_layers: bool = False,
    ingest_expiry: float = INGEST_EXPIRY,
    clock: Callable[[], float] = time.time,
    only: set[str] | None = None,
) -> Result:
    """Remove what nothing reaches. Blocking: call it from a thread in async code.

    ``leased(name)`` says whether an in-flight pull holds a blob digest or chain ID; it is
    asked under ``lease_lock`` at the moment of each delete, the lock pulls take to lease
    something before they look for it, so a pull never loses what it found present.
    ``ingest_expiry``: see the module doc (wall-clock seconds, as ingest times are).
    ``only``: remove nothing but these blob digests and chain IDs (what a failed pull
    committed) and their idle partial downloads, whatever their age (a refused image's
    downloads would never be resumed).
    """
    lock: contextlib.AbstractContextManager[object] = (
        lease_lock if lease_lock is not None else contextlib.nullcontext()
    )
    keep: set[str] = set()
    for record in image_records:
        keep.update(str(b) for b in record.blobs)
        if record.chain_id:
            keep.add(record.chain_id)
            if discard_unpacked_layers:
                keep.difference_update(_layer_digests(content, record))
    result = Result()
    if snapshotter is not None:
        _collect_snapshots(snapshotter, keep, result, leased, lock, only)
    for info in list(content.walk()):
        if str(info.digest) in keep or (only is not None and str(info.digest) not in only):
            continue
        with lock:
            if leased(str(info.digest)):
                continue
            try:
                content.delete(info.digest)
            except errors.NotFound:
                continue
        result.blobs.append(str(info.digest))
        result.bytes_freed += info.size
    if only is None:
        _collect_ingests(content, result, leased, lock, clock() - ingest_expiry)
    else:
        _collect_ingests(content, result, leased, lock, math.inf, only)
    return result


def _collect_ingests(
    content: local.LocalStore,
    result: Result,
    leased: Callable[[str], bool],
    lock: contextlib.AbstractContextManager[object],
    written_before: float,
    only: set[str] | None = None,
) -> None:
    for status in content.ingests():
        if status.updated_at > written_before or (only is not None and status.ref not in only):
            continue
        with lock:
            if leased(status.ref) or not content.remove_idle_ingest(status.ref):
                continue
        result.ingests.append(status.ref)
        result.bytes_freed += status.offset


def _collect_snapshots(
    snapshotter: snapshotter_api.Snapshotter,
    keep: set[str],
    result: Result,
    leased: Callable[[str], bool],
    lock: contextlib.AbstractContextManager[object],
    only: set[str] | None = None,
) -> None:
    infos = {i.name: i for i in snapshotter.walk()}
    reachable: set[str] = set()

    def reach(name: str) -> None:
        while name and name not in reachable:
            reachable.add(name)
            info = infos.get(name)
            name = info.parent if info is not None else ""

    for name, info in infos.items():
        if name in keep or info.kind is not snapshotter_api.Kind.COMMITTED:
            reach(name)  # roots: what records name, views, and active snapshots (in use)
    garbage = [
        n for n in infos if n not in reachable and (only is None or n in only)
    ]
    children: dict[str, int] = {}
    for info in infos.values():
        if info.parent:
            children[info.parent] = children.get(info.parent, 0) + 1
    # Leaf first: repeatedly remove garbage without remaining children.
    pending = set(garbage)
    while pending:
        leaves = [n for n in pending if children.get(n, 0) == 0]
        if not leaves:  # pragma: no cover - a cycle cannot be built through the API
            break
        for name in sorted(leaves):
            pending.discard(name)
            with lock:
                if leased(name):  # a pull took it meanwhile: it and its parents stay
                    continue
                try:
                    size = snapshotter.usage(name).size
                    snapshotter.remove(name)
                except errors.NotFound:
                    pass
                except errors.ImageError:
                    continue  # e.g. a child committed since the walk: it is in use
                else:
                    result.bytes_freed += size
            result.snapshots.append(name)
            parent = infos[name].parent
            if parent:
                children[parent] -= 1


def _layer_digests(content: local.LocalStore, record: records.ImageRecord) -> set[str]:
    """The layer blobs of ``record``'s platform manifest (empty if it is not stored)."""
    try:
        data = content.read_blob(digests.Digest(record.manifest_digest))
        media_type = media_type_of(data)
        if media_type not in mediatypes.MANIFESTS:
            return set()
        return {str(layer.digest) for layer in Manifest.parse(data, media_type).layers}
    except errors.ImageError:
        return set()
