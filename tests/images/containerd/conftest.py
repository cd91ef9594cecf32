"""A real containerd for the containerd backend's tests.

One containerd per session, with its own root, state, sockets and opt directory under a
temporary directory; the CRI plugin on (no CNI configured: it starts and serves images, pods
would not get a network), its TCP streaming service off, snapshotters that cannot work here
disabled. Stopped by PID at the end. Tests that need it are skipped, saying why, when
containerd is not installed or the tests do not run as root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.images import containerd

CONTAINERD = shutil.which("containerd")
CTR = shutil.which("ctr")

CONFIG = """\
version = 2
root = "{root}"
state = "{state}"
plugin_dir = ""
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.internal.v1.tracing",
  "io.containerd.tracing.processor.v1.otlp",
]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  level = "debug"

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
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{base}/certs.d"
"""


@dataclass
class Containerd:
    """A running containerd started by the fixture."""

    base: Path
    root: Path
    address: str
    pid: int
    log: Path

    def ctr(
        self, *args: str, namespace: str = "k8s.io", check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """Run ``ctr -a <socket> -n <namespace> args…``."""
        assert CTR is not None
        proc = subprocess.run(
            [CTR, "-a", self.address, "-n", namespace, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode:
            raise AssertionError(
                f"ctr {' '.join(args)} failed ({proc.returncode}): {proc.stderr}\n"
                f"containerd log:\n{self.log_tail()}"
            )
        return proc

    def backend(self, **kwargs: object) -> containerd.ContainerdBackend:
        return containerd.ContainerdBackend(self.address, **kwargs)  # type: ignore[arg-type]

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def snapshots(self) -> dict[str, str]:
        """``ctr snapshots ls``: key → kind (``Committed``, ``Active``, ``View``)."""
        out = self.ctr("snapshots", "ls").stdout.splitlines()[1:]
        return {line.split()[0]: line.split()[-1] for line in out if line.strip()}


def _wait_ready(proc: subprocess.Popen[bytes], address: str, log: Path, timeout: float) -> None:
    assert CTR is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"containerd exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        if os.path.exists(address):
            ok = subprocess.run([CTR, "-a", address, "version"], capture_output=True)
            if ok.returncode == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"containerd did not answer within {timeout}s:\n{log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _unmount_below(path: Path) -> None:
    """Unmount whatever containerd or a test left mounted below ``path`` (deepest first)."""
    with open("/proc/self/mounts") as f:
        targets = [line.split()[1] for line in f if line.split()[1].startswith(str(path))]
    for target in sorted(targets, key=len, reverse=True):
        subprocess.run(["umount", "-l", target], capture_output=True)


@pytest.fixture(scope="session")
def ctrd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Containerd]:
    """A containerd of its own (root, state, socket under a temporary directory)."""
    with started_containerd(tmp_path_factory.mktemp("ctrd")) as running:
        yield running


@contextlib.contextmanager
def started_containerd(base: Path, extra_config: str = "") -> Iterator[Containerd]:
    """A containerd with :data:`CONFIG` (and ``extra_config`` after it) under ``base``,
    stopped and unmounted on exit."""
    if CONTAINERD is None or CTR is None:
        pytest.skip("containerd is missing (apt-get install containerd runc)")
    if os.geteuid() != 0:
        pytest.skip("needs root: containerd, overlay mounts, mknod")
    root, state = base / "root", base / "state"
    address = str(base / "containerd.sock")
    config = base / "config.toml"
    config.write_text(
        CONFIG.format(base=base, root=root, state=state, socket=address) + extra_config
    )
    log = base / "containerd.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [CONTAINERD, "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        _wait_ready(proc, address, log, timeout=30)
        yield Containerd(base=base, root=root, address=address, pid=proc.pid, log=log)
    finally:
        _stop(proc)
        _unmount_below(base)


@pytest.fixture
def backend(ctrd: Containerd) -> Iterator[containerd.ContainerdBackend]:
    """A backend on the session's containerd, checked and cleaned up as the agent does."""
    b = ctrd.backend()
    b.start()
    yield b
    b.close()
