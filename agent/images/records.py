"""``ImageRecords``: which images this node has, by name (containerd's image store).

An image record maps a normalised reference (``docker.io/library/alpine:3.20``) to the
descriptor it resolved to, plus what the pull chose and built from it: the platform
manifest, the config, the top snapshot's chain ID, and the node runtime's image ID. Records
live in sqlite (WAL, ``synchronous=FULL``), so a record is only ever written after the
content and snapshots it names are committed, and survives a power cut once written.
Garbage collection starts from these records (and pinned references): whatever no record
reaches is garbage.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from agent.images import digests, errors

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    size INTEGER NOT NULL,
    manifest_digest TEXT NOT NULL,
    config_digest TEXT NOT NULL,
    platform TEXT NOT NULL,
    chain_id TEXT NOT NULL,
    blobs TEXT NOT NULL,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    labels TEXT NOT NULL,
    image_id TEXT NOT NULL DEFAULT ''
)
"""
_ADD_IMAGE_ID = "ALTER TABLE images ADD COLUMN image_id TEXT NOT NULL DEFAULT ''"


@dataclass(frozen=True)
class ImageRecord:
    """One named image on this node."""

    name: str
    digest: digests.Digest
    media_type: str
    #: bytes of all blobs (manifests, config, layers) the image needs, compressed
    size: int
    manifest_digest: digests.Digest
    config_digest: digests.Digest
    platform: str
    #: top snapshot of the image's layers where the prefetcher unpacked them (its store, or
    #: containerd's snapshotter); "": not unpacked by the prefetcher (content only, or a
    #: runtime that pulled the layers itself through the CRI)
    chain_id: str
    #: every blob this image needs: index (if any), manifest, config, layers
    blobs: tuple[digests.Digest, ...]
    created: float = 0.0
    updated: float = 0.0
    labels: dict[str, str] = field(default_factory=dict, compare=False)
    #: the node runtime's ID of the image (the CRI's ``Image.id``, what ``crictl images``
    #: shows); "": the image is not in a runtime (the prefetcher's own store)
    image_id: str = ""


class ImageRecords:
    """The image records of one store root."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One connection shared by the threads that pulls run their writes in: sqlite's
        # connection is not safe for concurrent use, so every use holds this lock.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.execute(_SCHEMA)
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(images)")}
            if "image_id" not in columns:  # a store written before the column existed
                self._db.execute(_ADD_IMAGE_ID)
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def put(self, record: ImageRecord) -> ImageRecord:
        """Create or update the record named ``record.name``; keeps the creation time."""
        now = time.time()
        with self._lock, self._tx():
            row = self._db.execute(
                "SELECT created FROM images WHERE name = ?", (record.name,)
            ).fetchone()
            created = row[0] if row else now
            self._db.execute(
                "INSERT OR REPLACE INTO images VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    record.name,
                    str(record.digest),
                    record.media_type,
                    record.size,
                    str(record.manifest_digest),
                    str(record.config_digest),
                    record.platform,
                    record.chain_id,
                    json.dumps([str(b) for b in record.blobs]),
                    created,
                    now,
                    json.dumps(record.labels, sort_keys=True),
                    record.image_id,
                ),
            )
        return self.get(record.name)

    def get(self, name: str) -> ImageRecord:
        with self._lock:
            row = self._db.execute("SELECT * FROM images WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise errors.NotFound(f"image {name} is not on this node")
        return _record(row)

    def find(self, name: str) -> ImageRecord | None:
        try:
            return self.get(name)
        except errors.NotFound:
            return None

    def delete(self, name: str) -> None:
        with self._lock, self._tx():
            cursor = self._db.execute("DELETE FROM images WHERE name = ?", (name,))
        if cursor.rowcount == 0:
            raise errors.NotFound(f"image {name} is not on this node")

    def __iter__(self) -> Iterator[ImageRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM images ORDER BY name").fetchall()
        return iter([_record(r) for r in rows])

    def _tx(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def _record(row: tuple[object, ...]) -> ImageRecord:
    return ImageRecord(
        name=str(row[0]),
        digest=digests.Digest(str(row[1])),
        media_type=str(row[2]),
        size=int(str(row[3])),
        manifest_digest=digests.Digest(str(row[4])),
        config_digest=digests.Digest(str(row[5])),
        platform=str(row[6]),
        chain_id=str(row[7]),
        blobs=tuple(digests.Digest(b) for b in json.loads(str(row[8]))),
        created=float(str(row[9])),
        updated=float(str(row[10])),
        labels=json.loads(str(row[11])),
        image_id=str(row[12]),
    )
