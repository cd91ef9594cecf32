"""A CRI runtime (CRI-O, cri-dockerd, or containerd's CRI plugin) as the image backend: the
agent asks the runtime to pull through the CRI ``ImageService.PullImage`` call on its socket,
with the credentials of the prefetch's pull secrets, so kubelet finds the image present.

* :mod:`.backend` — :class:`CriBackend`.

The CRI messages are those of :mod:`agent.images.containerd.protos` (``cri.proto``: the
``runtime.v1`` package, reduced), and the gRPC channel is containerd's
:class:`~agent.images.containerd.client.Client` (the ``containerd-namespace`` header it adds
is ignored by other runtimes).

This facade re-exports the public names; inside the package, import the modules.
"""

from agent.images.cri.backend import NO_BYTE_PROGRESS, CriBackend

__all__ = ["NO_BYTE_PROGRESS", "CriBackend"]
