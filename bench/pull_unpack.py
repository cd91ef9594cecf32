#!/usr/bin/env python3
"""Pull + unpack benchmark: ``prefetcher pull`` (with and without --sync-fs) vs containerd 1.6.

Generates (and caches) a multi-layer gzip image, pushes it to a fresh Debian
``docker-registry`` on a loopback port, then pulls and unpacks it into overlayfs snapshots
four ways, interleaved, each from fresh state, ``--repeat`` times:

  ours             prefetcher pull HOST/REPO:TAG --root FRESH --plain-http --json
  ours-syncfs      the same with --sync-fs
  ours-containerd  a private containerd 1.6 (as for ``containerd``), then the same
                   prefetcher pull with a config of [images] snapshotter = "containerd"
                   pointing at that containerd's socket, namespace k8s.io, overlayfs
  containerd       a private containerd 1.6 (own root/state/socket, CRI plugin on as on a
                   node, overlayfs), ctr -n k8s.io image pull --plain-http HOST/REPO:TAG
                   (fetch + unpack in the daemon)

Measurements per run (see README.md for why they are correct):

  wall          from spawning the client (prefetcher / ctr) to reaping it
  cpu           user+sys of the client (rusage of wait4) plus, for containerd, of the daemon
                (/proc/PID/stat before/after); the same for ours-containerd
  syscw, wchar, write_bytes, syscr, read_bytes
                /proc/<pid>/io.  For a client process: the delta of this process's own
                /proc/self/io across os.wait4() of the client: the kernel folds a reaped
                child's I/O counters (all its threads, and its own reaped children) into the
                parent's, and this process does nothing else meanwhile.  For containerd, the
                daemon's /proc/PID/io delta across the pull is added to ctr's (and to
                prefetcher's for ours-containerd).
  pull          for ours: the ``seconds`` of prefetcher's ``--json`` result, the pull inside
                the process (resolve to image recorded): the wall time without the
                interpreter's start-up, the connection to the runtime and the exit, which a
                running agent does not pay per pull
  peak RSS      ru_maxrss of the client from wait4; for containerd the daemon's VmHWM
                (a fresh daemon per run), ctr's own is in the JSON.  For ours-containerd
                prefetcher's (the target is about our process); the daemon's VmHWM is in
                the JSON (daemon_rss_kib) and in the per-run line.

After a run into containerd, ``ctr -n k8s.io images ls -q`` must list the reference and
``ctr -n k8s.io snapshots ls`` must show one committed snapshot per layer (else ``!!``).

Before every run the previous run's state is wiped and the page cache is written back
(sync); with --drop-caches the page cache is also dropped (global: it slows other users of
the machine and makes the registry read blobs from disk).

All of a run's state (registry storage, containerd roots, prefetcher stores) lives on the work
directory's filesystem, or with --filesystem ext4|xfs on a fresh filesystem made for the
invocation on a loop device (ext4 with a journal, as a node's; on ext4 *without* one every
file creation scans past the inodes the previous run deleted, for both tools: see README.md).

Targets (issue 3), printed as PASS/FAIL, never asserted: ours <= 0.6x containerd's wall time,
--sync-fs <= +10 %, peak RSS < 150 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
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
METHODS = ("ours", "ours-syncfs", "ours-containerd", "ours-containerd-syncfs", "containerd")
#: The image shapes of issue 13: (uncompressed file data, regular files, layers); the tar
#: entries (files, directories, links) come out at ~15k, ~33k and ~63k.
SHAPES = {
    "1g": ("1GiB", 14_300, 5),
    "1.8g": ("1843MiB", 31_400, 5),
    "190m": ("190MiB", 60_000, 5),
}
NAMESPACE = "k8s.io"  # both containerd methods: the CRI's namespace, what a node uses
REPO, TAG = "bench/app", "v1"
TARGET_RATIO = 0.6
TARGET_CONTAINERD_RATIO = 0.5
TARGET_SYNCFS = 1.10
TARGET_RSS_MIB = 150.0
IO_KEYS = ("rchar", "wchar", "syscr", "syscw", "read_bytes", "write_bytes")

# The same daemon config for both containerd methods.  The CRI plugin is on (as on a node,
# and as the prefetcher backend's start-up checks want: they read the CRI's snapshotter and
# discard_unpacked_layers from its verbose status), with no CNI and no TCP streaming service.
CONTAINERD_CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
plugin_dir = ""
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  level = "warn"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{base}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  disable_tcp_service = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{base}/cni/bin"
    conf_dir = "{base}/cni/conf.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
"""

