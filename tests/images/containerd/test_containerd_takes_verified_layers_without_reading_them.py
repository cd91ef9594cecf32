"""A layer the prefetcher wrote into containerd's ingest and verified is committed without
containerd reading it back: where containerd shares content across namespaces (its default
``content_sharing_policy``), the verified file becomes the blob as containerd's own commit
makes it (flushed, ``blobs/sha256/<hex>``, read-only) and containerd records it with the
layer's labels. Hashing the layer a second time would take containerd's CPU away from the
unpack running beside it.

Where containerd keeps namespaces' content apart (``isolated``), and when the blob is gone
before containerd records it (its garbage collector removes blobs no namespace records),
containerd verifies the bytes itself, as before: the layer still ends committed and whole.

Real containerd 1.6 (one with the default policy, one started ``isolated``), real registry.
How much containerd read is its own ``/proc/<pid>/io`` count (``rchar``).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
from pathlib import Path

import pytest
from fixtures import images
from fixtures.registries import Registry

from agent.images import containerd, digests, service
from agent.images.containerd import ingests
from agent.images.registry import client, hosts
from tests.images.containerd.test_layers_stream_into_containerd_as_they_download import (
    active_ingests,
)
from tests.images.pulling import FAST_RETRY
from tests.images.test_unpack_while_downloading import AMD64

from .conftest import CTR, Containerd, started_containerd

ISOLATED = """
[plugins."io.containerd.metadata.v1.bolt"]
  content_sharing_policy = "isolated"
"""


def containerd_read(ctrd: Containerd) -> int:
    """Bytes containerd's process has read so far (files and sockets)."""
    with open(f"/proc/{ctrd.pid}/io") as f:
        for line in f:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    raise AssertionError(f"no rchar in /proc/{ctrd.pid}/io")


def blob_from_containerd(ctrd: Containerd, digest: digests.Digest) -> bytes:
    """The blob as containerd serves it (``ctr content get``)."""
    assert CTR is not None
    return subprocess.run(
        [CTR, "-a", ctrd.address, "-n", "k8s.io", "content", "get", str(digest)],
        capture_output=True, check=True, timeout=60,
    ).stdout


def content_line(ctrd: Containerd, digest: digests.Digest) -> str:
    lines = [line for line in ctrd.ctr("content", "ls").stdout.splitlines()
             if line.startswith(str(digest))]
    assert len(lines) == 1, lines
    return lines[0]


async def pull(
    registry: Registry, name: str, backend: containerd.ContainerdBackend, root: Path
) -> service.PullResult:
    async with client.RegistryClient(hosts.RegistryHosts(None), retry=FAST_RETRY) as rc:
        svc = service.ImageService(root, rc, backend=backend)
        try:
            return await svc.pull(f"{registry.host}/{name}", platform=AMD64)
        finally:
            svc.close()


def layer_image(seed: int) -> tuple[images.Image, images.Layer]:
    layer = images.random_layer(3_000_000, files=3, seed=seed)
    return images.Image([layer]), layer


def assert_committed_whole(ctrd: Containerd, layer: images.Layer) -> None:
    line = content_line(ctrd, layer.digest)
    assert f"containerd.io/uncompressed={layer.diff_id}" in line
    assert "containerd.io/distribution.source." in line
    assert blob_from_containerd(ctrd, layer.digest) == layer.data
    assert active_ingests(ctrd) == []
    blob = (ctrd.root / "io.containerd.content.v1.content" / "blobs" / "sha256"
            / digests.Digest(layer.digest).hex)
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444  # as containerd leaves its blobs


async def test_containerd_records_a_verified_layer_without_reading_it_again(
    ctrd: Containerd, registry: Registry, tmp_root: Path
) -> None:
    image, layer = layer_image(seed=1401)
    images.push(registry, "takes/shared", "1", image)
    backend = ctrd.backend()
    backend.start()
    assert ingests.shares_content(backend.client)  # containerd's default policy

    before = containerd_read(ctrd)
    result = await pull(registry, "takes/shared:1", backend, tmp_root)
    read = containerd_read(ctrd) - before

    assert ctrd.snapshots().get(result.chain_id) == "Committed"
    assert read < layer.size // 2, f"containerd read {read} bytes of a {layer.size}-byte layer"
    assert_committed_whole(ctrd, layer)


async def test_an_isolated_containerd_verifies_the_layer_itself(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, tmp_root: Path
) -> None:
    image, layer = layer_image(seed=1402)
    images.push(registry, "takes/isolated", "1", image)
    with started_containerd(tmp_path_factory.mktemp("iso"), ISOLATED) as ctrd:
        backend = ctrd.backend()
        backend.start()
        try:
            assert not ingests.shares_content(backend.client)
            before = containerd_read(ctrd)
            result = await pull(registry, "takes/isolated:1", backend, tmp_root)
            read = containerd_read(ctrd) - before

            assert ctrd.snapshots().get(result.chain_id) == "Committed"
            assert read >= layer.size  # it hashed the ingest file before committing
            assert_committed_whole(ctrd, layer)
        finally:
            backend.close()


async def test_a_blob_collected_before_containerd_records_it_is_sent_to_containerd(
    ctrd: Containerd, registry: Registry, tmp_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image, layer = layer_image(seed=1403)
    images.push(registry, "takes/collected", "1", image)
    publish = ingests.IngestWriter._publish
    removed: list[Path] = []

    def publish_then_collect(writer: ingests.IngestWriter) -> None:
        publish(writer)
        # containerd's garbage collector removes a blob file no namespace records.
        blob = writer._owner.root / "blobs" / "sha256" / digests.Digest(layer.digest).hex
        os.unlink(blob)
        removed.append(blob)

    monkeypatch.setattr(ingests.IngestWriter, "_publish", publish_then_collect)
    backend = ctrd.backend()
    backend.start()
    before = containerd_read(ctrd)
    result = await pull(registry, "takes/collected:1", backend, tmp_root)
    read = containerd_read(ctrd) - before

    assert removed
    assert ctrd.snapshots().get(result.chain_id) == "Committed"
    assert read >= layer.size  # the bytes went to containerd over the Write stream
    assert_committed_whole(ctrd, layer)


def test_a_blob_is_sent_from_its_start_whatever_its_sources_position(
    ctrd: Containerd,
) -> None:
    # A commit retried after containerd said the ref was locked reads a new duplicate of the
    # ingest's descriptor, which shares the position the earlier try left; containerd asks
    # for the blob from byte 0.
    data = os.urandom(300_000)
    digest = digests.Digest(f"sha256:{hashlib.sha256(data).hexdigest()}")
    source = io.BytesIO(data)
    source.seek(200_000)
    backend = ctrd.backend()
    try:
        assert backend.content.write("test-from-start", source, len(data), digest,
                                     {"containerd.io/gc.root": "test"})
        assert blob_from_containerd(ctrd, digest) == data
    finally:
        ctrd.ctr("content", "rm", str(digest), check=False)
        backend.close()
