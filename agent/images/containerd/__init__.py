"""The node's containerd as a snapshot and content backend: prefetched images land in
containerd's own content store and snapshotter, registered as the CRI plugin registers its
pulls, so kubelet finds them present and starts pods with zero pull.

* :mod:`.client` — :class:`Client`: the gRPC channel over containerd's unix socket, the
  ``containerd-namespace`` / ``containerd-lease`` headers, gRPC status → :mod:`errors`.
* :mod:`.snapshotter` — :class:`ContainerdSnapshotter`: the
  :class:`~agent.images.snapshots.Snapshotter` protocol on containerd's snapshots service.
* :mod:`.content` — :class:`ContainerdContent`: blobs in containerd, with its GC labels.
* :mod:`.images` — :class:`ContainerdImages`: image records with the CRI's names and labels.
* :mod:`.leases` — :class:`Leases`: one lease held for a whole import.
* :mod:`.checks` — start-up checks with clear messages (:func:`checks.run`).
* :mod:`.backend` — :class:`ContainerdBackend`: ``import_image()``, the one entry point.

gRPC stubs: no maintained PyPI package carries containerd's API for current ``protobuf``
(the old ``containerd`` package imports only with the pure-Python protobuf runtime). This
project writes the few messages and services it calls in ``protos/*.proto`` — same package
names and field numbers as containerd's ``api/`` and the CRI's ``api.proto``, so the wire
format matches — and commits the modules ``protoc`` generates from them
(``protos/*_pb2.py`` and ``*_pb2.pyi``). Running the agent needs only ``protobuf`` and
``grpcio``; ``grpcio-tools`` is needed only to regenerate them
(``python -m agent.images.containerd.protos.generate``), and a test fails when they are
stale. Services are called by method path through the channel (no ``_pb2_grpc`` modules,
which would pin ``grpcio`` to the generator's version).

This facade re-exports the public names; inside the package, import the modules.
"""

from agent.images.containerd.backend import ContainerdBackend, ImportResult
from agent.images.containerd.checks import Finding, Report
from agent.images.containerd.client import Client, ContainerdError
from agent.images.containerd.content import ContainerdContent
from agent.images.containerd.images import ContainerdImages, cri_names
from agent.images.containerd.leases import Leases
from agent.images.containerd.snapshotter import ContainerdSnapshotter

__all__ = [
    "Client",
    "ContainerdBackend",
    "ContainerdContent",
    "ContainerdError",
    "ContainerdImages",
    "ContainerdSnapshotter",
    "Finding",
    "ImportResult",
    "Leases",
    "Report",
    "cri_names",
]
