"""Kill -9 an unpack at several points; rerun; the result mounts as a clean unpack does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.images import snapshots

from . import trees
from .conftest import MountView

SCRIPT = Path(__file__).with_name("unpacking_process.py")


def run(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(root), "--files", "300", *args],
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def clean_tree(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("clean")
    proc = run(root / "sn")
    assert proc.returncode == 0, proc.stderr
    sn = snapshots.OverlaySnapshotter(root / "sn")
    target = root / "mnt"
    target.mkdir()
    snapshots.mount_all(sn.view("v", proc.stdout.strip()), target)
    try:
        return trees.describe(target)
    finally:
        snapshots.unmount(target)
        sn.close()


@pytest.mark.parametrize(
    "kill_at",
    ["started:0", "progress:0:2", "done:0", "started:1", "progress:2:3", "done:2"],
)
def test_a_killed_unpack_is_cleaned_up_and_completes_on_rerun(
    kill_at: str, tmp_path: Path, clean_tree: dict, mount_view: MountView
) -> None:
    root = tmp_path / "sn"
    killed = run(root, "--kill-at", kill_at, "--sync-fs", "unpacker")
    assert killed.returncode == -signal.SIGKILL, killed.stderr

    sn = snapshots.OverlaySnapshotter(root)
    leftovers = [i for i in sn.walk() if i.kind is not snapshots.Kind.COMMITTED]
    removed = sn.cleanup()
    assert {i.name for i in leftovers} <= set(removed)
    assert all(i.kind is snapshots.Kind.COMMITTED for i in sn.walk())
    ids = {str(i) for i in range(1, 100)}
    assert all(name in ids for name in os.listdir(root / "snapshots"))
    sn.close()

    again = run(root, "--cleanup")
    assert again.returncode == 0, again.stderr
    sn = snapshots.OverlaySnapshotter(root)
    assert trees.diff(trees.describe(mount_view(sn, again.stdout.strip())), clean_tree) == []
    assert len([i for i in sn.walk() if i.kind is snapshots.Kind.COMMITTED]) == 3
