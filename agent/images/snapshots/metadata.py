"""Snapshot metadata in sqlite: ids, keys/names, parents, kinds, labels and timestamps.

One row per snapshot. The row's ``id`` names the snapshot's directory
(``snapshots/<id>``) and never changes, so a commit is only a row update: the key becomes the
name and the kind becomes committed. Every operation is one transaction
(``BEGIN IMMEDIATE`` … ``COMMIT``); the database runs in WAL mode with
``synchronous=FULL``, so a returned commit is on disk.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from agent.images import errors
from agent.images.snapshots import snapshotter

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    key     TEXT NOT NULL UNIQUE,
    parent  TEXT NOT NULL DEFAULT '',
    kind    TEXT NOT NULL,
    labels  TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_parent ON snapshots(parent);
"""


@dataclass(frozen=True)
class Record:
    """One snapshot row."""

    id: int
    key: str
    parent: str
    kind: snapshotter.Kind
    labels: dict[str, str]
    created: float
    updated: float

    def info(self) -> snapshotter.Info:
        return snapshotter.Info(
            name=self.key,
            parent=self.parent,
            kind=self.kind,
            labels=dict(self.labels),
            created=self.created,
            updated=self.updated,
        )


class Transaction:
    """Operations inside one transaction. Obtained from :meth:`MetaStore.transaction`."""

    def __init__(self, conn: sqlite3.Connection):
        self._conn = conn

    def get(self, key: str) -> Record | None:
        row = self._conn.execute(
            "SELECT id, key, parent, kind, labels, created, updated FROM snapshots WHERE key = ?",
            (key,),
        ).fetchone()
        return _record(row) if row else None

    def require(self, key: str) -> Record:
        rec = self.get(key)
        if rec is None:
            raise snapshotter.not_found(key)
        return rec

    def committed(self, name: str) -> Record:
        rec = self.get(name)
        if rec is None or rec.kind is not snapshotter.Kind.COMMITTED:
            raise errors.NotFound(f"parent snapshot {name!r} does not exist or is not committed")
        return rec

    def chain(self, rec: Record) -> list[Record]:
        """``rec``'s committed ancestors, nearest first."""
        out: list[Record] = []
        parent = rec.parent
        while parent:
            p = self.committed(parent)
            out.append(p)
            parent = p.parent
        return out

    def create(
        self, key: str, parent: str, kind: snapshotter.Kind, labels: Mapping[str, str]
    ) -> Record:
        if parent:
            self.committed(parent)
        if self.get(key) is not None:
            raise errors.AlreadyExists(f"snapshot {key!r} already exists")
        now = time.time()
        cur = self._conn.execute(
            "INSERT INTO snapshots (key, parent, kind, labels, created, updated)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (key, parent, kind.value, json.dumps(dict(labels)), now, now),
        )
        assert cur.lastrowid is not None
        return Record(cur.lastrowid, key, parent, kind, dict(labels), now, now)

    def commit(
        self,
        key: str,
        name: str,
        labels: Mapping[str, str] | None,
        parent: str | None,
    ) -> Record:
        rec = self.require(key)
        if rec.kind is not snapshotter.Kind.ACTIVE:
            raise errors.NotFound(f"snapshot {key!r} is {rec.kind.value}, not active")
        if self.get(name) is not None:
            raise errors.AlreadyExists(f"snapshot {name!r} already exists")
        new_parent = rec.parent
        if parent is not None and parent != rec.parent:
            if rec.parent:
                raise errors.NotFound(
                    f"snapshot {key!r} already has the parent {rec.parent!r};"
                    " only a snapshot prepared without a parent can be rebased"
                )
            if parent:
                self.committed(parent)
            new_parent = parent
        new_labels = dict(rec.labels if labels is None else labels)
        new_labels.pop(snapshotter.LABEL_OWNER, None)
        now = time.time()
        self._conn.execute(
            "UPDATE snapshots SET key = ?, parent = ?, kind = ?, labels = ?, updated = ?"
            " WHERE id = ?",
            (
                name,
                new_parent,
                snapshotter.Kind.COMMITTED.value,
                json.dumps(new_labels),
                now,
                rec.id,
            ),
        )
        return Record(
            rec.id, name, new_parent, snapshotter.Kind.COMMITTED, new_labels, rec.created, now
        )

    def update_labels(self, key: str, labels: Mapping[str, str]) -> Record:
        rec = self.require(key)
        now = time.time()
        self._conn.execute(
            "UPDATE snapshots SET labels = ?, updated = ? WHERE id = ?",
            (json.dumps(dict(labels)), now, rec.id),
        )
        return Record(rec.id, rec.key, rec.parent, rec.kind, dict(labels), rec.created, now)

    def children(self, name: str) -> list[str]:
        rows = self._conn.execute("SELECT key FROM snapshots WHERE parent = ?", (name,))
        return [r[0] for r in rows]

    def remove(self, key: str) -> Record:
        rec = self.require(key)
        kids = self.children(key) if rec.kind is snapshotter.Kind.COMMITTED else []
        if kids:
            raise errors.Unavailable(
                f"snapshot {key!r} is the parent of {len(kids)} other snapshot(s)"
                f" ({', '.join(sorted(kids)[:3])}); remove those first"
            )
        self._conn.execute("DELETE FROM snapshots WHERE id = ?", (rec.id,))
        return rec

    def walk(self) -> list[Record]:
        rows = self._conn.execute(
            "SELECT id, key, parent, kind, labels, created, updated FROM snapshots ORDER BY id"
        ).fetchall()
        return [_record(r) for r in rows]


def _record(row: tuple[int, str, str, str, str, float, float]) -> Record:
    return Record(
        id=row[0],
        key=row[1],
        parent=row[2],
        kind=snapshotter.Kind(row[3]),
        labels=json.loads(row[4]),
        created=row[5],
        updated=row[6],
    )


class MetaStore:
    """The sqlite database of one snapshotter. Thread-safe (one connection, one lock)."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Transaction]:
        """One transaction: committed when the block ends, rolled back on an exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Transaction(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._conn.close()
