from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.images import snapshots

MountView = Callable[[snapshots.Snapshotter, str], Path]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: overlay mounts, mknod, trusted.* xattrs")
        for item in items:
            if "images/unpack" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture
def overlay_sn(tmp_path: Path) -> Iterator[snapshots.OverlaySnapshotter]:
    sn = snapshots.OverlaySnapshotter(tmp_path / "overlay")
    yield sn
    sn.close()


@pytest.fixture
def naive_sn(tmp_path: Path) -> Iterator[snapshots.NaiveSnapshotter]:
    sn = snapshots.NaiveSnapshotter(tmp_path / "naive")
    yield sn
    sn.close()


@pytest.fixture
def mount_view(tmp_path: Path) -> Iterator[MountView]:
    """``mount_view(sn, top)``: mount a read-only view of ``top``; unmounted at teardown."""
    targets: list[Path] = []
    counter = itertools.count()

    def mount(sn: snapshots.Snapshotter, top: str) -> Path:
        n = next(counter)
        target = tmp_path / f"mnt-{n}"
        target.mkdir()
        snapshots.mount_all(sn.view(f"view-{n}", top), target)
        targets.append(target)
        return target

    yield mount
    for target in reversed(targets):
        snapshots.unmount(target)  # os.path.ismount misses binds within one filesystem
