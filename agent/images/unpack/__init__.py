"""Layer application: decompress, apply a tar to a root, write whiteouts, unpack images.

* :mod:`.compression` — open a layer blob as its uncompressed stream (gzip, zstd, none),
  with a decompression-bomb limit.
* :mod:`.tar` — read a tar stream as Go's ``archive/tar`` reads it (headers, PAX and GNU
  records, sparse maps); computes the diff ID.
* :mod:`.archive` — apply one layer tar to a directory as containerd applies it, confined
  to it.
* :mod:`.whiteouts` — the overlay and remove whiteout strategies.
* :mod:`.unpacker` — :class:`Unpacker`: all layers of an image into committed snapshots.

This facade re-exports the public names; inside the package, import the modules.
"""

from agent.images.unpack.archive import ApplyResult, apply
from agent.images.unpack.compression import open_layer
from agent.images.unpack.unpacker import Unpacker, UnpackEvent

apply_layer = apply

__all__ = ["ApplyResult", "UnpackEvent", "Unpacker", "apply", "apply_layer", "open_layer"]
