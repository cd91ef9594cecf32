"""Images of several layers, unpacked by our unpacker and applied by containerd's code:
each upper layer's directory, and the merged view a container sees, must be the same.

containerd's layers are applied as its diff applier does over an overlay snapshot (with the
lower layers as ``WithParents``), ours by the unpacker into our overlay snapshotter (layers
applied concurrently, parent directories copied up at commit). Both stacks are then mounted
read-only as overlays and compared.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from agent.images import snapshots
from tests.images.unpack import trees

from . import appliers, cases

#: Where the merged view must differ from containerd's (issue #15, "beyond containerd": OCI
#: semantics containerd gets wrong): the paths we must show, given containerd's. Strict
#: xfails until the fix lands; then the xfail goes and the assertion stays.
BEYOND_CONTAINERD: dict[str, tuple[Callable[[set[str]], set[str]], str]] = {
    "opaque-at-layer-root-over-lower": (
        lambda theirs: {"new"},
        "issue #15 beyond containerd: overlayfs ignores an opaque xattr on a layer's root, so"
        " '.wh..wh..opq' at the root must hide every lower entry some other way",
    ),
    "whiteout-and-recreate-over-lower": (
        lambda theirs: theirs - {"d/x", "d/y"},
        "issue #15 beyond containerd: a directory removed by a whiteout and re-created in"
        " the same layer must not show lower content (it needs the opaque xattr)",
    ),
}

CANARY = Path("/nonexistent-canary")


def _all_cases(canary: Path) -> dict[str, list[bytes]]:
    hostile = {k: v for k, v in cases.hostile(canary).items() if len(v) > 1}
    return {**cases.stacked(), **hostile}


def _params() -> list[object]:
    out: list[object] = []
    for name in _all_cases(CANARY):
        marks = []
        if name in BEYOND_CONTAINERD:
            marks.append(pytest.mark.xfail(strict=True, reason=BEYOND_CONTAINERD[name][1]))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def _mounted(mount: snapshots.Mount, target: Path) -> dict[str, object]:
    target.mkdir()
    mount.mount(target)
    try:
        return trees.describe(target, with_root=True)
    finally:
        snapshots.unmount(target)


@pytest.mark.parametrize("case", _params())
def test_an_image_unpacks_and_mounts_as_containerd_would(
    case: str, containerd_apply: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    before = trees.describe(canary)
    tars = _all_cases(canary)[case]
    theirs = appliers.containerd_stack(containerd_apply, tars, tmp_path / "containerd")
    mine, sn = appliers.our_stack(tars, tmp_path / "ours")
    try:
        assert bool(mine.error) == bool(theirs.error), (theirs.error, mine.error)
        if mine.error:
            return
        # Each upper layer's own directory (the bottom one differs on purpose: containerd
        # removes its whiteouts, we convert them; the merged view below is the same).
        for i in range(1, len(tars)):
            ours_i = appliers.describe(mine.layers[i])
            theirs_i = appliers.describe(theirs.layers[i])
            assert trees.diff(theirs_i, ours_i) == [], f"layer {i}"
        merged_theirs = _mounted(appliers.merged_mount(theirs.layers, tmp_path / "m1"),
                                 tmp_path / "m1")
        merged_ours = _mounted(appliers.merged_mount(mine.layers, tmp_path / "m2"),
                               tmp_path / "m2")
        if case in BEYOND_CONTAINERD:
            expected, _ = BEYOND_CONTAINERD[case]
            paths_theirs = set(merged_theirs) - {".", "hardlinks"}
            assert set(merged_ours) - {".", "hardlinks"} == expected(paths_theirs)
        else:
            assert trees.diff(merged_theirs, merged_ours) == []
    finally:
        sn.close()
    assert trees.describe(canary) == before  # nothing written outside either stack
