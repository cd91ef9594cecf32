"""Snapshots as directories with sqlite metadata: what the overlay and naive snapshotters share.

Layout under ``root``::

    metadata.db                 sqlite (see :mod:`.metadata`)
    snapshots/<id>/fs           the snapshot's own files (for overlay: the upper dir while
                                active, a lower dir once committed)
    snapshots/<id>/work         overlay's work dir (active overlay snapshots with a parent)
    snapshots/new-*             a snapshot being created (renamed to <id> in the transaction)
    snapshots/rm-*              a snapshot being removed

A snapshot's directory is built under ``new-*`` and renamed to its id inside the metadata
transaction that creates the row; a commit only updates the row (the directory keeps its
id), after ``syncfs(2)`` when ``sync_fs`` is on. So a killed process leaves at most a
``new-*``/``rm-*`` directory, a directory without a row, or an active snapshot of a dead
owner: :meth:`DirectorySnapshotter.cleanup` removes each.

Subclasses (:mod:`.overlay`, :mod:`.naive`) differ in how a new snapshot is populated and
in the mounts they return.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

from agent.images import errors
from agent.images.snapshots import metadata, snapshotter
from agent.images.syscalls import syncfs


class DirectorySnapshotter:
    """Snapshots as ``snapshots/<id>/fs`` directories with sqlite metadata.

    Args:
        root: the snapshotter's own directory (created if missing).
        sync_fs: call ``syncfs(2)`` on the snapshot's filesystem in :meth:`commit`, after
            its files were written and before the metadata commit, so a committed snapshot
            is never missing file data after a power loss.
    """

    capabilities: frozenset[str] = frozenset()

    def __init__(self, root: str | os.PathLike[str], *, sync_fs: bool = False):
        self.root = Path(root)
        self.sync_fs = sync_fs
        self.snapshots_dir = self.root / "snapshots"
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        self._meta = metadata.MetaStore(self.root / "metadata.db")

    # -- the protocol -------------------------------------------------------------------

    def stat(self, key: str) -> snapshotter.Info:
        with self._meta.transaction(write=False) as tx:
            return tx.require(key).info()

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[snapshotter.Mount]:
        return self._create(snapshotter.Kind.ACTIVE, key, parent, labels)

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[snapshotter.Mount]:
        return self._create(snapshotter.Kind.VIEW, key, parent, labels)

    def mounts(self, key: str) -> list[snapshotter.Mount]:
        with self._meta.transaction(write=False) as tx:
            rec = tx.require(key)
            chain = tx.chain(rec)
        return self._mounts(rec, chain)

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        *,
        parent: str | None = None,
    ) -> None:
        with self._meta.transaction(write=False) as tx:
            rec = tx.require(key)
            if rec.kind is not snapshotter.Kind.ACTIVE:
                raise errors.NotFound(f"snapshot {key!r} is {rec.kind.value}, not active")
            if tx.get(name) is not None:
                raise errors.AlreadyExists(f"snapshot {name!r} already exists")
        if parent is not None and parent != rec.parent:
            if snapshotter.CAP_REBASE not in self.capabilities:
                raise ValueError(
                    f"{type(self).__name__} cannot give a snapshot a parent at commit"
                    " (it lacks the rebase capability)"
                )
        if self.sync_fs:
            # File data first, then the metadata that says the snapshot is complete.
            syncfs(self._fs(rec.id))
        with self._meta.transaction() as tx:
            tx.commit(key, name, labels, parent)

    def remove(self, key: str) -> None:
        with self._meta.transaction() as tx:
            rec = tx.remove(key)
        self._remove_dir(rec.id)

    def update(self, key: str, labels: Mapping[str, str]) -> snapshotter.Info:
        with self._meta.transaction() as tx:
            return tx.update_labels(key, labels).info()

    def walk(self) -> Iterator[snapshotter.Info]:
        with self._meta.transaction(write=False) as tx:
            records = tx.walk()
        for rec in records:
            yield rec.info()

    def usage(self, key: str) -> snapshotter.Usage:
        with self._meta.transaction(write=False) as tx:
            rec = tx.require(key)
        return _disk_usage(self._fs(rec.id))

    def close(self) -> None:
        self._meta.close()

    # -- housekeeping -------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove what a killed process left behind; returns what was removed.

        Call it at start-up, before this process prepares snapshots: a ``new-*``
        directory of a prepare in progress would be taken for a leftover.

        * active snapshots whose :data:`~snapshotter.LABEL_OWNER` process is gone;
        * ``new-*`` and ``rm-*`` directories, and snapshot directories without a row.
        """
        removed: list[str] = []
        with self._meta.transaction(write=False) as tx:
            records = tx.walk()
        for rec in records:
            owner = rec.labels.get(snapshotter.LABEL_OWNER)
            if rec.kind is snapshotter.Kind.ACTIVE and owner and not snapshotter.owner_alive(owner):
                with contextlib.suppress(errors.NotFound):
                    self.remove(rec.key)
                    removed.append(rec.key)
        with self._meta.transaction(write=False) as tx:
            ids = {str(rec.id) for rec in tx.walk()}
        for entry in os.scandir(self.snapshots_dir):
            if entry.name not in ids:
                _rmtree(Path(entry.path))
                removed.append(entry.name)
        return removed

    # -- for subclasses -----------------------------------------------------------------

    def _populate(self, new: Path, kind: snapshotter.Kind, chain: list[metadata.Record]) -> None:
        """Fill a new snapshot's directory (``new/fs`` exists)."""
        raise NotImplementedError

    def _mounts(
        self, rec: metadata.Record, chain: list[metadata.Record]
    ) -> list[snapshotter.Mount]:
        raise NotImplementedError

    def _fs(self, snapshot_id: int) -> Path:
        return self.snapshots_dir / str(snapshot_id) / "fs"

    # -- internals ----------------------------------------------------------------------

    def _create(
        self,
        kind: snapshotter.Kind,
        key: str,
        parent: str,
        labels: Mapping[str, str] | None,
    ) -> list[snapshotter.Mount]:
        if not key:
            raise ValueError("a snapshot key must not be empty")
        with self._meta.transaction(write=False) as tx:
            if tx.get(key) is not None:
                raise errors.AlreadyExists(f"snapshot {key!r} already exists")
            chain = [tx.committed(parent), *tx.chain(tx.committed(parent))] if parent else []
        new = Path(tempfile.mkdtemp(prefix="new-", dir=self.snapshots_dir))
        try:
            (new / "fs").mkdir(mode=0o755)
            self._populate(new, kind, chain)
            with self._meta.transaction() as tx:
                rec = tx.create(key, parent, kind, labels or {})
                os.rename(new, self.snapshots_dir / str(rec.id))
        except BaseException:
            _rmtree(new)
            raise
        return self._mounts(rec, chain)

    def _remove_dir(self, snapshot_id: int) -> None:
        path = self.snapshots_dir / str(snapshot_id)
        trash = self.snapshots_dir / f"rm-{snapshot_id}"
        try:
            os.rename(path, trash)
        except FileNotFoundError:
            return
        _rmtree(trash)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _disk_usage(path: Path) -> snapshotter.Usage:
    seen: set[int] = set()
    size = inodes = 0
    stack = [os.fspath(path)]
    while stack:
        top = stack.pop()
        with os.scandir(top) as it:
            for entry in it:
                st = entry.stat(follow_symlinks=False)
                if st.st_nlink > 1:
                    if st.st_ino in seen:
                        continue
                    seen.add(st.st_ino)
                inodes += 1
                size += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return snapshotter.Usage(size=size, inodes=inodes)
