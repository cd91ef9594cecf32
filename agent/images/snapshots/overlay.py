"""The overlayfs snapshotter: one directory per snapshot, stacked by an ``overlay`` mount.

The directory layout, crash recovery and metadata are :class:`~.directory.DirectorySnapshotter`'s;
this module adds the overlay mounts.
"""

from __future__ import annotations

from pathlib import Path

from agent.images.snapshots import directory, metadata, snapshotter


class OverlaySnapshotter(directory.DirectorySnapshotter):
    """Snapshots stacked by overlayfs: a committed snapshot is a lower dir of its children.

    Mounts:

    * active, no parent — ``bind`` (rw) of its ``fs``;
    * active with parents — ``overlay`` with ``upperdir=fs``, ``workdir=work`` and
      ``lowerdir=`` the parents' ``fs``, nearest first;
    * view of one layer (or none) — read-only ``bind``;
    * view of several — read-only ``overlay`` of the lower dirs only.

    Layers are independent directories, so the snapshotter supports
    :data:`~snapshotter.CAP_REBASE` and wants overlay whiteouts
    (:data:`~snapshotter.CAP_OVERLAY_WHITEOUTS`).
    """

    capabilities = frozenset({snapshotter.CAP_REBASE, snapshotter.CAP_OVERLAY_WHITEOUTS})

    def _populate(self, new: Path, kind: snapshotter.Kind, chain: list[metadata.Record]) -> None:
        if kind is snapshotter.Kind.ACTIVE:
            (new / "work").mkdir(mode=0o711)

    def _mounts(
        self, rec: metadata.Record, chain: list[metadata.Record]
    ) -> list[snapshotter.Mount]:
        lowers = [str(self._fs(p.id)) for p in chain]
        if rec.kind is snapshotter.Kind.ACTIVE:
            if not lowers:
                return [snapshotter.Mount("bind", str(self._fs(rec.id)), ("rw", "rbind"))]
            work = self.snapshots_dir / str(rec.id) / "work"
            return [
                snapshotter.Mount(
                    "overlay",
                    "overlay",
                    (
                        f"workdir={work}",
                        f"upperdir={self._fs(rec.id)}",
                        f"lowerdir={':'.join(lowers)}",
                    ),
                )
            ]
        if rec.kind is snapshotter.Kind.COMMITTED:
            lowers = [str(self._fs(rec.id)), *lowers]
        if not lowers:
            return [snapshotter.Mount("bind", str(self._fs(rec.id)), ("ro", "rbind"))]
        if len(lowers) == 1:
            return [snapshotter.Mount("bind", lowers[0], ("ro", "rbind"))]
        return [snapshotter.Mount("overlay", "overlay", (f"lowerdir={':'.join(lowers)}",))]