# Run in a child (not in the measuring process, which must do no I/O of its own): wait until
# the CRI plugin answers the backend's start-up checks (it initialises after the socket is up).
CRI_READY = """\
import sys, time
from agent.images.containerd import checks, client
deadline = time.monotonic() + 30
while True:
    with client.Client(sys.argv[1], "k8s.io") as c:
        report = checks.run(c)
    if report.cri or time.monotonic() > deadline:
        break
    time.sleep(0.1)
print("\\n".join(f"{f.level}: {f.message}" for f in report.findings))
sys.exit(0 if report.cri and report.ok else 1)
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
    daemon_rss_kib: int = 0  # containerd's VmHWM, for both containerd methods
    entries: int = 0  # names found in the snapshot directories afterwards
    problems: list[str] = field(default_factory=list)  # failed checks after the run
    user: float = 0.0  # the user-mode part of cpu (system time swings with the machine)
    #: the machine's pressure stall time during the run (/proc/pressure): seconds in which
    #: every task was stalled on IO (``io_full``) or some task waited for a CPU
    #: (``cpu_some``): what tells a run slowed by the machine from one slowed by the code
    stalls: dict[str, float] = field(default_factory=dict)
    #: ours: the pull inside the process, as its ``--json`` result says (``seconds``)
    pull: float = 0.0


def read_io(pid: int | str = "self") -> dict[str, int]:
    with open(f"/proc/{pid}/io") as f:
        pairs = (line.split(":") for line in f if ":" in line)
        return {key.strip(): int(value) for key, value in pairs}


def io_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {key: after[key] - before[key] for key in IO_KEYS}


def proc_cpu(pid: int, *, user_only: bool = False) -> float:
    """user+sys (or user) seconds of a live process (all threads, and its reaped children)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    if user_only:
        return (utime + cutime) / os.sysconf("SC_CLK_TCK")
    return (utime + stime + cutime + cstime) / os.sysconf("SC_CLK_TCK")


def vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def build_image(params: imagegen.Params, cache: Path) -> imagegen.BuiltImage:
    """The image, generated in a child process unless it is cached. Generating it here would
    grow this process, and every command it starts afterwards would report at least this
    process's peak as its own ``ru_maxrss``: Linux keeps the high-water mark of the memory a
    process had before ``exec`` (this process's, after ``vfork``) in its ``maxrss``."""
    if not imagegen.is_cached(params, cache):
        child = multiprocessing.get_context("spawn").Process(target=imagegen.build,
                                                             args=(params, cache))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise SystemExit(f"pull_unpack.py: generating the image failed ({child.exitcode})")
    return imagegen.build(params, cache)


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


def pressure_totals() -> dict[str, float]:
    """Seconds of stall so far by /proc/pressure (PSI), ``{}`` where the kernel has none."""
    out: dict[str, float] = {}
    for resource in ("io", "cpu"):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/pressure/{resource}").read_text().splitlines():
                kind, _, rest = line.partition(" ")
                total = dict(pair.split("=") for pair in rest.split())["total"]
                out[f"{resource}_{kind}"] = int(total) / 1e6
    return out


def measured(children: Children, argv: list[str], log: Path, env: dict[str, str] | None = None
             ) -> tuple[float, dict[str, int], Any, dict[str, float]]:
    """Run ``argv`` to completion: (wall seconds, its /proc io counters, rusage, the
    machine's pressure stall seconds meanwhile)."""
    before = read_io()
    stalled = pressure_totals()
    start = time.perf_counter()
    proc = children.spawn(argv, log, env)
    code, rusage = children.wait4(proc)
    wall = time.perf_counter() - start
    after = read_io()
    stalls = {key: round(value - stalled.get(key, 0.0), 3)
              for key, value in pressure_totals().items() if key in ("io_full", "cpu_some")}
    if code != 0:
        tail = log.read_text(errors="replace").splitlines()[-15:]
        raise RuntimeError(f"{' '.join(argv)} exited with {code}:\n" + "\n".join(tail))
    return wall, io_delta(before, after), rusage, stalls


