#!/usr/bin/env python3
"""Where a pull's time goes: each stage of pull+unpack alone, single-threaded, warm cache.

Uses the image pull_unpack.py generated (same --size/--files/--layers/--seed) and this
project's own code for the unpack stages. For every stage prints wall seconds, CPU seconds
(thread time) and throughput over all layers:

  download        GET every layer blob from a fresh loopback docker-registry (httpx, discard)
  download+store  the same, written to a file, sha256 on the fly, fsync at the end
  sha256 blob     hashlib over the compressed blobs
  gunzip          compression.open_layer(...).read(1 MiB) loop (isal, bomb checks)
  sha256 tar      hashlib over the uncompressed stream (diff ID)
  apply           archive.apply(open_layer(blob), dir, overlay whiteouts): the real unpack,
                  i.e. gunzip + diff ID + tar parsing + file creation and writes
  apply - gunzip - sha256 tar    the tar parsing and filesystem syscalls alone
  syncfs          syncfs(2) right after each layer's apply (the --sync-fs cost)

Run as root: python bench/stages.py [--size 1GiB] [--files 20000] [--layers 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import imagegen
import pull_unpack

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fixtures import registries  # noqa: E402

from agent.images import snapshots  # noqa: E402
from agent.images.unpack import archive, compression, whiteouts  # noqa: E402

CHUNK = 1 << 20


class Clock:
    """Accumulated wall and thread-CPU seconds of timed sections."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> Clock:
        self._wall, self._cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._wall
        self.cpu += time.thread_time() - self._cpu


def line(name: str, clock: Clock, nbytes: int) -> None:
    rate = nbytes / clock.wall / (1 << 20) if clock.wall else 0.0
    print(f"{name:<34}{clock.wall:8.2f}s wall{clock.cpu:8.2f}s cpu  {rate:7.0f} MiB/s"
          f"  over {nbytes / (1 << 20):.0f} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=pull_unpack.parse_size, default="1GiB")
    parser.add_argument("--files", type=int, default=20000)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gzip-level", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/prefetcher-bench"))
    args = parser.parse_args()
    params = imagegen.Params(args.size, args.files, args.layers, args.seed, args.gzip_level)
    image = imagegen.build(params, args.workdir / "cache")
    media = imagegen.LAYER_MEDIA_TYPE
    work = Path(tempfile.mkdtemp(prefix="stages-", dir=args.workdir))
    try:
        comp, tar = image.compressed, image.uncompressed
        with registries.start_registry(work / "registry", "none") as registry:
            imagegen.push(registry.url, pull_unpack.REPO, pull_unpack.TAG, image)
            dl, store = Clock(), Clock()
            with httpx.Client(timeout=120) as client:
                for layer in image.layers:
                    url = f"{registry.url}/v2/{pull_unpack.REPO}/blobs/{layer.digest}"

                    def get(url: str = url) -> None:
                        with client.stream("GET", url) as response:
                            for _ in response.iter_raw(CHUNK):
                                pass

                    def get_store(url: str = url) -> None:
                        h = hashlib.sha256()
                        with client.stream("GET", url) as response, open(
                            work / "blob", "wb", buffering=0
                        ) as out:
                            for chunk in response.iter_raw(CHUNK):
                                h.update(chunk)
                                out.write(chunk)
                            os.fsync(out.fileno())

                    with dl:
                        get()
                    with store:
                        get_store()
            line("download", dl, comp)
            line("download+sha256+store+fsync", store, comp)
        os.sync()
        read, sha_blob, gunzip, sha_tar, apply, sync = (Clock() for _ in range(6))
        for layer in image.layers:
            with open(layer.path, "rb") as f:
                while True:
                    with read:
                        data = f.read(CHUNK)
                    if not data:
                        break
                    with sha_blob:
                        hashlib.sha256(data)
            h = hashlib.sha256()
            with open(layer.path, "rb") as f:
                stream = compression.open_layer(f, media)
                while True:
                    with gunzip:
                        data = stream.read(CHUNK)
                    if not data:
                        break
                    with sha_tar:
                        h.update(data)
            target = work / "fs"
            target.mkdir()
            with open(layer.path, "rb") as f, apply:
                archive.apply(compression.open_layer(f, media), target,
                              whiteouts=whiteouts.OVERLAY)
            with sync:
                snapshots.syncfs(target)
            shutil.rmtree(target)
            os.sync()
        line("read blob (page cache)", read, comp)
        line("sha256 blob", sha_blob, comp)
        line("gunzip (isal)", gunzip, tar)
        line("sha256 tar (diff ID)", sha_tar, tar)
        line("apply (real unpack, 1 thread)", apply, tar)
        rest = Clock()
        rest.wall = apply.wall - gunzip.wall - sha_tar.wall
        rest.cpu = apply.cpu - gunzip.cpu - sha_tar.cpu
        line("apply - gunzip - sha256 tar", rest, tar)
        line("syncfs after each layer", sync, tar)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
