"""kill -9 of ``prefetcher pull`` at several points, then a rerun: the result mounts exactly
like a clean pull, and nothing half-done is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures import images
from fixtures.registries import Registry

from agent.images import snapshots
from tests.images.unpack import trees
from tests.test_cli_pull import PREFETCHER, prefetcher

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: overlay mounts")


@pytest.fixture(scope="module")
def crash_image(registry: Registry) -> str:
    image = images.Image(
        [images.random_layer(6_000_000, files=1500, seed=70 + i) for i in range(3)]
    )
    images.push(registry, "crash/app", "1", image)
    return f"{registry.host}/crash/app:1"


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    mounted: list[Path] = []
    yield mounted
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)


def pulled_tree(root: Path, ref: str, target: Path, mounts: list[Path]) -> dict[str, object]:
    target.mkdir()
    out = prefetcher("mount", ref, str(target), "--root", str(root))
    assert out.returncode == 0, out.stderr
    mounts.append(target)
    return trees.describe(target)


def kill_when(ref: str, root: Path, marker: str, occurrence: int = 1) -> None:
    """Start a pull and SIGKILL it when ``marker`` has appeared ``occurrence`` times."""
    proc = subprocess.Popen(
        [PREFETCHER, "pull", ref, "--root", str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        if marker in line:
            seen += 1
            if seen == occurrence:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the pull ended before '{marker}'"


@pytest.mark.parametrize(
    ("marker", "occurrence"),
    [(": done ", 2), ("Unpacking", 1), (": unpacked", 1), (": unpacked", 2)],
    ids=["mid-download", "unpack-starting", "after-first-layer", "after-second-layer"],
)
def test_a_pull_killed_midway_completes_on_rerun_identical_to_a_clean_pull(
    crash_image: str, tmp_path: Path, mounts: list[Path], marker: str, occurrence: int
) -> None:
    clean_root = tmp_path / "clean"
    assert prefetcher("pull", crash_image, "--root", str(clean_root), "-q").returncode == 0
    expected = pulled_tree(clean_root, crash_image, tmp_path / "clean-mnt", mounts)

    root = tmp_path / "crashed"
    kill_when(crash_image, root, marker, occurrence)
    rerun = prefetcher("pull", crash_image, "--root", str(root), "--json")
    assert rerun.returncode == 0, rerun.stderr

    assert trees.diff(pulled_tree(root, crash_image, tmp_path / "mnt", mounts), expected) == []
    sn = snapshots.OverlaySnapshotter(root / "snapshots")
    try:
        kinds = {i.kind.name for i in sn.walk() if not i.name.startswith("mount:")}
    finally:
        sn.close()
    assert kinds == {"COMMITTED"}  # no active snapshot survived the crash
    assert not [p for p in (root / "snapshots/snapshots").iterdir() if p.name.startswith("new-")]
    assert list((root / "content/ingest").iterdir()) == []
