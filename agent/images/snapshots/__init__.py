"""Snapshots: layered filesystems named by keys and chain IDs.

* :mod:`.snapshotter` — the :class:`Snapshotter` protocol (vocabulary and lifecycle in its
  docstring), :class:`Kind`, :class:`Info`, :class:`Usage`, :class:`Mount`.
* :mod:`.metadata` — the sqlite store of snapshot rows.
* :mod:`.directory` — :class:`~.directory.DirectorySnapshotter`, what the two below share
  (layout, crash recovery, metadata).
* :mod:`.overlay` — :class:`OverlaySnapshotter` (overlayfs).
* :mod:`.naive` — :class:`NaiveSnapshotter` (full copies, for hosts without overlayfs).

This facade re-exports the public names; inside the package, import the modules.
"""

from agent.images.snapshots.naive import NaiveSnapshotter
from agent.images.snapshots.overlay import OverlaySnapshotter
from agent.images.snapshots.snapshotter import (
    CAP_OVERLAY_WHITEOUTS,
    CAP_REBASE,
    LABEL_OWNER,
    Info,
    Kind,
    Mount,
    Snapshotter,
    Usage,
    mount_all,
    unmount,
)
from agent.images.syscalls import syncfs

__all__ = [
    "CAP_OVERLAY_WHITEOUTS",
    "CAP_REBASE",
    "LABEL_OWNER",
    "Info",
    "Kind",
    "Mount",
    "NaiveSnapshotter",
    "OverlaySnapshotter",
    "Snapshotter",
    "Usage",
    "mount_all",
    "syncfs",
    "unmount",
]
