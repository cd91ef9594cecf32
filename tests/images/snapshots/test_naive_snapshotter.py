from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.images import snapshots

from . import suite

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for bind mounts")


@pytest.mark.parametrize("name", sorted(suite.CHECKS.keys() | suite.STORE_CHECKS.keys()))
def test_naive_snapshotter_conforms(name: str, tmp_path: Path) -> None:
    sn = snapshots.NaiveSnapshotter(tmp_path / "root")
    try:
        (suite.CHECKS | suite.STORE_CHECKS)[name](sn, tmp_path)
    finally:
        sn.close()


def test_a_child_snapshot_is_a_full_copy_of_its_parent(tmp_path: Path) -> None:
    sn = snapshots.NaiveSnapshotter(tmp_path)
    (m,) = sn.prepare("a")
    Path(m.source, "f").write_bytes(b"1")
    os.link(Path(m.source, "f"), Path(m.source, "g"))
    os.setxattr(Path(m.source, "f"), "user.k", b"v")
    sn.commit("A", "a")
    (m2,) = sn.prepare("b", "A")
    assert m2.type == "bind"
    copy = Path(m2.source)
    assert (copy / "f").read_bytes() == b"1"
    assert os.getxattr(copy / "f", "user.k") == b"v"
    assert (copy / "f").stat().st_ino == (copy / "g").stat().st_ino


def test_the_naive_snapshotter_cannot_rebase(tmp_path: Path) -> None:
    sn = snapshots.NaiveSnapshotter(tmp_path)
    sn.prepare("a")
    sn.commit("A", "a")
    sn.prepare("b")
    with pytest.raises(ValueError):
        sn.commit("B", "b", parent="A")
