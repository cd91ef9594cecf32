"""A blob's body is read from the socket in reads of up to ``client.READ_BYTES``, not
httpcore's 64 KiB: every read costs Python time in the thread that also hands the layers'
bytes to the threads applying them (measured in bench/README.md, session 6). Against the
real registry over loopback, where the bytes wait in the socket faster than they are read."""

from __future__ import annotations

from fixtures import images
from fixtures.registries import Registry

from agent.images import descriptors, digests, references
from agent.images.registry import client, hosts


async def test_a_blob_arrives_in_reads_larger_than_httpcores_own(registry: Registry) -> None:
    image = images.Image([images.random_layer(6_000_000, files=1, seed=7)])
    images.push(registry, "reads/app", "1", image)
    blob = image.blobs[1]
    desc = descriptors.Descriptor(
        media_type=blob.media_type, digest=digests.Digest(blob.digest), size=len(blob.data)
    )
    ref = references.parse(f"{registry.host}/reads/app:1")

    async with client.RegistryClient(hosts.RegistryHosts(None)) as rc:
        async with rc.open_blob(ref, desc) as body:
            sizes = [len(chunk) async for chunk in body.chunks()]

    assert sum(sizes) == len(blob.data)
    assert max(sizes) > 64 * 1024  # httpcore reads 64 KiB at a time unless told otherwise
    assert max(sizes) <= client.READ_BYTES
