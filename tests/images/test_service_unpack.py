"""Pull + unpack through the service against the real registry: the mounted overlay chain
equals ``umoci unpack`` of the same image copied out of the same registry by skopeo."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import images
from fixtures import layers as L
from fixtures.faultproxy import FaultProxy
from fixtures.registries import Registry

from agent.images import descriptors, errors, snapshots
from tests.images.pulling import pull
from tests.images.unpack import trees
from tests.images.unpack.test_unpacked_tree_matches_umoci import rich_image_tars

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: overlay mounts, mknod, trusted.* xattrs"
)
AMD64 = descriptors.Platform("linux", "amd64")


def image_of(tars: list[bytes], compression: images.Compression = "gzip") -> images.Image:
    return images.Image(
        [images.Layer(images.compress(t, compression), images.sha256(t), compression)
         for t in tars]
    )


@pytest.fixture
def mounted(tmp_path: Path) -> Iterator[list[Path]]:
    targets: list[Path] = []
    yield targets
    for target in reversed(targets):
        snapshots.unmount(target)


def mount_image(root: Path, chain_id: str, target: Path, mounted: list[Path]) -> Path:
    sn = snapshots.OverlaySnapshotter(root / "snapshots")
    try:
        target.mkdir()
        snapshots.mount_all(sn.view(f"test-view-{target.name}", chain_id), target)
        mounted.append(target)
    finally:
        sn.close()
    return target


def umoci_tree(registry: Registry, repo: str, tag: str, tmp_path: Path) -> dict[str, object]:
    layout = tmp_path / "oci"
    subprocess.run(
        ["skopeo", "copy", "--src-tls-verify=false", f"docker://{registry.host}/{repo}:{tag}",
         f"oci:{layout}:{tag}"],
        check=True, capture_output=True, timeout=120,
    )
    bundle = tmp_path / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{tag}", str(bundle)],
                   check=True, capture_output=True, timeout=120)
    return trees.describe(bundle / "rootfs")


async def test_a_pulled_image_mounts_the_same_tree_as_umoci(
    registry: Registry, tmp_root: Path, tmp_path: Path, mounted: list[Path]
) -> None:
    image = image_of(rich_image_tars())
    images.push(registry, "unpack/rich", "1", image)

    result = await pull(
        tmp_root, f"{registry.host}/unpack/rich:1", platform=AMD64, snapshotter="overlayfs"
    )

    assert result.chain_id
    ours = trees.describe(mount_image(tmp_root, result.chain_id, tmp_path / "mnt", mounted))
    theirs = umoci_tree(registry, "unpack/rich", "1", tmp_path)
    assert trees.diff(ours, theirs) == []


async def test_a_second_pull_of_an_unpacked_image_fetches_and_unpacks_nothing(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    image = image_of(rich_image_tars())
    images.push(fault_proxy.upstream, "unpack/again", "1", image)
    ref = f"{fault_proxy.host}/unpack/again:1"
    first = await pull(tmp_root, ref, platform=AMD64, snapshotter="overlayfs")
    snapshots_before = sorted(p.name for p in (tmp_root / "snapshots/snapshots").iterdir())
    fault_proxy.clear_requests()

    second = await pull(tmp_root, ref, platform=AMD64, snapshotter="overlayfs")

    assert second.chain_id == first.chain_id and second.bytes_downloaded == 0
    assert fault_proxy.requests_to("/blobs/") == []
    assert sorted(p.name for p in (tmp_root / "snapshots/snapshots").iterdir()) == snapshots_before


async def test_layers_whose_snapshots_exist_are_not_downloaded_again(
    fault_proxy: FaultProxy, tmp_root: Path
) -> None:
    tars = rich_image_tars()
    base = image_of(tars[:2])
    app = image_of([*tars[:2], L.Layer().file("app/bin", b"\x7fELF").tar()])
    images.push(fault_proxy.upstream, "unpack/base", "1", base)
    images.push(fault_proxy.upstream, "unpack/app", "1", app)
    await pull(tmp_root, f"{fault_proxy.host}/unpack/base:1", platform=AMD64,
               snapshotter="overlayfs")
    for layer in base.layers:  # as discard_unpacked_layers would
        (tmp_root / "content/blobs/sha256" / layer.digest.split(":")[1]).unlink()
    fault_proxy.clear_requests()

    result = await pull(tmp_root, f"{fault_proxy.host}/unpack/app:1", platform=AMD64,
                        snapshotter="overlayfs")

    fetched = {r.path.rsplit("/", 1)[-1] for r in fault_proxy.requests_to("/blobs/", "GET")}
    assert fetched == {app.config.digest, app.layers[2].digest}
    assert result.layers == 3 and result.chain_id


async def test_a_layer_that_does_not_match_its_diff_id_leaves_no_snapshot(
    registry: Registry, tmp_root: Path
) -> None:
    tars = rich_image_tars()
    honest = image_of(tars[:2])
    lying = images.Image(
        [honest.layers[0], images.Layer(honest.layers[1].data, images.sha256(b"other"))]
    )
    images.push(registry, "unpack/lying", "1", lying)

    with pytest.raises(errors.DigestMismatch, match="diff"):
        await pull(tmp_root, f"{registry.host}/unpack/lying:1", platform=AMD64,
                   snapshotter="overlayfs")

    sn = snapshots.OverlaySnapshotter(tmp_root / "snapshots")
    try:
        kinds = [(i.kind.name, i.name) for i in sn.walk()]
    finally:
        sn.close()
    assert ("COMMITTED", lying.layers[1].diff_id) not in kinds
    assert all(kind == "COMMITTED" for kind, _ in kinds)  # no active leftovers


async def test_a_hostile_layer_is_refused_and_writes_nothing_outside_the_root(
    registry: Registry, tmp_root: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    escape = L.Layer().symlink("evil", str(canary)).file("evil/owned", b"gotcha").tar()
    traversal = L.Layer().file("../../../canary-traversal", b"x").tar()
    for repo, tar in (("unpack/escape", escape), ("unpack/traversal", traversal)):
        images.push(registry, repo, "1", image_of([tar]))
        try:
            await pull(tmp_root, f"{registry.host}/{repo}:1", platform=AMD64,
                       snapshotter="overlayfs")
        except errors.UnsafeLayer:
            pass
    assert list(canary.iterdir()) == []
    assert not (tmp_path.parent / "canary-traversal").exists()
    assert not list(tmp_path.rglob("canary-traversal"))


async def test_sync_fs_pulls_call_syncfs_per_layer_before_commit(
    registry: Registry, tmp_path: Path
) -> None:
    """strace of the real CLI: each layer's syncfs comes before the snapshot metadata
    commit that follows it; without --sync-fs there is no syncfs at all."""
    image = image_of(rich_image_tars()[:3])
    images.push(registry, "unpack/syncfs", "1", image)
    ref = f"{registry.host}/unpack/syncfs:1"
    prefetcher = str(Path(os.sys.executable).with_name("prefetcher"))  # type: ignore[attr-defined]

    def traced(root: Path, *flags: str) -> list[str]:
        log = root.with_suffix(".strace")
        subprocess.run(
            ["strace", "-f", "-qq", "-o", str(log), "-e",
             "trace=syncfs,fdatasync", prefetcher, "pull", ref,
             "--root", str(root), "--quiet", *flags],
            check=True, capture_output=True, timeout=120,
        )
        return log.read_text().splitlines()

    synced = traced(tmp_path / "synced", "--sync-fs")
    syncs = [i for i, line in enumerate(synced) if "syncfs(" in line]
    # At least one per layer (one more where a layer's implicit parent dirs were copied up);
    # the order within each layer is proven in tests/images/unpack/test_syncfs_*.
    assert len(syncs) >= 3
    # Nothing is recorded as pulled before the last layer was synced: the image record's
    # database is written last.
    records_sync = max(i for i, line in enumerate(synced) if "fdatasync(" in line)
    assert records_sync > max(syncs)
    plain = traced(tmp_path / "plain")
    assert not [line for line in plain if "syncfs(" in line]
