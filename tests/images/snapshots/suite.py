"""Conformance checks for any :class:`~agent.images.snapshots.Snapshotter`.

Each check takes a fresh snapshotter and a scratch directory; ``test_*_snapshotter.py``
runs every check in :data:`CHECKS` against one implementation (the local overlayfs and
naive snapshotters, and containerd's through :class:`ContainerdSnapshotter`). Files are
written through the mounts the snapshotter returns (real ``mount``), as a container runtime
would. :data:`STORE_CHECKS` add what only a snapshotter that keeps its snapshots under its
own ``root`` directory promises (no directory left behind, half-built ones swept).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from agent.images import errors, snapshots

Check = Callable[[snapshots.Snapshotter, Path], None]
CHECKS: dict[str, Check] = {}
STORE_CHECKS: dict[str, Check] = {}


def check(fn: Check) -> Check:
    CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


def store_check(fn: Check) -> Check:
    STORE_CHECKS[fn.__name__.removeprefix("check_")] = fn
    return fn


@contextlib.contextmanager
def mounted(mounts: list[snapshots.Mount], target: Path) -> Iterator[Path]:
    target.mkdir(parents=True, exist_ok=True)
    snapshots.mount_all(mounts, target)
    try:
        yield target
    finally:
        snapshots.unmount(target)


def layer(
    sn: snapshots.Snapshotter,
    tmp: Path,
    name: str,
    parent: str,
    write: Callable[[Path], None],
) -> str:
    """Prepare on ``parent``, let ``write`` change the mounted tree, commit as ``name``."""
    key = f"active-{name}"
    with mounted(sn.prepare(key, parent), tmp / f"mnt-{key}") as root:
        write(root)
    sn.commit(name, key)
    return name


def own_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """``labels`` without the runtime's own (``containerd.io/…``)."""
    return {k: v for k, v in labels.items() if not k.startswith("containerd.io/")}


def tree(sn: snapshots.Snapshotter, tmp: Path, parent: str) -> dict[str, bytes | None]:
    """The files (and empty dirs as ``None``) of a read-only view of ``parent``."""
    key = f"view-{parent}-{len(list(sn.walk()))}"
    out: dict[str, bytes | None] = {}
    with mounted(sn.view(key, parent), tmp / f"mnt-{key}") as root:
        for dirpath, dirnames, filenames in os.walk(root):
            for d in dirnames:
                out[os.path.relpath(os.path.join(dirpath, d), root) + "/"] = None
            for f in filenames:
                out[os.path.relpath(os.path.join(dirpath, f), root)] = Path(dirpath, f).read_bytes()
    sn.remove(key)
    return out


def write(files: dict[str, bytes | None]) -> Callable[[Path], None]:
    def do(root: Path) -> None:
        for name, data in files.items():
            p = root / name
            if data is None:
                p.mkdir(parents=True, exist_ok=True)
            else:
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data)

    return do


@check
def check_basic_prepare_write_commit_and_view(sn: snapshots.Snapshotter, tmp: Path) -> None:
    base = layer(sn, tmp, "base", "", write({"a": b"1", "d/b": b"2"}))
    top = layer(sn, tmp, "top", base, write({"c": b"3", "d/b": b"changed"}))
    assert tree(sn, tmp, base) == {"a": b"1", "d/": None, "d/b": b"2"}
    assert tree(sn, tmp, top) == {"a": b"1", "c": b"3", "d/": None, "d/b": b"changed"}


@check
def check_stat_reports_kind_parent_and_labels(sn: snapshots.Snapshotter, tmp: Path) -> None:
    sn.prepare("k", "", {"team": "a", snapshots.LABEL_OWNER: "1:1"})
    info = sn.stat("k")
    assert (info.name, info.parent, info.kind) == ("k", "", snapshots.Kind.ACTIVE)
    assert info.labels["team"] == "a"
    sn.commit("n", "k")
    info = sn.stat("n")
    assert (info.name, info.parent, info.kind) == ("n", "", snapshots.Kind.COMMITTED)
    # The owner label goes away with the commit (containerd's own "containerd.io/" labels,
    # such as the snapshot ref the CRI looks for, are the runtime's business).
    assert own_labels(info.labels) == {"team": "a"}
    assert info.created <= info.updated
    with pytest.raises(errors.NotFound):
        sn.stat("k")
    sn.view("v", "n")
    assert sn.stat("v").kind is snapshots.Kind.VIEW
    assert sn.stat("v").parent == "n"
    assert own_labels(sn.update("n", {"x": "y"}).labels) == {"x": "y"}


@check
def check_keys_and_names_are_unique(sn: snapshots.Snapshotter, tmp: Path) -> None:
    sn.prepare("k")
    with pytest.raises(errors.AlreadyExists):
        sn.prepare("k")
    sn.prepare("k2")
    sn.commit("name", "k")
    with pytest.raises(errors.AlreadyExists):
        sn.commit("name", "k2")
    assert sn.stat("k2").kind is snapshots.Kind.ACTIVE  # a failed commit keeps the key
    with pytest.raises(errors.AlreadyExists):
        sn.prepare("name")


@check
def check_prepare_on_a_missing_or_active_parent_is_refused(
    sn: snapshots.Snapshotter, tmp: Path
) -> None:
    with pytest.raises(errors.NotFound):
        sn.prepare("k", "nope")
    sn.prepare("active")
    with pytest.raises(errors.NotFound):
        sn.prepare("k", "active")
    assert [i.name for i in sn.walk()] == ["active"]


