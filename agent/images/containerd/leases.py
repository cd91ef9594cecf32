"""``Leases``: containerd leases, which keep what an import creates safe from containerd's GC.

Every content write and snapshot call made with a lease ID in its metadata attaches the new
blob or snapshot to that lease (containerd ``leases.WithLease``); while the lease exists,
containerd's garbage collector keeps them even though no image references them yet. An import
holds one lease from its first write until its image record exists, then deletes the lease:
from then on the image (→ manifest → config → snapshot labels) keeps everything.

A lease carries ``containerd.io/gc.expire``, so one left behind by a killed agent expires on
its own, and :data:`LABEL_OWNER` (see :func:`~agent.images.snapshots.snapshotter.owner_token`),
so :meth:`Leases.cleanup` can delete it at the next start without waiting.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from google.protobuf import empty_pb2

from agent.images import errors
from agent.images.containerd import client as client_mod
from agent.images.containerd.protos import leases_pb2
from agent.images.snapshots import snapshotter as snapshots

#: containerd deletes a lease after this time (RFC 3339), whether or not it was released.
LABEL_EXPIRE: Final = "containerd.io/gc.expire"
#: The agent process that holds the lease (``"<pid>:<start time>"``).
LABEL_OWNER: Final = "prefetcher.dev/lease.owner"

#: How long an import's lease lives at most, in seconds, if the agent dies holding it.
DEFAULT_EXPIRE: Final = 3600.0

_SERVICE: Final = "/containerd.services.leases.v1.Leases/"


def protect(client: client_mod.Client, lease: str, resource_id: str, resource_type: str) -> None:
    """Add an existing blob (``"content"``) or snapshot (``"snapshots/<snapshotter>"``) to
    ``lease``, so containerd's GC keeps it while the lease lives.

    An import that finds a blob or a committed snapshot already present protects it *before*
    looking at it: something present but unreferenced (what a failed import leaves) may be
    collected at any moment, and would vanish between "it is there, skip it" and the use
    of it (a parent of the next layer, a child of the manifest). Adding what does not exist is
    harmless.
    """
    client.unary(
        _SERVICE + "AddResource",
        leases_pb2.AddResourceRequest(
            id=lease, resource=leases_pb2.Resource(id=resource_id, type=resource_type)
        ),
        empty_pb2.Empty,
        what=f"leases.AddResource {resource_type} {resource_id}",
    )


@dataclass(frozen=True)
class Lease:
    """One containerd lease."""

    id: str
    labels: Mapping[str, str] = field(default_factory=dict)


class Leases:
    """containerd's leases service in the client's namespace."""

    def __init__(self, client: client_mod.Client):
        self.client = client

    def create(
        self, *, expire: float = DEFAULT_EXPIRE, labels: Mapping[str, str] | None = None
    ) -> str:
        """Create a lease that expires after ``expire`` seconds; returns its ID."""
        until = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=expire)
        all_labels = {
            LABEL_EXPIRE: until.strftime("%Y-%m-%dT%H:%M:%SZ"),
            LABEL_OWNER: snapshots.owner_token(),
            **(labels or {}),
        }
        lease_id = f"prefetcher-{secrets.token_hex(8)}"
        response = self.client.unary(
            _SERVICE + "Create",
            leases_pb2.CreateRequest(id=lease_id, labels=all_labels),
            leases_pb2.CreateResponse,
            what=f"leases.Create {lease_id}",
        )
        return response.lease.id or lease_id

    def delete(self, lease_id: str, *, sync: bool = False) -> None:
        """Delete a lease (``sync``: wait for containerd's GC to run). Missing is fine."""
        with contextlib.suppress(errors.NotFound):
            self.client.unary(
                _SERVICE + "Delete",
                leases_pb2.DeleteRequest(id=lease_id, sync=sync),
                empty_pb2.Empty,
                what=f"leases.Delete {lease_id}",
            )

    def list(self) -> builtins.list[Lease]:
        """Every lease in the namespace."""
        response = self.client.unary(
            _SERVICE + "List", leases_pb2.ListRequest(), leases_pb2.ListResponse
        )
        return [Lease(lease.id, dict(lease.labels)) for lease in response.leases]

    @contextlib.contextmanager
    def held(self, *, expire: float = DEFAULT_EXPIRE) -> Iterator[str]:
        """A lease for the duration of the block; deleted on the way out, also on errors."""
        lease_id = self.create(expire=expire)
        try:
            yield lease_id
        finally:
            with contextlib.suppress(errors.ImageError):
                self.delete(lease_id)

    def cleanup(self) -> builtins.list[str]:
        """Delete the leases of agent processes that are gone; returns their IDs."""
        removed = []
        for lease in self.list():
            owner = lease.labels.get(LABEL_OWNER)
            if owner and not snapshots.owner_alive(owner):
                self.delete(lease.id)
                removed.append(lease.id)
        return removed
