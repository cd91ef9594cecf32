#!/usr/bin/env python3
"""A/B two variants of one pull by alternating them, run after run (issue 13, session 9).

    .venv/bin/python bench/alternate.py --shape 1g --mode local --pairs 4 --b-args=--sync-fs
    .venv/bin/python bench/alternate.py --shape 190m --mode containerd --pairs 5 \\
        --b-prefetcher /path/to/other/checkout/prefetcher

Variant A is ``prefetcher pull`` as ``--a-prefetcher`` (default: this checkout's) with
``--a-args``; variant B the same with ``--b-prefetcher`` / ``--b-args``. Runs go A, B, A, B…
on one fresh filesystem (``--filesystem``, as in ``pull_unpack.py``) with the page cache
dropped and ``--settle`` seconds before each, so both variants see the same machine state,
which on a shared VM drifts by tens of percent between one invocation of ``pull_unpack.py``
and the next (bench/README.md, session 9). Prints each pair and the median of the per-pair
ratios B/A, the number to judge a small change by. ``--mode containerd`` pulls into a fresh
private containerd per run (as ``pull_unpack.py``'s ``ours-containerd``). Run as root.

To compare two checkouts, give ``--b-prefetcher`` a wrapper that puts the other checkout
first on the path, e.g.::

    #!/bin/sh
    PYTHONPATH=/path/to/other exec /path/to/.venv/bin/python -P -m agent "$@"
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import imagegen
import pull_unpack as pu

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures import registries  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(pu.SHAPES), default="190m")
    p.add_argument("--mode", choices=("local", "containerd"), default="local")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--a-prefetcher", default=str(pu.REPO_ROOT / ".venv" / "bin" / "prefetcher"))
    p.add_argument("--b-prefetcher", default="")
    p.add_argument("--a-args", default="", help="extra pull arguments for A (shell words)")
    p.add_argument("--b-args", default="", help="extra pull arguments for B (shell words)")
    p.add_argument("--filesystem", choices=pu.FILESYSTEMS, default="ext4")
    p.add_argument("--settle", type=float, default=31.0, help="seconds before each run")
    p.add_argument("--workdir", type=Path, default=Path("/var/tmp/prefetcher-bench"))
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        p.error("run as root (overlay whiteouts, containerd, drop_caches)")
    if args.pairs < 1:
        p.error("--pairs must be at least 1")
    variants = {
        "A": (args.a_prefetcher, shlex.split(args.a_args)),
        "B": (args.b_prefetcher or args.a_prefetcher, shlex.split(args.b_args)),
    }
    if variants["A"] == variants["B"]:
        p.error("A and B are the same: give --b-prefetcher or --b-args")

    size, files, layers = pu.SHAPES[args.shape]
    params = imagegen.Params(pu.parse_size(size), files, layers)
    args.workdir.mkdir(parents=True, exist_ok=True)
    image = pu.build_image(params, args.workdir / "cache")
    children = pu.Children()
    pu.SETTLE_SECONDS = args.settle
    walls: dict[str, list[float]] = {"A": [], "B": []}
    try:
        with pu.filesystem_for_runs(args.filesystem, args.workdir,
                                    pu.filesystem_size(image)) as fs_dir:
            run_dir = Path(tempfile.mkdtemp(prefix="alternate-", dir=fs_dir))
            with registries.start_registry(run_dir / "registry", "none") as registry:
                imagegen.push(registry.url, pu.REPO, pu.TAG, image)
                config = run_dir / "prefetcher.toml"
                config.write_text("")
                env = pu.child_env()
                setup = pu.Setup(run_dir, f"{registry.host}/{pu.REPO}:{pu.TAG}", "",
                                 "containerd", "ctr", sys.executable, config, True,
                                 image.entries, len(image.layers), children, env)
                for i in range(2 * args.pairs):
                    name = "AB"[i % 2]
                    prefetcher, extra = variants[name]
                    wall = _run(setup, args.mode, prefetcher, extra, i)
                    walls[name].append(wall)
                    print(f"run {i:2d} {name} {wall:6.2f}s", flush=True)
    finally:
        children.stop_all()
    ratios = [b / a for a, b in zip(walls["A"], walls["B"], strict=True)]
    print("\npairs (A / B):", ", ".join(
        f"{a:.2f}/{b:.2f}" for a, b in zip(walls["A"], walls["B"], strict=True)))
    print(f"median of per-pair B/A: {statistics.median(ratios):.3f}"
          f" ({(statistics.median(ratios) - 1) * 100:+.1f} %); B slower in"
          f" {sum(r > 1 for r in ratios)} of {len(ratios)} pairs")
    return 0


def _run(setup: pu.Setup, mode: str, prefetcher: str, extra: list[str], i: int) -> float:
    root = setup.run_dir / f"run-{i}"
    argv = [prefetcher, "pull", setup.ref, "--root", str(root), "--plain-http", "--quiet",
            *extra]
    log = setup.run_dir / "pull.log"
    if mode == "local":
        pu.settle(setup.drop_caches)
        try:
            wall, *_ = pu.measured(
                setup.children, [*argv, "--config", str(setup.config)], log, setup.env)
            return wall
        finally:
            pu.unmount_under(root)
            shutil.rmtree(root, ignore_errors=True)
    with pu.private_containerd(setup, f"containerd-{i}") as daemon:
        config = pu.into_containerd_config(setup.run_dir / f"run-{i}.toml", daemon)
        pu.settle(setup.drop_caches)
        wall, *_ = pu.measured(setup.children, [*argv, "--config", str(config)], log, setup.env)
        return wall


if __name__ == "__main__":
    sys.exit(main())
