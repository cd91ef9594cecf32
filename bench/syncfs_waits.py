#!/usr/bin/env python3
"""How long the unpacker's commits wait for ``syncfs`` (issue 13), on a cached bench image.

    .venv/bin/python bench/syncfs_waits.py CACHE_DIR [--modes nosync,sync,barriers] [--settle S]

``CACHE_DIR`` is an image directory under ``/var/tmp/prefetcher-bench/cache/`` made by
``pull_unpack.py`` (or ``imagegen.py``). Each mode unpacks its layers from disk into a fresh
local overlay store (page cache dropped first, root), and prints the wall time and, per
layer, how long its commit waited for the ``syncfs`` that must precede it. With the syncer
those waits are what ``--sync-fs`` can add to a pull's critical path, whatever the machine's
load does to the wall times. Modes: ``nosync``; ``sync`` (the syncer as it is: a ``syncfs``
before each commit and early ones every ``syncer.BACKGROUND_BYTES`` written); ``barriers``
(only the ``syncfs`` before each commit). ``--settle`` waits that long after deleting the
previous run's files (ext4 without a journal is slower to create files for ~30 s after a
large delete).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from typing import BinaryIO

from agent.images import descriptors, digests, snapshots
from agent.images.unpack import readahead, syncer, unpacker

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"


class _Files:
    def __init__(self, paths: dict[str, Path]):
        self.paths = paths

    def open_blob(self, digest: digests.Digest) -> BinaryIO:
        return open(self.paths[str(digest)], "rb")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cache", type=Path)
    p.add_argument("--modes", default="nosync,sync,nosync,sync")
    p.add_argument("--settle", type=float, default=0.0, metavar="SECONDS")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/prefetcher-syncfs-waits"))
    args = p.parse_args()
    layers = json.loads((args.cache / "meta.json").read_text())["layers"]
    descs = [descriptors.Descriptor(LAYER_MEDIA_TYPE, digests.Digest(x["digest"]), x["size"])
             for x in layers]
    diff_ids = [digests.Digest(x["diff_id"]) for x in layers]
    blobs = _Files({x["digest"]: args.cache / f"layer-{i}.tar.gz" for i, x in enumerate(layers)})
    real_commit = unpacker.Unpacker._commit
    waits: list[float] = []

    def timed_commit(self: unpacker.Unpacker, *a: object) -> None:
        applied = a[3]
        started = time.monotonic()
        if applied.synced is not None:  # type: ignore[attr-defined]
            applied.synced.result()  # type: ignore[attr-defined]
        waits.append(time.monotonic() - started)
        real_commit(self, *a)  # type: ignore[arg-type]

    unpacker.Unpacker._commit = timed_commit  # type: ignore[method-assign]
    readahead.tune_interpreter()  # as the image service does
    real_syncer = syncer.Syncer

    class BarriersOnly(real_syncer):  # type: ignore[valid-type,misc]
        def __init__(self) -> None:
            super().__init__(background_bytes=1 << 62)

    modes = args.modes.split(",")
    for mode in modes:
        if mode not in ("nosync", "sync", "barriers"):
            p.error(f"--modes: unknown mode {mode!r} (nosync, sync, barriers)")
    for mode in modes:
        root = args.workdir / mode
        shutil.rmtree(root, ignore_errors=True)
        os.sync()
        time.sleep(args.settle)
        os.sync()
        syncer.Syncer = BarriersOnly if mode == "barriers" else real_syncer  # type: ignore[misc]
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        sn = snapshots.OverlaySnapshotter(root)
        waits.clear()
        started, cpu = time.monotonic(), os.times()
        try:
            unpacker.Unpacker(blobs, sn, sync_fs=mode != "nosync").unpack_blocking(
                descs, diff_ids)
            wall, cpu_after = time.monotonic() - started, os.times()
        finally:
            sn.close()
            shutil.rmtree(root, ignore_errors=True)
        print(f"{mode:<8} {wall:6.2f}s  user {cpu_after.user - cpu.user:5.2f}"
              f"  sys {cpu_after.system - cpu.system:5.2f}  commit waits for syncfs: "
              + " ".join(f"{w:.2f}" for w in waits) + f"  (sum {sum(waits):.2f}s)", flush=True)


if __name__ == "__main__":
    main()
