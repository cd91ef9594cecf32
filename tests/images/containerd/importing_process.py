"""A child process that imports a generated image into containerd: for the kill -9 tests.

    python importing_process.py ADDRESS NAME [--kill-at KIND:L[:N]]

``--kill-at started:1`` SIGKILLs this process when layer 1's snapshot is prepared
(``progress:L:N`` at layer L's N-th progress event, ``done:L`` right after layer L's
commit). The backend's start-up checks and cleanup run first, as in the agent. Prints the
top chain ID on success.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for fixtures

from fixtures import layers as L  # noqa: E402

from agent.images import containerd, descriptors, digests, mediatypes, references  # noqa: E402
from agent.images.unpack import unpacker  # noqa: E402


def image_tars(files: int = 300) -> list[bytes]:
    tars = []
    for n in range(3):
        layer = L.Layer().dir(f"l{n}")
        for i in range(files):
            layer.file(f"l{n}/f{i:05d}", L.random_bytes(2000 + i % 7 * 1000, seed=n * 100000 + i))
        layer.file("shared", f"layer {n}".encode())
        if n:
            layer.whiteout(f"l{n - 1}/f00000")
        tars.append(layer.tar())
    return tars


def killer(spec: str) -> unpacker.OnProgress | None:
    if not spec:
        return None
    kind, _, rest = spec.partition(":")
    layer, _, nth = rest.partition(":")
    count = 0

    def on_layer(event: unpacker.UnpackEvent) -> None:
        nonlocal count
        if event.kind != kind or event.index != int(layer):
            return
        count += 1
        if not nth or count == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)

    return on_layer


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("address")
    p.add_argument("name")
    p.add_argument("--kill-at", default="")
    args = p.parse_args()

    img = L.image(image_tars(), "gzip")
    manifest = descriptors.Manifest.parse(img.manifest, mediatypes.OCI_MANIFEST)
    target = descriptors.Descriptor(
        mediatypes.OCI_MANIFEST, digests.Digest(L.sha256(img.manifest)), len(img.manifest)
    )
    backend = containerd.ContainerdBackend(args.address)
    try:
        backend.start()
        result = await backend.import_image(
            L.MemoryProvider(img.blobs),  # type: ignore[arg-type]
            references.parse(args.name),
            target,
            manifest,
            manifest.config,
            L.diff_ids_of(img),
            sync_fs=True,
            on_layer=killer(args.kill_at),
        )
    finally:
        backend.close()
    print(result.chain_id)


if __name__ == "__main__":
    asyncio.run(main())
