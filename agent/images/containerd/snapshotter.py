"""``ContainerdSnapshotter``: the :class:`~agent.images.snapshots.Snapshotter` protocol on
containerd's snapshots service.

The snapshots live in containerd (``/var/lib/containerd/io.containerd.snapshotter.v1.<name>``)
and containerd's metadata; this class only calls the service. :meth:`prepare` returns the
mounts containerd returns — for overlayfs a ``bind`` mount of the new snapshot's directory
(bottom layer) or an ``overlay`` mount whose ``upperdir`` is that directory — and the
:class:`~agent.images.unpack.unpacker.Unpacker` writes the layer straight into that
directory, as containerd's own applier does with overlay mounts. The agent must therefore see
containerd's root at the same path (a hostPath mount of ``/var/lib/containerd``).

Differences from the built-in snapshotters, all containerd's own behaviour:

* :data:`~agent.images.snapshots.CAP_REBASE` for ``overlayfs`` only, emulated: containerd
  fixes a snapshot's parent at prepare time, so :meth:`commit` with another ``parent``
  prepares a new active snapshot on that parent and *renames* the layer's directory into it
  (both live under containerd's snapshotter root, one filesystem: no byte is copied), then
  removes the first one. So the unpacker applies several layers at once, as with the local
  overlay snapshotter, and commits them in chain order.
* :data:`~agent.images.snapshots.CAP_OVERLAY_WHITEOUTS` for ``overlayfs`` only: deletions
  become 0:0 character devices and ``trusted.overlay.opaque`` (the upper directory holds only
  the layer's changes). Other snapshotters that hand out a ``bind`` mount of a full copy
  (``native``) get deletions applied by removing.
* A commit does not carry the active snapshot's labels over (containerd's metadata store
  writes only the labels given to ``Commit``), so :meth:`commit` passes them on itself, minus
  the owner label, plus ``containerd.io/snapshot.ref`` = the name, as containerd's unpacker
  sets it.
* ``Mounts`` of a committed snapshot is refused by containerd; :meth:`mounts` answers it
  through a short-lived view.

Every call carries the lease given to the constructor (:meth:`with_lease`), so containerd's
GC keeps the snapshots of an import in flight.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator, Mapping
from typing import Final

import grpc
from google.protobuf import empty_pb2, field_mask_pb2

from agent.images import errors
from agent.images.containerd import client as client_mod
from agent.images.containerd import leases
from agent.images.containerd.protos import mount_pb2, snapshots_pb2
from agent.images.snapshots import snapshotter as snapshots

#: The chain ID a snapshot holds, set by containerd's unpacker on prepare and commit.
LABEL_SNAPSHOT_REF: Final = "containerd.io/snapshot.ref"
#: Prefix of containerd's unpack keys: ``extract-<unique> <chainID>``.
UNPACK_KEY_PREFIX: Final = "extract-"

_SERVICE: Final = "/containerd.services.snapshots.v1.Snapshots/"
_KINDS: Final = {
    snapshots_pb2.VIEW: snapshots.Kind.VIEW,
    snapshots_pb2.ACTIVE: snapshots.Kind.ACTIVE,
    snapshots_pb2.COMMITTED: snapshots.Kind.COMMITTED,
}
#: Snapshotters whose upper directory holds only a layer's changes (overlay whiteouts).
OVERLAY_SNAPSHOTTERS: Final = frozenset({"overlayfs"})


class ContainerdSnapshotter:
    """containerd's snapshotter ``name`` (``overlayfs``) in the client's namespace.

    Args:
        client: the channel (shared; :meth:`close` does not close it).
        name: the containerd snapshotter plugin, as the CRI plugin's ``snapshotter``.
        lease: attach every snapshot created through this object to this lease.
    """

    def __init__(self, client: client_mod.Client, name: str = "overlayfs", *, lease: str = ""):
        self.client = client
        self.name = name
        self.lease = lease
        caps: set[str] = set()
        if name in OVERLAY_SNAPSHOTTERS:
            caps |= {snapshots.CAP_OVERLAY_WHITEOUTS, snapshots.CAP_REBASE}
        self.capabilities: frozenset[str] = frozenset(caps)

    def with_lease(self, lease: str) -> ContainerdSnapshotter:
        """The same snapshotter, with calls made under ``lease``."""
        return ContainerdSnapshotter(self.client, self.name, lease=lease)

    # -- the protocol ------------------------------------------------------------------

    def stat(self, key: str) -> snapshots.Info:
        """The snapshot ``key``; under a lease, the snapshot joins the lease first (a
        committed snapshot found here stays until the lease ends, see
        :func:`~agent.images.containerd.leases.protect`)."""
        if self.lease:
            leases.protect(self.client, self.lease, key, f"snapshots/{self.name}")
        return self._stat(key)

    def _stat(self, key: str) -> snapshots.Info:
        """``Stat`` alone (a snapshot this lease made needs no protecting)."""
        response = self._call(
            "Stat",
            snapshots_pb2.StatSnapshotRequest(snapshotter=self.name, key=key),
            snapshots_pb2.StatSnapshotResponse,
            key,
        )
        return _info(response.info)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[snapshots.Mount]:
        all_labels = dict(labels or {})
        chain_id = _chain_id_of_key(key)
        if chain_id:
            all_labels.setdefault(LABEL_SNAPSHOT_REF, chain_id)
        with _parent_not_committed(parent):
            response = self._call(
                "Prepare",
                snapshots_pb2.PrepareSnapshotRequest(
                    snapshotter=self.name, key=key, parent=parent, labels=all_labels
                ),
                snapshots_pb2.PrepareSnapshotResponse,
                key,
            )
        return [_mount(m) for m in response.mounts]

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[snapshots.Mount]:
        with _parent_not_committed(parent):
            response = self._call(
                "View",
                snapshots_pb2.ViewSnapshotRequest(
                    snapshotter=self.name, key=key, parent=parent, labels=dict(labels or {})
                ),
                snapshots_pb2.ViewSnapshotResponse,
                key,
            )
        return [_mount(m) for m in response.mounts]

    def mounts(self, key: str) -> list[snapshots.Mount]:
        info = self.stat(key)
        if info.kind is snapshots.Kind.COMMITTED:
            # containerd serves mounts of active snapshots and views only.
            view = f"prefetcher-view-{secrets.token_hex(8)}"
            mounts = self.view(view, key, {snapshots.LABEL_OWNER: snapshots.owner_token()})
            with contextlib.suppress(errors.NotFound):
                self.remove(view)
            return [
                snapshots.Mount(m.type, m.source, _read_only(m.options)) for m in mounts
            ]
        return self._active_mounts(key)

    def _active_mounts(self, key: str) -> list[snapshots.Mount]:
        response = self._call(
            "Mounts",
            snapshots_pb2.MountsRequest(snapshotter=self.name, key=key),
            snapshots_pb2.MountsResponse,
            key,
        )
        return [_mount(m) for m in response.mounts]

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        *,
        parent: str | None = None,
    ) -> None:
        # Only an active snapshot can be committed, and the unpack prepared it under this
        # lease: nothing to protect (one round trip less per layer on the commit path).
        active = self._stat(key)
        if active.kind is not snapshots.Kind.ACTIVE:
            raise errors.NotFound(f"{key!r} is a {active.kind.name.lower()} snapshot, not an active"
                                  " one: only active snapshots can be committed")
        if parent is not None and parent != active.parent:
            if snapshots.CAP_REBASE not in self.capabilities:
                raise errors.ImageError(
                    f"containerd's {self.name} snapshotter cannot rebase {key!r} onto"
                    f" {parent!r} (prepared on {active.parent!r}); prepare it on its parent"
                )
            key = self._rebase(key, active, parent)
        if labels is None:
            labels = {k: v for k, v in active.labels.items() if k != snapshots.LABEL_OWNER}
        all_labels = {**labels, LABEL_SNAPSHOT_REF: name}
        self._call(
            "Commit",
            snapshots_pb2.CommitSnapshotRequest(
                snapshotter=self.name, name=name, key=key, labels=all_labels
            ),
            empty_pb2.Empty,
            f"{key} as {name}",
        )

    def _rebase(self, key: str, active: snapshots.Info, parent: str) -> str:
        """Move active ``key``'s files into a new active snapshot on ``parent``; returns its
        key. A crash midway leaves only active snapshots (owner-labelled: ``cleanup()``)."""
        staged = _upper(self._active_mounts(key))  # active: commit() checked
        new_key = f"{UNPACK_KEY_PREFIX}{secrets.token_hex(8)} {_chain_id_of_key(key)}".rstrip()
        target = _upper(self.prepare(new_key, parent, active.labels))
        try:
            os.rmdir(target)  # containerd made it empty
            os.rename(staged, target)
            os.mkdir(staged, 0o755)  # what containerd expects to remove with ``key``
            # The rename is durable before containerd's metadata commit names the snapshot.
            _fsync_dir(os.path.dirname(target))
        except BaseException:
            with contextlib.suppress(errors.ImageError, OSError):
                self.remove(new_key)
            raise
        with contextlib.suppress(errors.NotFound):
            self.remove(key)
        return new_key

    def remove(self, key: str) -> None:
        self._call(
            "Remove",
            snapshots_pb2.RemoveSnapshotRequest(snapshotter=self.name, key=key),
            empty_pb2.Empty,
            key,
        )

    def update(self, key: str, labels: Mapping[str, str]) -> snapshots.Info:
        response = self._call(
            "Update",
            snapshots_pb2.UpdateSnapshotRequest(
                snapshotter=self.name,
                info=snapshots_pb2.Info(name=key, labels=dict(labels)),
                update_mask=field_mask_pb2.FieldMask(paths=["labels"]),
            ),
            snapshots_pb2.UpdateSnapshotResponse,
            key,
        )
        return _info(response.info)

    def walk(self) -> Iterator[snapshots.Info]:
        infos = [
            _info(info)
            for response in self.client.unary_stream(
                _SERVICE + "List",
                snapshots_pb2.ListSnapshotsRequest(snapshotter=self.name),
                snapshots_pb2.ListSnapshotsResponse,
                lease=self.lease,
                what=f"snapshots.List ({self.name})",
            )
            for info in response.info
        ]
        yield from sorted(infos, key=lambda i: (i.created, i.name))

    def usage(self, key: str) -> snapshots.Usage:
        response = self._call(
            "Usage",
            snapshots_pb2.UsageRequest(snapshotter=self.name, key=key),
            snapshots_pb2.UsageResponse,
            key,
        )
        return snapshots.Usage(size=response.size, inodes=response.inodes)

    def close(self) -> None:
        """Nothing to release: the client belongs to whoever created it."""

    def cleanup(self) -> list[str]:
        """Remove active snapshots and views this agent left when it died (kill -9, OOM).

        Only snapshots labelled with :data:`~agent.images.snapshots.LABEL_OWNER` of a
        process that is gone are touched; containerd's and kubelet's are never.
        """
        removed = []
        for info in list(self.walk()):
            owner = info.labels.get(snapshots.LABEL_OWNER)
            if info.kind is snapshots.Kind.COMMITTED or not owner:
                continue
            if snapshots.owner_alive(owner):
                continue
            with contextlib.suppress(errors.NotFound):
                self.remove(info.name)
                removed.append(info.name)
        return removed

    # -- internals ----------------------------------------------------------------------

    def _call(self, method: str, request, response_type, key: str):  # type: ignore[no-untyped-def]
        return self.client.unary(
            _SERVICE + method,
            request,
            response_type,
            lease=self.lease,
            what=f"snapshots.{method} {key!r} ({self.name})",
        )


@contextlib.contextmanager
def _parent_not_committed(parent: str) -> Iterator[None]:
    """containerd refuses an active parent with INVALID_ARGUMENT; the protocol says
    :class:`NotFound` (the parent is not a committed snapshot)."""
    try:
        yield
    except client_mod.ContainerdError as e:
        if e.code is grpc.StatusCode.INVALID_ARGUMENT and "is not committed" in str(e):
            raise errors.NotFound(f"parent {parent!r} is not a committed snapshot: {e}") from e
        raise


def _info(info: snapshots_pb2.Info) -> snapshots.Info:
    return snapshots.Info(
        name=info.name,
        parent=info.parent,
        kind=_KINDS.get(info.kind, snapshots.Kind.ACTIVE),
        labels=dict(info.labels),
        created=info.created_at.ToNanoseconds() / 1e9,
        updated=info.updated_at.ToNanoseconds() / 1e9,
    )


def _upper(mounts: list[snapshots.Mount]) -> str:
    """The directory an active snapshot's layer is written into (bind source or upperdir)."""
    if len(mounts) == 1:
        m = mounts[0]
        if m.type == "bind":
            return m.source
        if m.type == "overlay" and (upper := m.option("upperdir")):
            return upper
    raise errors.ImageError(f"cannot rebase a snapshot mounted as {mounts!r}")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _mount(m: mount_pb2.Mount) -> snapshots.Mount:
    return snapshots.Mount(m.type, m.source, tuple(m.options))


def _read_only(options: tuple[str, ...]) -> tuple[str, ...]:
    rest = tuple(o for o in options if o not in ("rw", "ro"))
    return ("ro", *rest)


def _chain_id_of_key(key: str) -> str:
    """The chain ID in an unpack key ``extract-<unique> <chainID>``, or ``""``."""
    if key.startswith(UNPACK_KEY_PREFIX):
        _, _, chain_id = key.partition(" ")
        if chain_id.startswith("sha256:"):
            return chain_id
    return ""
