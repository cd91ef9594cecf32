"""Settings → the image service's backend: where the node's prefetched images go.

The edge (the CLI, the node agent) chooses the backend here and hands it to
:class:`~agent.images.service.ImageService`; the service never looks at the setting.

``images.snapshotter``:

* ``overlayfs`` / ``naive`` — the prefetcher's own store under ``runtime.root``
  (:class:`~agent.images.backends.LocalBackend`);
* ``containerd`` — the node's containerd at ``images.containerd.address``
  (:class:`~agent.images.containerd.ContainerdBackend`), checked at start.
"""

from __future__ import annotations

import logging
from pathlib import Path

from agent import config
from agent.images import backends
from agent.images.backends import backend as backend_api

logger = logging.getLogger("agent.runtimes")


def open_backend(settings: config.Settings, *, unpack: bool = True) -> backend_api.Backend:
    """The backend ``settings`` name, started and checked (``unpack=False``: content only).

    Raises:
        InvalidConfiguration: the configured runtime is missing or misconfigured.
    """
    img = settings.images
    if not unpack:
        return backends.LocalBackend(None)
    if img.snapshotter == "containerd":
        return open_containerd(
            img.containerd.address,
            img.containerd.namespace,
            img.containerd.snapshotter,
            max_uncompressed_bytes=img.max_layer_uncompressed_bytes,
        )
    return backends.open_store(Path(settings.runtime.root), img.snapshotter)


def open_containerd(
    address: str, namespace: str, snapshotter: str, *, max_uncompressed_bytes: int
) -> backend_api.Backend:
    """The node's containerd at ``address``, its start-up checks passed."""
    from agent.images.containerd import backend as containerd_backend

    backend = containerd_backend.ContainerdBackend(
        address, namespace, snapshotter, max_uncompressed_bytes=max_uncompressed_bytes
    )
    try:
        backend.check().raise_for_errors()
    except BaseException:
        backend.close()
        raise
    return backend