def log_size(log: Path) -> int:
    """Where this run's output will start in ``log`` (runs of a method share one log)."""
    return log.stat().st_size if log.exists() else 0


def reported_pull_seconds(log: Path, offset: int) -> float:
    """The ``seconds`` of the ``prefetcher pull --json`` result written to ``log`` after
    ``offset`` (from resolving the reference to the image recorded, inside the process);
    ``0.0`` if there is none."""
    text = log.read_bytes()[offset:].decode(errors="replace")
    try:
        result = json.loads(text[text.index("{"):text.rindex("}") + 1])
        return float(result["seconds"])
    except (ValueError, KeyError, TypeError):
        return 0.0


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


#: Seconds to wait after the previous run's state was deleted (``--settle``).
SETTLE_SECONDS = 0.0


def dirty_expire_seconds() -> float:
    """``vm.dirty_expire_centisecs`` in seconds: how long the kernel keeps dirty pages before
    writing them back (``--settle``'s default is one second more)."""
    try:
        return int(Path("/proc/sys/vm/dirty_expire_centisecs").read_text()) / 100
    except (OSError, ValueError):  # pragma: no cover
        return 30.0


#: ``--filesystem``: where the runs' state lives (``workdir``: the work directory's own).
FILESYSTEMS = ("workdir", "ext4", "xfs")
_MKFS = {"ext4": ("mkfs.ext4", "-q", "-F"), "xfs": ("mkfs.xfs", "-q", "-f")}


@contextlib.contextmanager
def filesystem_for_runs(kind: str, workdir: Path, size: int) -> Iterator[Path]:
    """The directory the runs' state goes in (registry storage, containerd roots, prefetcher
    stores): ``workdir`` itself, or a fresh filesystem of ``kind`` made with mkfs's defaults
    (ext4 *with* a journal, as on a node) on a sparse ``size``-byte file in ``workdir``,
    attached through a direct-I/O loop device (its writes are not cached twice) and mounted;
    unmounted, detached and deleted afterwards."""
    if kind == "workdir":
        yield workdir
        return
    mkfs = _MKFS[kind]
    if shutil.which(mkfs[0]) is None:
        raise SystemExit(f"pull_unpack.py: --filesystem {kind} needs {mkfs[0]}"
                         f" ({'xfsprogs' if kind == 'xfs' else 'e2fsprogs'})")
    fd, name = tempfile.mkstemp(prefix=f"fs-{kind}-", suffix=".img", dir=workdir)
    os.close(fd)
    image = Path(name)
    mount = Path(tempfile.mkdtemp(prefix=f"fs-{kind}-", dir=workdir))
    loop = ""
    try:
        os.truncate(image, size)
        subprocess.run([*mkfs, str(image)], check=True, stdout=subprocess.DEVNULL)
        loop = subprocess.run(["losetup", "--direct-io=on", "--find", "--show", str(image)],
                              check=True, capture_output=True, text=True).stdout.strip()
        subprocess.run(["mount", loop, str(mount)], check=True)
        yield mount
    finally:
        if loop:
            subprocess.run(["umount", str(mount)], check=False)
            subprocess.run(["losetup", "--detach", loop], check=False)
        with contextlib.suppress(OSError):
            mount.rmdir()  # never rmtree: if the unmount failed, the files are not ours to go
        image.unlink(missing_ok=True)


def filesystem_size(image: imagegen.BuiltImage) -> int:
    """``--filesystem``'s size: room for the registry's blobs and one run's content and
    snapshots, twice over."""
    return max(8 << 30, 4 * (image.uncompressed + image.compressed))


def settle(drop_caches: bool) -> None:
    """Write back everything dirty, wait ``SETTLE_SECONDS`` (and drop the page cache when
    asked)."""
    os.sync()
    if SETTLE_SECONDS > 0:
        time.sleep(SETTLE_SECONDS)
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
    python: str  # for the CRI readiness probe (needs the agent package)
    config: Path  # an empty prefetcher config file
    drop_caches: bool
    expected_entries: int
    layers: int
    children: Children
    env: dict[str, str]


