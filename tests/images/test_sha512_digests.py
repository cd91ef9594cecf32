"""sha512 digests are verified with SHA-512 wherever bytes are checked: the store's commit,
the reader that follows a download, and a manifest fetched by digest.

The real registry (distribution 2.8) takes sha512 blob uploads and serves them by that digest,
and accepts a manifest whose config and layers are named by sha512; it refuses to store a
manifest *by* a sha512 digest, so that case talks to an in-process fake.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fixtures import images
from fixtures.registries import Registry

from agent.images import descriptors, digests, errors, mediatypes, references
from agent.images.content import local
from agent.images.registry import client, hosts
from tests.images.pulling import FAST_RETRY, pull

AMD64 = descriptors.Platform("linux", "amd64")


def sha512(data: bytes) -> str:
    return "sha512:" + hashlib.sha512(data).hexdigest()


@dataclass(frozen=True)
class Sha512Blob:
    """A blob addressed by its SHA-512 (what the fixtures' pusher needs of a blob)."""

    media_type: str
    data: bytes

    @property
    def digest(self) -> str:
        return sha512(self.data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": len(self.data)}


async def test_an_image_whose_blobs_are_named_by_sha512_is_pulled_and_unpacked(
    registry: Registry, tmp_root: Path
) -> None:
    layer = images.layer({"etc/motd": "sha512 all the way\n"})
    config = Sha512Blob(mediatypes.OCI_CONFIG, images.canonical_json({
        "os": "linux", "architecture": "amd64",
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},  # diff IDs stay sha256
    }))
    blob = Sha512Blob(mediatypes.OCI_LAYER_GZIP, layer.data)
    manifest = images.Blob(mediatypes.OCI_MANIFEST, images.canonical_json({
        "schemaVersion": 2, "mediaType": mediatypes.OCI_MANIFEST,
        "config": config.descriptor(), "layers": [blob.descriptor()],
    }))
    pusher = images.Pusher(registry.url, "digests/sha512", None)
    try:
        pusher.blob(config)  # type: ignore[arg-type]
        pusher.blob(blob)  # type: ignore[arg-type]
        pusher.manifest(manifest, "1")
    finally:
        pusher.close()

    result = await pull(
        tmp_root, f"{registry.host}/digests/sha512:1", platform=AMD64, snapshotter="naive"
    )

    assert result.config_digest == config.digest
    stored = tmp_root / "content" / "blobs" / "sha512"
    assert {p.name for p in stored.iterdir()} == {
        config.digest.split(":")[1], blob.digest.split(":")[1]
    }
    assert result.chain_id == layer.diff_id


def test_a_store_commit_checks_a_sha512_digest_with_sha512(tmp_path: Path) -> None:
    store = local.LocalStore(tmp_path)
    data = b"bytes named by their sha512"
    good = digests.Digest(sha512(data))

    with store.writer(str(good), total=len(data)) as writer:  # a pull names ingests so
        writer.write(data)
        writer.commit(len(data), good)
    with store.writer("some-upload", total=len(data)) as writer:  # any other name
        writer.write(data + b"!")
        writer.truncate(len(data))
        with pytest.raises(errors.AlreadyExists):
            writer.commit(len(data), good)

    assert store.read_blob(good) == data
    wrong = digests.Digest(sha512(b"other bytes"))
    with store.writer(str(wrong), total=len(data)) as writer:
        writer.write(data)
        with pytest.raises(errors.DigestMismatch, match=f"hashes to {good}"):
            writer.commit(len(data), wrong)


def test_a_reader_following_a_sha512_download_confirms_it(tmp_path: Path) -> None:
    store = local.LocalStore(tmp_path)
    data = b"followed while it downloads" * 100
    digest = digests.Digest(sha512(data))
    writer = store.writer(str(digest), total=len(data))
    reader = writer.follow(len(data), digest).reader()
    writer.write(data)
    writer.commit(len(data), digest)
    assert reader.read(len(data)) == data
    assert reader.confirm() is True  # committed, and read with no rewrite under it
    reader.close()


async def test_a_manifest_fetched_by_a_sha512_digest_is_verified_with_sha512() -> None:
    manifest = images.canonical_json({"schemaVersion": 2, "config": {}, "layers": []})
    good = sha512(manifest)

    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=httpx.ByteStream(manifest), headers={
            "Content-Type": mediatypes.OCI_MANIFEST, "Content-Length": str(len(manifest)),
        })

    async with client.RegistryClient(
        hosts.RegistryHosts(None), retry=FAST_RETRY, transport=httpx.MockTransport(handle)
    ) as rc:
        desc, data = await rc.fetch_manifest(references.parse(f"registry.test/a/b@{good}"))
        assert (desc.digest, data) == (good, manifest)
        other = sha512(b"something else")
        with pytest.raises(errors.DigestMismatch, match=f"hashes to {good}"):
            await rc.fetch_manifest(references.parse(f"registry.test/a/b@{other}"))

