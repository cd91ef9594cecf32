"""Image records name the node runtime's image ID in a field of its own (not as a chain ID),
and a store written before that field existed opens and keeps its records."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from agent.images import digests, records

DIGEST = digests.Digest("sha256:" + "a" * 64)
CONFIG = digests.Digest("sha256:" + "c" * 64)

OLD_SCHEMA = """
CREATE TABLE images (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL, media_type TEXT NOT NULL,
    size INTEGER NOT NULL, manifest_digest TEXT NOT NULL, config_digest TEXT NOT NULL,
    platform TEXT NOT NULL, chain_id TEXT NOT NULL, blobs TEXT NOT NULL,
    created REAL NOT NULL, updated REAL NOT NULL, labels TEXT NOT NULL
)
"""


def record(name: str, **fields: object) -> records.ImageRecord:
    base: dict[str, object] = dict(
        name=name, digest=DIGEST, media_type="application/vnd.oci.image.manifest.v1+json",
        size=10, manifest_digest=DIGEST, config_digest=CONFIG, platform="linux/amd64",
        chain_id="", blobs=(DIGEST, CONFIG),
    )
    return records.ImageRecord(**{**base, **fields})  # type: ignore[arg-type]


def test_the_runtimes_image_id_survives_a_reopen(tmp_path: Path) -> None:
    db = records.ImageRecords(tmp_path / "images.db")
    db.put(record("docker.io/library/app:1", image_id=str(CONFIG)))
    db.close()

    again = records.ImageRecords(tmp_path / "images.db")
    got = again.get("docker.io/library/app:1")
    again.close()
    assert (got.image_id, got.chain_id) == (str(CONFIG), "")


def test_a_store_from_before_the_image_id_opens_with_its_records(tmp_path: Path) -> None:
    path = tmp_path / "images.db"
    old = sqlite3.connect(path)
    old.execute(OLD_SCHEMA)
    old.execute(
        "INSERT INTO images VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
        ("docker.io/library/old:1", str(DIGEST), "m", 10, str(DIGEST), str(CONFIG),
         "linux/amd64", "sha256:" + "e" * 64, f'["{DIGEST}"]', 1.0, 2.0, "{}"),
    )
    old.commit()
    old.close()

    db = records.ImageRecords(path)
    try:
        kept = db.get("docker.io/library/old:1")
        assert (kept.chain_id, kept.image_id, kept.updated) == ("sha256:" + "e" * 64, "", 2.0)
        db.put(record("docker.io/library/new:1", image_id="sha256:" + "f" * 64))
        assert [(r.name, r.image_id) for r in db] == [
            ("docker.io/library/new:1", "sha256:" + "f" * 64),
            ("docker.io/library/old:1", ""),
        ]
    finally:
        db.close()