def run_ours(setup: Setup, repetition: int, sync_fs: bool) -> Run:
    method = "ours-syncfs" if sync_fs else "ours"
    root = setup.run_dir / f"{method}-{repetition}"
    settle(setup.drop_caches)
    argv = [setup.prefetcher, "pull", setup.ref, "--root", str(root), "--config",
            str(setup.config), "--plain-http", "--json"] + (["--sync-fs"] if sync_fs else [])
    log = setup.run_dir / f"{method}.log"
    offset = log_size(log)
    try:
        wall, io, rusage, stalls = measured(setup.children, argv, log, setup.env)
        entries = count_entries((root / "snapshots" / "snapshots").glob("*/fs"))
    finally:
        unmount_under(root)
        shutil.rmtree(root, ignore_errors=True)
    pull = reported_pull_seconds(log, offset)
    problems = [] if pull else [f"no --json result with seconds in {log}"]
    return Run(method, repetition, wall, rusage.ru_utime + rusage.ru_stime, io,
               rusage.ru_maxrss, rusage.ru_maxrss, 0, entries, problems, user=rusage.ru_utime,
               stalls=stalls, pull=pull)


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    sock: Path
    root: Path
    ctr: list[str]  # ctr --address SOCK --namespace k8s.io


@contextlib.contextmanager
def private_containerd(setup: Setup, name: str) -> Iterator[Daemon]:
    """A fresh containerd (own root, state, socket), answering ``ctr version`` and the CRI;
    stopped by PID, unmounted and wiped afterwards."""
    base = setup.run_dir / name
    root, state = base / "root", base / "state"
    sock = base / "containerd.sock"
    for d in (root, state, base / "opt", base / "cni" / "bin", base / "cni" / "conf.d"):
        d.mkdir(parents=True, exist_ok=True)
    config = base / "config.toml"
    config.write_text(CONTAINERD_CONFIG.format(root=root, state=state, sock=sock, base=base))
    log = setup.run_dir / "containerd.log"
    ctr = [setup.ctr, "--address", str(sock), "--namespace", NAMESPACE]
    proc = setup.children.spawn([setup.containerd, "--config", str(config)], log, setup.env)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {proc.returncode}; see {log}")
            if sock.exists() and subprocess.run(
                [*ctr, "version"], capture_output=True, env=setup.env
            ).returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not answer on {sock}; see {log}")
            time.sleep(0.05)
        ready = subprocess.run([setup.python, "-c", CRI_READY, str(sock)], capture_output=True,
                               text=True, env=setup.env, cwd=REPO_ROOT)
        if ready.returncode != 0:
            raise RuntimeError(f"containerd's CRI plugin not ready on {sock}: "
                               f"{ready.stdout}{ready.stderr}; see {log}")
        yield Daemon(proc, sock, root, ctr)
    finally:
        setup.children.stop(proc)
        unmount_under(base)
        shutil.rmtree(base, ignore_errors=True)


def check_containerd(setup: Setup, daemon: Daemon, layers: int) -> tuple[int, list[str]]:
    """After a pull: (entries in the snapshot dirs, problems): the image must be listed and
    there must be one committed snapshot per layer."""
    problems = []
    listed = subprocess.run([*daemon.ctr, "images", "ls", "-q"], capture_output=True,
                            text=True, env=setup.env).stdout.split()
    if setup.ref not in listed:
        problems.append(f"{setup.ref} not in ctr images ls ({listed})")
    lines = subprocess.run([*daemon.ctr, "snapshots", "ls"], capture_output=True, text=True,
                           env=setup.env).stdout.splitlines()[1:]
    kinds = [line.split()[-1] for line in lines if line.strip()]
    committed = kinds.count("Committed")
    if committed != layers or len(kinds) != layers:
        problems.append(f"{committed} committed of {len(kinds)} snapshots, {layers} layers")
    snapshots = daemon.root / "io.containerd.snapshotter.v1.overlayfs" / "snapshots"
    return count_entries(snapshots.glob("*/fs")), problems


def into_containerd_config(path: Path, daemon: Daemon) -> Path:
    """Write a prefetcher config that pulls into ``daemon`` (namespace k8s.io, overlayfs)."""
    path.write_text(
        'version = 2\n[images]\nsnapshotter = "containerd"\n[images.containerd]\n'
        f'address = "{daemon.sock}"\nnamespace = "{NAMESPACE}"\n'
        'snapshotter = "overlayfs"\n'
    )
    return path


