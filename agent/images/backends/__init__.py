"""Where pulled images go: the :class:`Backend` protocol and the local store's backend.

* :mod:`.backend` — :class:`Backend`, :class:`RuntimeInfo`, :class:`Unpacking`,
  :class:`Unpacked`.
* :mod:`.local` — :class:`LocalBackend` (the prefetcher's own snapshotter, or content only).

The node runtimes' backends live in their own packages: :mod:`agent.images.containerd`
(``ContainerdBackend``) and :mod:`agent.images.cri` (``CriBackend``).

This facade re-exports the public names; inside the package, import the modules.
"""

from agent.images.backends.backend import Backend, RuntimeInfo, Unpacked, Unpacking
from agent.images.backends.local import LocalBackend, open_store

__all__ = ["Backend", "LocalBackend", "RuntimeInfo", "Unpacked", "Unpacking", "open_store"]
