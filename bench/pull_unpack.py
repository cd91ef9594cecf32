#!/usr/bin/env python3
"""Pull + unpack benchmark: ``prefetcher pull`` (with and without --sync-fs) vs containerd 1.6.

Generates (and caches) a multi-layer gzip image, pushes it to a fresh Debian
``docker-registry`` on a loopback port, then pulls and unpacks it into overlayfs snapshots
three ways, interleaved, each from fresh state, ``--repeat`` times:

  ours          prefetcher pull HOST/REPO:TAG --root FRESH --plain-http --quiet
  ours-syncfs   the same with --sync-fs
  containerd    a private containerd 1.6 (own root/state/socket, CRI disabled, overlayfs),
                ctr -n bench image pull --plain-http HOST/REPO:TAG (fetch + unpack)

Measurements per run (see README.md for why they are correct):

  wall          from spawning the client (prefetcher / ctr) to reaping it
  cpu           user+sys of the client (rusage of wait4) plus, for containerd, of the daemon
                (/proc/PID/stat before/after)
  syscw, wchar, write_bytes, syscr, read_bytes
                /proc/<pid>/io.  For a client process: the delta of this process's own
                /proc/self/io across os.wait4() of the client: the kernel folds a reaped
                child's I/O counters (all its threads, and its own reaped children) into the
                parent's, and this process does nothing else meanwhile.  For containerd, the
                daemon's /proc/PID/io delta across the pull is added to ctr's.
  peak RSS      ru_maxrss of the client from wait4; for containerd the daemon's VmHWM
                (a fresh daemon per run), ctr's own is in the JSON.

Before every run the previous run's state is wiped and the page cache is written back
(sync); with --drop-caches the page cache is also dropped (global: it slows other users of
the machine and makes the registry read blobs from disk).

Targets (issue 3), printed as PASS/FAIL, never asserted: ours <= 0.6x containerd's wall time,
--sync-fs <= +10 %, peak RSS < 150 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import imagegen

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from fixtures import registries  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
METHODS = ("ours", "ours-syncfs", "containerd")
REPO, TAG = "bench/app", "v1"
TARGET_RATIO = 0.6
TARGET_SYNCFS = 1.10
TARGET_RSS_MIB = 150.0
IO_KEYS = ("rchar", "wchar", "syscr", "syscw", "read_bytes", "write_bytes")

CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
  "io.containerd.grpc.v1.cri",
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  level = "warn"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"""


# -- measuring --------------------------------------------------------------------------------


@dataclass
class Run:
    method: str
    repetition: int
    wall: float = 0.0
    cpu: float = 0.0
    io: dict[str, int] = field(default_factory=dict)
    peak_rss_kib: int = 0
    client_rss_kib: int = 0  # ctr's for containerd (= peak_rss_kib for ours)
    entries: int = 0  # names found in the snapshot directories afterwards


def read_io(pid: int | str = "self") -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        pairs = (line.split(":") for line in f if ":" in line)
        return {key.strip(): int(value) for key, value in pairs}


def io_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in IO_KEYS}