@check
def check_only_active_snapshots_can_be_committed(sn: snapshots.Snapshotter, tmp: Path) -> None:
    sn.prepare("k")
    sn.commit("base", "k")
    sn.view("v", "base")
    with pytest.raises(errors.NotFound):
        sn.commit("x", "v")
    with pytest.raises(errors.NotFound):
        sn.commit("x", "base")
    with pytest.raises(errors.NotFound):
        sn.commit("x", "missing")


@check
def check_remove_refuses_a_parent_with_children(sn: snapshots.Snapshotter, tmp: Path) -> None:
    base = layer(sn, tmp, "base", "", write({"a": b"1"}))
    top = layer(sn, tmp, "top", base, write({"b": b"2"}))
    with pytest.raises(errors.Unavailable):
        sn.remove(base)
    sn.remove(top)
    sn.remove(base)
    assert list(sn.walk()) == []
    with pytest.raises(errors.NotFound):
        sn.remove(base)


@store_check
def check_removed_snapshots_leave_no_directory(sn: snapshots.Snapshotter, tmp: Path) -> None:
    base = layer(sn, tmp, "base", "", write({"a": b"1"}))
    top = layer(sn, tmp, "top", base, write({"b": b"2"}))
    sn.remove(top)
    sn.remove(base)
    root = Path(sn.root)  # type: ignore[attr-defined]
    assert os.listdir(root / "snapshots") == []


@check
def check_walk_lists_every_snapshot_in_creation_order(sn: snapshots.Snapshotter, tmp: Path) -> None:
    sn.prepare("a")
    sn.commit("A", "a")
    sn.prepare("b", "A")
    sn.view("v", "A")
    assert [(i.name, i.kind, i.parent) for i in sn.walk()] == [
        ("A", snapshots.Kind.COMMITTED, ""),
        ("b", snapshots.Kind.ACTIVE, "A"),
        ("v", snapshots.Kind.VIEW, "A"),
    ]


@check
def check_a_file_deleted_in_a_child_is_gone_from_its_view(
    sn: snapshots.Snapshotter, tmp: Path
) -> None:
    base = layer(sn, tmp, "base", "", write({"keep": b"k", "gone": b"g", "dir/x": b"x"}))

    def delete(root: Path) -> None:
        (root / "gone").unlink()
        (root / "dir/x").unlink()
        (root / "dir").rmdir()

    top = layer(sn, tmp, "top", base, delete)
    assert tree(sn, tmp, top) == {"keep": b"k"}
    assert tree(sn, tmp, base) == {"keep": b"k", "gone": b"g", "dir/": None, "dir/x": b"x"}


@check
def check_many_layers_mount_in_order(sn: snapshots.Snapshotter, tmp: Path) -> None:
    parent = ""
    for i in range(12):
        parent = layer(sn, tmp, f"l{i}", parent, write({"top": str(i).encode(), f"f{i}": b""}))
    view = tree(sn, tmp, parent)
    assert view["top"] == b"11"
    assert sorted(k for k in view if k.startswith("f")) == sorted(f"f{i}" for i in range(12))


@check
def check_usage_counts_the_snapshots_own_files(sn: snapshots.Snapshotter, tmp: Path) -> None:
    base = layer(sn, tmp, "base", "", write({"big": b"x" * 100_000, "d/small": b"s"}))
    usage = sn.usage(base)
    # big, d, d/small; containerd's fs.DiskUsage also counts the snapshot's root directory
    assert usage.inodes in (3, 4), usage
    assert usage.size >= 100_000
    top = layer(sn, tmp, "top", base, write({"new": b"n"}))
    assert sn.usage(top).inodes >= 1  # overlay: only "new"; naive: a full copy


@check
def check_mounts_of_an_active_snapshot_can_be_asked_again(
    sn: snapshots.Snapshotter, tmp: Path
) -> None:
    base = layer(sn, tmp, "base", "", write({"a": b"1"}))
    first = sn.prepare("k", base)
    assert sn.mounts("k") == first
    with pytest.raises(errors.NotFound):
        sn.mounts("missing")


@check
def check_cleanup_removes_leftovers_of_a_killed_process(
    sn: snapshots.Snapshotter, tmp: Path
) -> None:
    base = layer(sn, tmp, "base", "", write({"a": b"1"}))
    dead = "999999999:1"  # no such process
    sn.prepare("dead-owner", base, {snapshots.LABEL_OWNER: dead})
    sn.prepare("live-owner", base, {snapshots.LABEL_OWNER: snapshots.snapshotter.owner_token()})
    sn.prepare("no-owner", base)
    removed = sn.cleanup()  # type: ignore[attr-defined]
    assert set(removed) == {"dead-owner"}
    assert sorted(i.name for i in sn.walk()) == ["base", "live-owner", "no-owner"]


@store_check
def check_cleanup_removes_half_built_directories(sn: snapshots.Snapshotter, tmp: Path) -> None:
    base = layer(sn, tmp, "base", "", write({"a": b"1"}))
    sn.prepare("dead-owner", base, {snapshots.LABEL_OWNER: "999999999:1"})
    root = Path(sn.root)  # type: ignore[attr-defined]
    (root / "snapshots" / "new-half-built" / "fs").mkdir(parents=True)
    (root / "snapshots" / "rm-7").mkdir()
    (root / "snapshots" / "4242" / "fs").mkdir(parents=True)  # a directory without a row
    removed = sn.cleanup()  # type: ignore[attr-defined]
    assert set(removed) == {"dead-owner", "new-half-built", "rm-7", "4242"}
    assert sorted(i.name for i in sn.walk()) == ["base"]
    assert len(os.listdir(root / "snapshots")) == 1
