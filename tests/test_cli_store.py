"""``prefetcher images ls | mount | umount | rm | gc`` on a store the real CLI pulled into."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import images
from fixtures.registries import Registry

from tests.images.pulling import stored_blobs
from tests.test_cli_pull import prefetcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay mounts")


@pytest.fixture
def two_images(registry: Registry, tmp_path: Path) -> tuple[Path, str, str, images.Image]:
    """A store holding two unpacked images that share a 200 kB base layer."""
    base = images.random_layer(200_000, files=3, seed=51)
    app = images.Image([base, images.layer({"app/hello": "hello from app\n"})])
    other = images.Image([base, images.layer({"other/file": "other\n"})])
    images.push(registry, "store/app", "1.4", app)
    images.push(registry, "store/other", "2", other)
    root = tmp_path / "store"
    refs = (f"{registry.host}/store/app:1.4", f"{registry.host}/store/other:2")
    for ref in refs:
        out = prefetcher("pull", ref, "--root", str(root), "--quiet")
        assert out.returncode == 0, out.stderr
    return root, refs[0], refs[1], app


def test_images_ls_lists_references_digests_and_readiness(two_images: tuple) -> None:
    root, app_ref, other_ref, app = two_images
    table = prefetcher("images", "ls", "--root", str(root))
    assert table.returncode == 0
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["REFERENCE", "DIGEST", "PLATFORM", "SIZE", "UNPACKED", "PULLED"]
    app_row = next(line for line in lines if line.startswith(app_ref))
    assert app.digest.split(":")[1][:12] in app_row and " yes " in app_row

    listed = json.loads(prefetcher("images", "ls", "--root", str(root), "--json").stdout)
    assert [i["name"] for i in listed] == sorted([app_ref, other_ref])
    assert all(i["unpacked"] and i["chain_id"] for i in listed)


def test_mount_shows_the_image_read_only_and_umount_removes_it(
    two_images: tuple, tmp_path: Path
) -> None:
    root, app_ref, _, _ = two_images
    target = tmp_path / "mnt"
    target.mkdir()
    out = prefetcher("mount", app_ref, str(target), "--root", str(root))
    assert out.returncode == 0, out.stderr
    try:
        assert (target / "app/hello").read_text() == "hello from app\n"
        assert sorted(os.listdir(target / "data")) != []  # the shared base layer
        with pytest.raises(OSError):
            (target / "new-file").write_text("x")  # read-only
        # A mounted image's snapshots are in use: gc leaves them.
        assert json.loads(prefetcher("gc", "--root", str(root), "--json").stdout)[
            "snapshots_removed"] == []
    finally:
        umount = prefetcher("umount", str(target), "--root", str(root))
    assert umount.returncode == 0, umount.stderr
    assert not os.path.ismount(target) and os.listdir(target) == []
    again = prefetcher("umount", str(target), "--root", str(root))
    assert again.returncode == 1 and "not a prefetcher mount" in again.stderr


def test_rm_removes_what_only_that_image_needed(two_images: tuple) -> None:
    root, app_ref, other_ref, app = two_images
    out = prefetcher("rm", app_ref, "--root", str(root), "--json")
    assert out.returncode == 0, out.stderr
    removed = json.loads(out.stdout)
    assert removed["images_removed"] == [app_ref]
    # Its manifest, config and top layer went; the base layer stays for the other image.
    assert set(removed["blobs_removed"]) == {
        app.digest, app.config.digest, app.layers[1].digest
    }
    assert len(removed["snapshots_removed"]) == 1
    assert app.layers[0].digest in stored_blobs(root)
    listed = json.loads(prefetcher("images", "ls", "--root", str(root), "--json").stdout)
    assert [i["name"] for i in listed] == [other_ref]
    # Nothing else is garbage now.
    assert json.loads(prefetcher("gc", "--root", str(root), "--json").stdout)["blobs_removed"] == []


def test_rm_of_an_unknown_image_removes_nothing(two_images: tuple) -> None:
    root, app_ref, _, _ = two_images
    before = stored_blobs(root)
    out = prefetcher("rm", app_ref, "127.0.0.1:1/not/there:1", "--root", str(root))
    assert out.returncode == 1 and "not/there" in out.stderr
    assert stored_blobs(root) == before


def test_gc_refuses_a_store_another_process_has_open(two_images: tuple) -> None:
    root, _, _, _ = two_images
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from agent.images import service;"
         " from agent.images.registry import client, hosts;"
         f" s = service.ImageService({str(root)!r}, client.RegistryClient(hosts.RegistryHosts()));"
         " print('open', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "open"
        out = prefetcher("gc", "--root", str(root))
        assert out.returncode == 1 and "in use by another prefetcher process" in out.stderr
    finally:
        holder.kill()
        holder.wait()
    assert prefetcher("gc", "--root", str(root)).returncode == 0
