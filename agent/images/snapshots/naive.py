"""The naive snapshotter: every snapshot is a full copy of its parent, mounted by ``bind``.

For hosts (and tests) without overlayfs. Preparing a snapshot on a parent copies the
parent's tree with ``cp -a`` (owners, modes, xattrs, hardlinks, devices; reflinks where the
filesystem has them); layers are then applied on top with the *remove* whiteout strategy.
A view is a read-only bind of its parent's directory. It has no capabilities: no rebase,
no overlay whiteouts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from agent.images.snapshots import directory, metadata, snapshotter


class NaiveSnapshotter(directory.DirectorySnapshotter):
    """Copy-based snapshots under ``root`` (same layout and metadata as the overlay one)."""

    capabilities: frozenset[str] = frozenset()

    def _populate(self, new: Path, kind: snapshotter.Kind, chain: list[metadata.Record]) -> None:
        if kind is not snapshotter.Kind.ACTIVE or not chain:
            return
        source = self._fs(chain[0].id)
        proc = subprocess.run(
            ["cp", "-a", "--reflink=auto", "--", f"{source}/.", f"{new / 'fs'}/"],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            raise OSError(f"copying snapshot {chain[0].key!r}: {proc.stderr.strip()}")

    def _mounts(
        self, rec: metadata.Record, chain: list[metadata.Record]
    ) -> list[snapshotter.Mount]:
        if rec.kind is snapshotter.Kind.ACTIVE:
            return [snapshotter.Mount("bind", str(self._fs(rec.id)), ("rw", "rbind"))]
        if rec.kind is snapshotter.Kind.VIEW and chain:
            return [snapshotter.Mount("bind", str(self._fs(chain[0].id)), ("ro", "rbind"))]
        return [snapshotter.Mount("bind", str(self._fs(rec.id)), ("ro", "rbind"))]
