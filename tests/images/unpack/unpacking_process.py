"""A child process that unpacks a generated image: for the strace and crash tests.

    python unpacking_process.py ROOT [--sync-fs unpacker|snapshotter] [--kill-at KIND:N]
        [--files N] [--cleanup]

``--kill-at started:1`` SIGKILLs this process at the first ``started`` event of layer 1
(``progress:L:N`` at layer L's N-th progress event, ``done:L`` after layer L's commit).
Prints the top chain ID on success.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # tests/, for fixtures

from fixtures import layers as L  # noqa: E402

from agent.images import snapshots  # noqa: E402
from agent.images.unpack import unpacker  # noqa: E402


def image_tars(files: int) -> list[bytes]:
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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--sync-fs", choices=["unpacker", "snapshotter"], default=None)
    p.add_argument("--kill-at", default="")
    p.add_argument("--files", type=int, default=200)
    p.add_argument("--cleanup", action="store_true")
    args = p.parse_args()

    img = L.image(image_tars(args.files), "gzip")
    sn = snapshots.OverlaySnapshotter(args.root, sync_fs=args.sync_fs == "snapshotter")
    if args.cleanup:
        for removed in sn.cleanup():
            print("removed", removed, file=sys.stderr)

    counts: dict[tuple[str, int], int] = {}

    def on_progress(event: unpacker.UnpackEvent) -> None:
        k = (event.kind, event.index)
        counts[k] = counts.get(k, 0) + 1
        here = f"{event.kind}:{event.index}"
        if args.kill_at in (here, f"{here}:{counts[k]}"):
            os.kill(os.getpid(), signal.SIGKILL)

    u = unpacker.Unpacker(
        L.MemoryProvider(img.blobs),
        sn,
        sync_fs=args.sync_fs == "unpacker",
        concurrency=1,
        on_progress=on_progress,
    )
    print(u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img)))


if __name__ == "__main__":
    main()