def proc_cpu(pid: int) -> float:
    """user+sys seconds of a live process (all threads, and its reaped children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


class Children:
    """Processes this benchmark started; everything still alive is killed on exit."""

    def __init__(self) -> None:
        self.live: dict[int, subprocess.Popen[bytes]] = {}

    def spawn(self, argv: list[str], log: Path, env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, start_new_session=True,  # Ctrl-C reaches us only; we stop them
            )
        self.live[proc.pid] = proc
        return proc

    def wait4(self, proc: subprocess.Popen[bytes]) -> tuple[int, Any]:
        """Reap ``proc``: (exit code, rusage)."""
        _, status, rusage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        self.live.pop(proc.pid, None)
        return proc.returncode, rusage

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        self.live.pop(proc.pid, None)

    def stop_all(self) -> None:
        for proc in list(self.live.values()):
            with contextlib.suppress(Exception):
                self.stop(proc, timeout=5.0)


def measured(children: Children, argv: list[str], log: Path, env: dict[str, str] | None = None
             ) -> tuple[float, dict[str, int], Any]:
    """Run ``argv`` to completion: (wall seconds, its /proc io counters, rusage)."""
    before = read_io()
    start = time.perf_counter()
    proc = children.spawn(argv, log, env)
    code, rusage = children.wait4(proc)
    wall = time.perf_counter() - start
    after = read_io()
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{' '.join(argv)} exited with {code}:\n" + "\n".join(tail))
    return wall, io_delta(before, after), rusage


def count_entries(snapshot_dirs: Iterator[Path]) -> int:
    total = 0
    for fs in snapshot_dirs:
        for _, dirs, files in os.walk(fs):
            total += len(dirs) + len(files)
    return total


def unmount_under(path: Path) -> None:
    prefix = str(path.resolve()) + "/"
    with open("/proc/self/mounts") as f:
        points = [line.split()[1] for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


def settle(drop_caches: bool) -> None:
    """Write back everything dirty (and drop the page cache when asked)."""
    os.sync()
    if drop_caches:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


# -- the three methods ------------------------------------------------------------------------


@dataclass
class Setup:
    run_dir: Path
    ref: str
    prefetcher: str
    containerd: str
    ctr: str
    config: Path  # an empty prefetcher config file
    drop_caches: bool
    expected_entries: int
    children: Children
    env: dict[str, str]


def run_ours(setup: Setup, repetition: int, sync_fs: bool) -> Run:
    method = "ours-syncfs" if sync_fs else "ours"
    root = setup.run_dir / f"{method}-{repetition}"
    settle(setup.drop_caches)
    argv = [setup.prefetcher, "pull", setup.ref, "--root", str(root), "--config",
            str(setup.config), "--plain-http", "--quiet"] + (["--sync-fs"] if sync_fs else [])
    try:
        wall, io, rusage = measured(setup.children, argv, setup.run_dir / f"{method}.log",
                                    setup.env)
        entries = count_entries((root / "snapshots" / "snapshots").glob("*/fs"))
    finally:
        unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
    return Run(method, repetition, wall, rusage.ru_utime + rusage.ru_stime, io,
               rusage.ru_maxrss, rusage.ru_maxrss, entries)


def run_containerd(setup: Setup, repetition: int) -> Run:
    base = setup.run_dir / f"containerd-{repetition}"
    root, state = base / "root", base / "state"
    sock = base / "containerd.sock"
    for d in (root, state, base / "opt"):
        d.mkdir(parents=True, exist_ok=True)
    config = base / "config.toml"
    config.write_text(CONTAINERD_CONFIG.format(root=root, state=state, sock=sock,
                                               opt=base / "opt"))
    log = setup.run_dir / "containerd.log"
    ctr = [setup.ctr, "--address", str(sock), "--namespace", "bench"]
    daemon = setup.children.spawn([setup.containerd, "--config", str(config)], log, setup.env)
    try:
        deadline = time.monotonic() + 30
        while True:
            if daemon.poll() is not None:
                raise RuntimeError(f"containerd exited with {daemon.returncode}; see {log}")
            if sock.exists() and subprocess.run(
                [*ctr, "version"], capture_output=True, env=setup.env
            ).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer on {sock}; see {log}")
            time.sleep(0.05)
        settle(setup.drop_caches)
        daemon_io, daemon_cpu = read_io(daemon.pid), proc_cpu(daemon.pid)
        wall, io, rusage = measured(
            setup.children, [*ctr, "image", "pull", "--plain-http", setup.ref],
            setup.run_dir / "ctr.log", setup.env,
        )
        daemon_io = io_delta(daemon_io, read_io(daemon.pid))
        daemon_cpu = proc_cpu(daemon.pid) - daemon_cpu
        hwm = vm_hwm_kib(daemon.pid)
        snapshots = root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
        entries = count_entries(snapshots.glob("*/fs"))
    finally:
        setup.children.stop(daemon)
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)
    total_io = {key: io[key] + daemon_io[key] for key in IO_KEYS}
    return Run("containerd", repetition, wall, rusage.ru_utime + rusage.ru_stime + daemon_cpu,
               total_io, hwm, rusage.ru_maxrss, entries)


# -- reporting --------------------------------------------------------------------------------


def median_of(runs: list[Run], method: str) -> dict[str, float]:
    mine = [r for r in runs if r.method == method]
    if not mine:
        return {}
    out = {
        "wall": statistics.median(r.wall for r in mine),
        "wall_min": min(r.wall for r in mine),
        "cpu": statistics.median(r.cpu for r in mine),
        "peak_rss_mib": statistics.median(r.peak_rss_kib for r in mine) / 1024,
        "client_rss_mib": statistics.median(r.client_rss_kib for r in mine) / 1024,
    }
    for key in IO_KEYS:
        out[key] = statistics.median(r.io[key] for r in mine)
    return out


def paired_wall_ratio(runs: list[Run], a: str, b: str) -> float | None:
    """Median over repetitions of wall(a)/wall(b) within the same repetition (noise-robust)."""
    walls = {(r.method, r.repetition): r.wall for r in runs}
    values = [walls[(a, rep)] / walls[(b, rep)] for (m, rep) in walls
              if m == a and (b, rep) in walls and walls[(b, rep)] > 0]
    return statistics.median(values) if values else None


def machine() -> dict[str, str]:
    def first(path: str, pattern: str) -> str:
        with contextlib.suppress(OSError):
            for line in Path(path).read_text().splitlines():
                if m := re.match(pattern, line):
                    return m.group(1).strip()
        return "?"

    def cmd(*argv: str) -> str:
        with contextlib.suppress(OSError):
            return subprocess.run(argv, capture_output=True, text=True).stdout.strip()
        return "?"

    mem_kib = int(first("/proc/meminfo", r"MemTotal:\s*(\d+)"))
    return {
        "nproc": str(os.cpu_count()),
        "cpu": first("/proc/cpuinfo", r"model name\s*:(.*)"),
        "memory": f"{mem_kib / (1 << 20):.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "containerd": cmd("containerd", "--version"),
        "commit": cmd("git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD")
        + (" (dirty tree)" if cmd("git", "-C", str(REPO_ROOT), "status", "--porcelain",
                                  "--untracked-files=no", "agent") else ""),
    }


def filesystem_of(path: Path) -> str:
    out = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE,OPTIONS", "-T", str(path)],
                         capture_output=True, text=True).stdout.strip()
    return re.sub(r"\s+", " ", out) or "?"


def human(n: float) -> str:
    return f"{n / (1 << 20):.0f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(runs: list[Run], image: imagegen.BuiltImage, info: dict[str, Any]) -> dict[str, Any]:
    med = {m: median_of(runs, m) for m in METHODS}
    med = {m: v for m, v in med.items() if v}
    n = len({r.repetition for r in runs})
    print()
    print(f"* Image: {human(image.uncompressed)} uncompressed, {human(image.compressed)} gzip, "
          f"{len(image.layers)} layers, {image.files} files / {image.entries} entries")
    print(f"* Machine: {info['machine']['nproc']} CPUs ({info['machine']['cpu']}), "
          f"{info['machine']['memory']}, kernel {info['machine']['kernel']}, "
          f"{info['filesystem']}")
    print(f"* Code: {info['machine']['commit']}; {info['machine']['containerd']}")
    print(f"* Medians of {n} interleaved repetitions; page cache "
          f"{'dropped' if info['drop_caches'] else 'synced, not dropped'} before each run")
    labels = {"ours": "prefetcher", "ours-syncfs": "prefetcher --sync-fs",
              "containerd": "containerd 1.6 (ctr)"}
    for method, m in med.items():
        print(f"* {labels[method]}: {m['wall']:.3f}s (best {m['wall_min']:.2f}s, "
              f"cpu {m['cpu']:.2f}s, "
              f"peak RSS {m['peak_rss_mib']:.0f} MiB)")
        print(f"  WIOS={m['syscw']:.0f}, WBytes={m['write_bytes']:.0f}, "
              f"RIOS={m['syscr']:.0f}, RBytes={m['read_bytes']:.0f}, wchar={m['wchar']:.0f}")
    print()
    header = (f"{'method':<22}{'wall s':>8}{'cpu s':>8}{'WIOS(syscw)':>13}{'wchar':>10}"
              f"{'WBytes':>10}{'peak RSS':>10}")
    print(header)
    print("-" * len(header))
    for method, m in med.items():
        print(f"{labels[method]:<22}{m['wall']:>8.2f}{m['cpu']:>8.2f}{m['syscw']:>13.0f}"
              f"{human(m['wchar']):>10}{human(m['write_bytes']):>10}"
              f"{m['peak_rss_mib']:>6.0f} MiB")
    ratios: dict[str, float] = {}
    checks: dict[str, str] = {}

    def ratio(name: str, a: str, b: str, key: str) -> None:
        if a in med and b in med and med[b][key]:
            ratios[f"{name}.{key}"] = med[a][key] / med[b][key]

    for key in ("wall", "cpu", "syscw", "write_bytes"):
        ratio("ours/containerd", "ours", "containerd", key)
        ratio("ours-syncfs/containerd", "ours-syncfs", "containerd", key)
        ratio("syncfs/no-syncfs", "ours-syncfs", "ours", key)
    paired = {
        "ours/containerd": paired_wall_ratio(runs, "ours", "containerd"),
        "ours-syncfs/containerd": paired_wall_ratio(runs, "ours-syncfs", "containerd"),
        "syncfs/no-syncfs": paired_wall_ratio(runs, "ours-syncfs", "ours"),
    }
    print()
    print(f"  {'ratio of medians':<34}{'':>7}   (paired: median of per-repetition ratios)")
    for name, value in ratios.items():
        pair = paired.get(name.removesuffix(".wall")) if name.endswith(".wall") else None
        extra = f"   (paired {pair:.2f}x)" if pair is not None else ""
        print(f"  {name:<34}{value:6.2f}x{extra}")
    print()
    if "ours/containerd.wall" in ratios:
        value = ratios["ours/containerd.wall"]
        checks["ours <= 0.6x containerd"] = verdict(value <= TARGET_RATIO)
        print(f"  target ours <= {TARGET_RATIO}x containerd wall: {value:.2f}x"
              f"  {checks['ours <= 0.6x containerd']}")
    if "syncfs/no-syncfs.wall" in ratios:
        value = ratios["syncfs/no-syncfs.wall"]
        checks["sync-fs <= +10%"] = verdict(value <= TARGET_SYNCFS)
        print(f"  target --sync-fs <= +10 %:          {100 * (value - 1):+.1f} %"
              f"  {checks['sync-fs <= +10%']}")
    ours_rss = max((r.peak_rss_kib / 1024 for r in runs if r.method.startswith("ours")),
                   default=None)
    if ours_rss is not None:
        checks["peak RSS < 150 MiB"] = verdict(ours_rss < TARGET_RSS_MIB)
        print(f"  target peak RSS < {TARGET_RSS_MIB:.0f} MiB (max of all runs):"
              f" {ours_rss:.0f} MiB  {checks['peak RSS < 150 MiB']}")
    paired_ok = {k: v for k, v in paired.items() if v is not None}
    return {"medians": med, "ratios": ratios, "paired_wall_ratios": paired_ok, "targets": checks}


# -- main -------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B?)\s*", text, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 256MiB, 1GiB)")
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * (1 << (10 * power)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pull_unpack.py",
        description=(
            "Benchmark pull+unpack of a generated multi-layer image from a loopback "
            "docker-registry: prefetcher pull (without and with --sync-fs) against "
            "containerd 1.6 (ctr image pull), interleaved, fresh state per run. Prints "
            "median wall time, CPU, write IOs/bytes (/proc/PID/io), peak RSS, ratios and "
            "the issue's targets as PASS/FAIL. Run as root."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--size", type=parse_size, default="1GiB",
                        help="uncompressed file data in the image")
    parser.add_argument("--files", type=int, default=20000, help="regular files in the image")
    parser.add_argument("--layers", type=int, default=5, help="layers in the image")
    parser.add_argument("--seed", type=int, default=1, help="image generator seed")
    parser.add_argument("--gzip-level", type=int, default=1, choices=range(4),
                        help="isal gzip level of the layers (0-3)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each method")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/prefetcher-bench"),
                        help="image cache (cache/) and per-invocation run directories")
    parser.add_argument("--drop-caches", action="store_true",
                        help="echo 3 > /proc/sys/vm/drop_caches before each run (global!)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the raw numbers here")
    parser.add_argument("--prefetcher", default=str(Path(sys.executable).parent / "prefetcher"),
                        help="the prefetcher executable")
    parser.add_argument("--containerd", default=shutil.which("containerd") or "containerd")
    parser.add_argument("--ctr", default=shutil.which("ctr") or "ctr")
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if unknown := set(methods) - set(METHODS):
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    args.methods = [m for m in METHODS if m in methods]
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("pull_unpack.py: run as root (overlay whiteouts, containerd)", file=sys.stderr)
        return 2
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if inherited as ignored
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGHUP, _raise_interrupt)
    args.workdir.mkdir(parents=True, exist_ok=True)
    children = Children()
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=args.workdir))
    try:
        params = imagegen.Params(args.size, args.files, args.layers, args.seed, args.gzip_level)
        image = imagegen.build(params, args.workdir / "cache")
        print(f"image: {human(image.uncompressed)} tar, {human(image.compressed)} gzip, "
              f"{image.files} files, {image.entries} entries in {len(image.layers)} layers")
        with registries.start_registry(run_dir / "registry", "none") as registry:
            started = time.perf_counter()
            digest = imagegen.push(registry.url, REPO, TAG, image)
            print(f"pushed {registry.host}/{REPO}:{TAG} ({digest}) "
                  f"in {time.perf_counter() - started:.1f}s")
            config = run_dir / "prefetcher.toml"
            config.write_text("")
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("PREFETCHER_", "CONTAINERD_"))}
            setup = Setup(run_dir, f"{registry.host}/{REPO}:{TAG}", args.prefetcher,
                          args.containerd, args.ctr, config, args.drop_caches, image.entries,
                          children, env)
            runs: list[Run] = []
            for repetition in range(args.repeat):
                shift = repetition % len(args.methods)
                order = args.methods[shift:] + args.methods[:shift]  # rotate: no fixed slot
                for method in order:
                    if method == "containerd":
                        run = run_containerd(setup, repetition)
                    else:
                        run = run_ours(setup, repetition, sync_fs=method == "ours-syncfs")
                    runs.append(run)
                    flag = "" if run.entries == image.entries else (
                        f"  !! {run.entries} entries unpacked, expected {image.entries}")
                    print(f"[{repetition + 1}/{args.repeat}] {method:<12} {run.wall:7.2f}s"
                          f"  cpu {run.cpu:6.2f}s  syscw {run.io['syscw']:>7}"
                          f"  write_bytes {human(run.io['write_bytes']):>9}"
                          f"  peak RSS {run.peak_rss_kib / 1024:5.0f} MiB{flag}", flush=True)
        info: dict[str, Any] = {
            "machine": machine(),
            "filesystem": filesystem_of(args.workdir),
            "drop_caches": args.drop_caches,
        }
        summary = report(runs, image, info)
        if args.json:
            args.json.write_text(json.dumps({
                "params": asdict(params),
                "image": {"uncompressed": image.uncompressed, "compressed": image.compressed,
                          "files": image.files, "entries": image.entries,
                          "layers": [{"size": layer.size, "tar_size": layer.tar_size,
                                      "files": layer.files, "entries": layer.entries}
                                     for layer in image.layers]},
                **info,
                "runs": [asdict(r) for r in runs],
                **summary,
            }, indent=2))
            print(f"\nraw numbers: {args.json}")
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        children.stop_all()
        unmount_under(run_dir)
        shutil.rmtree(run_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