def child_env() -> dict[str, str]:
    """The environment of the commands the benchmark runs: this one's without the
    prefetcher's and containerd's own settings, and compiling bytecode as an installation
    does."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFETCHER_", "CONTAINERD_"))
            and k != "PYTHONDONTWRITEBYTECODE"}


def run_into_containerd(setup: Setup, repetition: int, method: str) -> Run:
    """``containerd`` (ctr image pull) or ``ours-containerd[-syncfs]`` (prefetcher pull into
    it, with ``--sync-fs``)."""
    with private_containerd(setup, f"{method}-{repetition}") as daemon:
        if method == "containerd":
            argv = [*daemon.ctr, "image", "pull", "--plain-http", setup.ref]
            log = setup.run_dir / "ctr.log"
        else:
            config = into_containerd_config(setup.run_dir / f"{method}-{repetition}.toml",
                                            daemon)
            root = setup.run_dir / f"{method}-{repetition}" / "prefetcher"
            argv = [setup.prefetcher, "pull", setup.ref, "--root", str(root), "--config",
                    str(config), "--plain-http", "--json"]
            if method.endswith("-syncfs"):
                argv.append("--sync-fs")
            log = setup.run_dir / f"{method}.log"
        settle(setup.drop_caches)
        offset = log_size(log)
        daemon_io, daemon_cpu = read_io(daemon.proc.pid), proc_cpu(daemon.proc.pid)
        daemon_user = proc_cpu(daemon.proc.pid, user_only=True)
        wall, io, rusage, stalls = measured(setup.children, argv, log, setup.env)
        daemon_io = io_delta(daemon_io, read_io(daemon.proc.pid))
        daemon_cpu = proc_cpu(daemon.proc.pid) - daemon_cpu
        daemon_user = proc_cpu(daemon.proc.pid, user_only=True) - daemon_user
        hwm = vm_hwm_kib(daemon.proc.pid)
        entries, problems = check_containerd(setup, daemon, setup.layers)
    pull = 0.0
    if method != "containerd":
        pull = reported_pull_seconds(log, offset)
        if not pull:
            problems.append(f"no --json result with seconds in {log}")
    total_io = {key: io[key] + daemon_io[key] for key in IO_KEYS}
    cpu = rusage.ru_utime + rusage.ru_stime + daemon_cpu
    peak = hwm if method == "containerd" else rusage.ru_maxrss
    return Run(method, repetition, wall, cpu, total_io, peak, rusage.ru_maxrss, hwm, entries,
               problems, user=rusage.ru_utime + daemon_user, stalls=stalls, pull=pull)


# -- reporting --------------------------------------------------------------------------------


def median_of(runs: list[Run], method: str) -> dict[str, float]:
    mine = [r for r in runs if r.method == method]
    if not mine:
        return {}
    out = {
        "wall": statistics.median(r.wall for r in mine),
        "wall_min": min(r.wall for r in mine),
        "cpu": statistics.median(r.cpu for r in mine),
        "user": statistics.median(r.user for r in mine),
        "peak_rss_mib": statistics.median(r.peak_rss_kib for r in mine) / 1024,
        "client_rss_mib": statistics.median(r.client_rss_kib for r in mine) / 1024,
        "daemon_rss_mib": statistics.median(r.daemon_rss_kib for r in mine) / 1024,
    }
    for key in IO_KEYS:
        out[key] = statistics.median(r.io[key] for r in mine)
    if pulls := [r.pull for r in mine if r.pull]:
        out["pull"] = statistics.median(pulls)
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
    """Type, source and options of the filesystem holding ``path``; for ext4 also whether it
    has a journal (without one, its inode allocator skips recently deleted inodes: see
    README.md)."""
    out = subprocess.run(["findmnt", "-no", "FSTYPE,SOURCE,OPTIONS", "-T", str(path)],
                         capture_output=True, text=True).stdout.strip()
    described = re.sub(r"\s+", " ", out) or "?"
    fields = described.split(" ")
    if fields[0] == "ext4" and len(fields) > 1:
        # The kernel's view (dumpe2fs may not open the device): "<none>" without a journal.
        device = Path(os.path.realpath(fields[1])).name
        with contextlib.suppress(OSError):
            task = Path(f"/sys/fs/ext4/{device}/journal_task").read_text().strip()
            described += " (NO journal)" if task == "<none>" else " (journal)"
    return described


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
    print(f"* Load (/proc/loadavg) before: {info['load_before']}; after: {info['load_after']}")
    print(f"* Medians of {n} interleaved repetitions; page cache "
          f"{'dropped' if info['drop_caches'] else 'synced, not dropped'} before each run"
          f" ({info.get('settle_seconds', 0):.0f} s after the previous run's state was deleted)")
    labels = {"ours": "prefetcher", "ours-syncfs": "prefetcher --sync-fs",
              "ours-containerd": "prefetcher->containerd",
              "ours-containerd-syncfs": "prefetcher->ctrd --sync-fs",
              "containerd": "containerd 1.6 (ctr)"}
    for method, m in med.items():
        print(f"* {labels[method]}: {m['wall']:.3f}s (best {m['wall_min']:.2f}s, "
              f"cpu {m['cpu']:.2f}s (user {m['user']:.2f}s), "
              f"peak RSS {m['peak_rss_mib']:.0f} MiB"
              + (f", containerd {m['daemon_rss_mib']:.0f} MiB" if m["daemon_rss_mib"] else "")
              + ")")
        print(f"  WIOS={m['syscw']:.0f}, WBytes={m['write_bytes']:.0f}, "
              f"RIOS={m['syscr']:.0f}, RBytes={m['read_bytes']:.0f}, wchar={m['wchar']:.0f}")
    print()
    header = (f"{'method':<24}{'wall s':>8}{'cpu s':>8}{'WIOS(syscw)':>13}{'wchar':>10}"
              f"{'WBytes':>10}{'peak RSS':>10}")
    print(header)
    print("-" * len(header))
    for method, m in med.items():
        print(f"{labels[method]:<24}{m['wall']:>8.2f}{m['cpu']:>8.2f}{m['syscw']:>13.0f}"
              f"{human(m['wchar']):>10}{human(m['write_bytes']):>10}"
              f"{m['peak_rss_mib']:>6.0f} MiB")
    print()
    print("  every run, in the order run: wall s, user s, the machine's stalls meanwhile"
          " (/proc/pressure: io full s, cpu some s), and ours' pull inside the process")
    for r in runs:
        stalls = "  ".join(f"{k} {v:.2f}" for k, v in r.stalls.items())
        pull = f"  pull {r.pull:.2f}" if r.pull else ""
        print(f"  {r.repetition:>3} {labels[r.method]:<28}{r.wall:>7.2f}{r.user:>7.2f}  {stalls}"
              f"{pull}")
    ratios: dict[str, float] = {}
    checks: dict[str, str] = {}

    def ratio(name: str, a: str, b: str, key: str) -> None:
        if a in med and b in med and med[b][key]:
            ratios[f"{name}.{key}"] = med[a][key] / med[b][key]

    for key in ("wall", "cpu", "user", "syscw", "write_bytes"):
        ratio("ours/containerd", "ours", "containerd", key)
        ratio("ours-syncfs/containerd", "ours-syncfs", "containerd", key)
        ratio("ours-containerd/containerd", "ours-containerd", "containerd", key)
        ratio("ours-containerd-syncfs/containerd", "ours-containerd-syncfs", "containerd", key)
        ratio("ours-containerd/ours", "ours-containerd", "ours", key)
        ratio("syncfs/no-syncfs", "ours-syncfs", "ours", key)
        ratio("containerd syncfs/no-syncfs", "ours-containerd-syncfs", "ours-containerd", key)
    paired = {
        "ours/containerd": paired_wall_ratio(runs, "ours", "containerd"),
        "ours-syncfs/containerd": paired_wall_ratio(runs, "ours-syncfs", "containerd"),
        "ours-containerd/containerd": paired_wall_ratio(runs, "ours-containerd", "containerd"),
        "ours-containerd/ours": paired_wall_ratio(runs, "ours-containerd", "ours"),
        "ours-containerd-syncfs/containerd": paired_wall_ratio(
            runs, "ours-containerd-syncfs", "containerd"),
        "syncfs/no-syncfs": paired_wall_ratio(runs, "ours-syncfs", "ours"),
        "containerd syncfs/no-syncfs": paired_wall_ratio(
            runs, "ours-containerd-syncfs", "ours-containerd"),
    }
    print()
    print(f"  {'ratio of medians':<40}{'':>7}   (paired: median of per-repetition ratios)")
    for name, value in ratios.items():
        pair = paired.get(name.removesuffix(".wall")) if name.endswith(".wall") else None
        extra = f"   (paired {pair:.2f}x)" if pair is not None else ""
        print(f"  {name:<40}{value:6.2f}x{extra}")
    if "containerd" in med and any("pull" in m for m in med.values()):
        ctr_wall = med["containerd"]["wall"]
        print()
        print("  the pull inside our process (--json \"seconds\": without the interpreter's"
              " start-up, the runtime connection and the exit, which a running agent pays"
              " once), against ctr's wall:")
        for method, m in med.items():
            if "pull" in m:
                ratios[f"{method}(in-process)/containerd.wall"] = m["pull"] / ctr_wall
                print(f"  {labels[method]:<28}{m['pull']:6.2f}s  {m['pull'] / ctr_wall:.2f}x"
                      f"   (the rest of its wall: {m['wall'] - m['pull']:.2f}s)")
    print()
    if "ours/containerd.wall" in ratios:
        value = ratios["ours/containerd.wall"]
        checks["ours <= 0.6x containerd"] = verdict(value <= TARGET_RATIO)
        print(f"  target ours <= {TARGET_RATIO}x containerd wall: {value:.2f}x"
              f"  {checks['ours <= 0.6x containerd']}")
    if "ours-containerd/containerd.wall" in ratios:
        value = ratios["ours-containerd/containerd.wall"]
        name = f"ours-containerd <= {TARGET_CONTAINERD_RATIO}x containerd"
        checks[name] = verdict(value <= TARGET_CONTAINERD_RATIO)
        print(f"  target {name} wall: {value:.2f}x  {checks[name]}")
    for mode, key in (("local", "syncfs/no-syncfs.wall"),
                      ("containerd", "containerd syncfs/no-syncfs.wall")):
        if key in ratios:
            value = ratios[key]
            name = f"sync-fs <= +10% ({mode})"
            checks[name] = verdict(value <= TARGET_SYNCFS)
            print(f"  target --sync-fs <= +10 % ({mode}):  {100 * (value - 1):+.1f} %"
                  f"  {checks[name]}")
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
            "docker-registry: prefetcher pull (without and with --sync-fs, and into a "
            "containerd through its containerd backend) against "
            "containerd 1.6 (ctr image pull), interleaved, fresh state per run. Prints "
            "median wall time, CPU, write IOs/bytes (/proc/PID/io), peak RSS, ratios and "
            "the issue's targets as PASS/FAIL. Run as root."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        help="one of issue 13's image shapes (sets --size, --files, --layers): "
                        + ", ".join(f"{k} = {v[0]} / {v[1]} files" for k, v in SHAPES.items()))
    parser.add_argument("--size", type=parse_size, default="1GiB",
                        help="uncompressed file data in the image")
    parser.add_argument("--files", type=int, default=20000, help="regular files in the image")
    parser.add_argument("--layers", type=int, default=5, help="layers in the image")
    parser.add_argument("--seed", type=int, default=1, help="image generator seed")
    parser.add_argument("--gzip-level", type=int, default=6, choices=range(10),
                        help="gzip level of the layers (zlib; isal for 0-3)")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions of each method")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated subset of " + ", ".join(METHODS))
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp/prefetcher-bench"),
                        help="image cache (cache/) and per-invocation run directories")
    parser.add_argument("--drop-caches", action=argparse.BooleanOptionalAction, default=True,
                        help="echo 3 > /proc/sys/vm/drop_caches before each run (global!)")
    parser.add_argument("--settle", type=float, default=dirty_expire_seconds() + 1,
                        metavar="SECONDS",
                        help="wait this long after deleting the previous run's state (default:"
                        " vm.dirty_expire_centisecs + 1 s). On ext4 without a journal it does"
                        " not stop the inode allocator from scanning past the previous run's"
                        " deleted inodes (60 s, or 360 s once their inode-table block is"
                        " dirty again); --filesystem ext4 does (see README.md)")
    parser.add_argument("--filesystem", choices=FILESYSTEMS, default="workdir",
                        help="the filesystem the runs write to: the work directory's own, or a"
                        " fresh one made for this invocation on a loop device (ext4 with a"
                        " journal, as on a node; xfs)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the raw numbers here")
    parser.add_argument("--prefetcher", default=str(Path(sys.executable).parent / "prefetcher"),
                        help="the prefetcher executable")
    parser.add_argument("--containerd", default=shutil.which("containerd") or "containerd")
    parser.add_argument("--ctr", default=shutil.which("ctr") or "ctr")
    args = parser.parse_args(argv)
    global SETTLE_SECONDS
    SETTLE_SECONDS = args.settle
    if args.shape:
        size, args.files, args.layers = SHAPES[args.shape]
        args.size = parse_size(size)
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
    stack = contextlib.ExitStack()
    run_dir: Path | None = None
    try:
        params = imagegen.Params(args.size, args.files, args.layers, args.seed, args.gzip_level)
        image = build_image(params, args.workdir / "cache")
        fs_dir = stack.enter_context(
            filesystem_for_runs(args.filesystem, args.workdir, filesystem_size(image)))
        run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=fs_dir))
        print(f"image: {human(image.uncompressed)} tar, {human(image.compressed)} gzip, "
              f"{image.files} files, {image.entries} entries in {len(image.layers)} layers")
        with registries.start_registry(run_dir / "registry", "none") as registry:
            started = time.perf_counter()
            digest = imagegen.push(registry.url, REPO, TAG, image)
            print(f"pushed {registry.host}/{REPO}:{TAG} ({digest}) "
                  f"in {time.perf_counter() - started:.1f}s")
            config = run_dir / "prefetcher.toml"
            config.write_text("")
            env = child_env()
            # Bytecode compiled once, outside the clock, as an installed package has it (not
            # compiled again by every run), in the package's (git-ignored) __pycache__
            # directories; site-packages has its own already. (Not PYTHONPYCACHEPREFIX: with
            # it every module, site-packages' too, would be compiled again by the first run.)
            env.pop("PYTHONPYCACHEPREFIX", None)
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO_ROOT / "agent")],
                           env=env, check=True, stdout=subprocess.DEVNULL)
            setup = Setup(run_dir, f"{registry.host}/{REPO}:{TAG}", args.prefetcher,
                          args.containerd, args.ctr, sys.executable, config,
                          args.drop_caches, image.entries, len(image.layers), children, env)
            runs: list[Run] = []
            load_before = Path("/proc/loadavg").read_text().strip()
            for repetition in range(args.repeat):
                shift = repetition % len(args.methods)
                order = args.methods[shift:] + args.methods[:shift]  # rotate: no fixed slot
                for method in order:
                    if method.startswith(("containerd", "ours-containerd")):
                        run = run_into_containerd(setup, repetition, method)
                    else:
                        run = run_ours(setup, repetition, sync_fs=method == "ours-syncfs")
                    runs.append(run)
                    flag = "" if run.entries == image.entries else (
                        f"  !! {run.entries} entries unpacked, expected {image.entries}")
                    flag += "".join(f"  !! {p}" for p in run.problems)
                    if (run.peak_rss_kib == run.client_rss_kib
                            and run.peak_rss_kib <= vm_hwm_kib(os.getpid())):
                        flag += "  !! the client's peak RSS is not above this process's own"
                    daemon = (f" (containerd {run.daemon_rss_kib / 1024:.0f})"
                              if run.daemon_rss_kib and run.daemon_rss_kib != run.peak_rss_kib
                              else "")
                    print(f"[{repetition + 1}/{args.repeat}] {method:<15} {run.wall:7.2f}s"
                          f"  cpu {run.cpu:6.2f}s (user {run.user:5.2f})"
                          f"  syscw {run.io['syscw']:>7}"
                          f"  write_bytes {human(run.io['write_bytes']):>9}"
                          f"  peak RSS {run.peak_rss_kib / 1024:5.0f} MiB{daemon}"
                          + "".join(f"  {k} {v:.2f}s" for k, v in run.stalls.items())
                          + flag,
                          flush=True)
        info: dict[str, Any] = {
            "load_before": load_before,
            "load_after": Path("/proc/loadavg").read_text().strip(),
            "machine": machine(),
            "filesystem": filesystem_of(run_dir),
            "filesystem_choice": args.filesystem,
            "drop_caches": args.drop_caches,
            "settle_seconds": SETTLE_SECONDS,
            "bench_rss_kib": vm_hwm_kib(os.getpid()),
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
        if run_dir is not None:
            unmount_under(run_dir)
            shutil.rmtree(run_dir, ignore_errors=True)
        stack.close()


if __name__ == "__main__":
    sys.exit(main())
