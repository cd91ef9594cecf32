"""``ImageService.mount`` (``prefetcher mount``): an image mounted to be inspected gives
nobody the image's setuid binaries or device nodes, and images of many layers mount."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import images
from fixtures import layers as L
from fixtures.registries import Registry

from agent.images import descriptors, service, snapshots, unpack
from agent.images.backends import local as local_backend
from agent.images.registry import client, hosts
from tests.images.pulling import pull

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay mounts, mknod")
AMD64 = descriptors.Platform("linux", "amd64")
NOBODY = "65534"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory outside pytest's root-only tmp dirs, so an unprivileged user can reach
    what is mounted in it."""
    path = Path(tempfile.mkdtemp(prefix="mount-test-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def mount_options(target: Path) -> set[str]:
    """The per-mount options of ``target`` in /proc/self/mountinfo."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(target):
            return set(fields[5].split(","))
    raise AssertionError(f"{target} is not mounted")


def tars_with_privileges() -> list[bytes]:
    touch = Path(shutil.which("touch") or "/usr/bin/touch").read_bytes()
    return [
        L.Layer().dir("bin").file("bin/touch", touch, mode=0o4755).tar(),
        L.Layer().dir("dev").char("dev/null", 1, 3, mode=0o666).tar(),
    ]


async def test_an_image_is_mounted_nosuid_and_nodev(
    registry: Registry, tmp_root: Path, public_dir: Path
) -> None:
    img = images.Image(
        [images.Layer(images.compress(t, "gzip"), images.sha256(t), "gzip")
         for t in tars_with_privileges()]
    )
    images.push(registry, "mount/privileged", "1", img)
    ref = f"{registry.host}/mount/privileged:1"
    root_only = public_dir / "root-only"
    root_only.mkdir(mode=0o700)
    target = public_dir / "mnt"
    target.mkdir()
    async with client.RegistryClient(hosts.RegistryHosts(None), None) as rc:
        svc = service.ImageService(
            tmp_root, rc, backend=local_backend.open_store(tmp_root, "overlayfs")
        )
        try:
            await pull(tmp_root, ref, platform=AMD64, svc=svc)
            svc.mount(ref, target)
            try:
                assert {"ro", "nosuid", "nodev"} <= mount_options(target)
                # The image's setuid-root touch, run by nobody, runs as nobody.
                run = subprocess.run(
                    ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                     str(target / "bin/touch"), str(root_only / "pwned")],
                    capture_output=True, text=True,
                )
                assert (target / "bin/touch").stat().st_mode & 0o4000  # still shown as setuid
                assert run.returncode != 0 and "Permission denied" in run.stderr
                assert not (root_only / "pwned").exists()
                # Its device nodes open as nothing, even for root.
                with pytest.raises(PermissionError):
                    (target / "dev/null").open("wb")
            finally:
                svc.unmount(target)
        finally:
            svc.close()


def test_an_image_of_130_layers_mounts(tmp_path: Path) -> None:
    """130 lower directories outgrow the page of mount options the kernel takes; they are
    named relative to the snapshots directory, as containerd does."""
    tars = [L.Layer().file(f"layer-{i:03}", b"%d" % i).file("top", b"%d" % i).tar()
            for i in range(130)]
    img = L.image(tars)
    sn = snapshots.OverlaySnapshotter(tmp_path / "overlay")
    target = tmp_path / "mnt"
    target.mkdir()
    try:
        u = unpack.Unpacker(L.MemoryProvider(img.blobs), sn)  # type: ignore[arg-type]
        top = u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
        (view,) = sn.view("view", top)
        assert len(",".join(view.options)) > os.sysconf("SC_PAGE_SIZE")
        snapshots.mount_all([view], target)
        try:
            names = sorted(os.listdir(target))
            assert names == [f"layer-{i:03}" for i in range(130)] + ["top"]
            assert (target / "top").read_bytes() == b"129"  # the top layer wins
            assert (target / "layer-000").read_bytes() == b"0"
        finally:
            snapshots.unmount(target)
    finally:
        sn.close()
