"""Images of several layers, unpacked by our unpacker and applied by containerd's code:
each upper layer's directory, and the merged view a container sees, must be the same.

containerd's layers are applied as its diff applier does over an overlay snapshot (with the
lower layers as ``WithParents``), ours by the unpacker into our overlay snapshotter (layers
applied concurrently, parent directories copied up at commit). Both stacks are then mounted
read-only as overlays and compared.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.images.unpack import trees

from . import appliers, cases

#: Where the merged view must differ from containerd's (issue #15, "beyond containerd": OCI
#: semantics containerd gets wrong): the paths we must show, given containerd's, and why.
#: Our upper layers differ from containerd's there too (whiteouts for the lower entries, an
#: opaque directory), so only the merged views are compared.
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

#: Where containerd refuses an image by a bug of its own and we unpack it: containerd's
#: error, why, and the paths our merged view shows.
CONTAINERD_REFUSES: dict[str, tuple[str, str, set[str]]] = {
    "lower-file-replaced-by-a-directory-with-implicit-subdirectories": (
        r"layer 1: lstat .*/a/b: not a directory",
        "containerd bug (found by test_fuzz): WithParents' mkparent looks for 'a/b' in the"
        " lower layers, where 'a' is a file, and takes ENOTDIR for an error",
        {"a", "a/b", "a/b/c"},
    ),
    "lower-symlink-loop-replaced-by-a-directory-with-implicit-subdirectories": (
        r"layer 1: lstat .*/a/a: too many levels of symbolic links",
        "containerd bug (found by test_fuzz): WithParents' mkparent looks for 'a/a' in the"
        " lower layers, following the lower 'a -> a' the upper directory replaced, and takes"
        " ELOOP for an error",
        {"a", "a/a", "a/a/a"},
    ),
}

CANARY = Path("/nonexistent-canary")


def _all_cases(canary: Path) -> dict[str, list[bytes]]:
    hostile = {k: v for k, v in cases.hostile(canary).items() if len(v) > 1}
    return {**cases.stacked(), **hostile}


def _params() -> list[object]:
    out: list[object] = []
    for name in _all_cases(CANARY):
        out.append(pytest.param(name, id=name))
    return out


@pytest.mark.parametrize("case", _params())
def test_an_image_unpacks_and_mounts_as_containerd_would(
    case: str, containerd_apply: Path, canary: Path, tmp_path: Path
) -> None:
    tars = _all_cases(canary)[case]
    out = appliers.compare_stacks(containerd_apply, tars, tmp_path)
    if case in CONTAINERD_REFUSES:
        error, _, paths = CONTAINERD_REFUSES[case]
        assert re.search(error, out.theirs_error), out.theirs_error
        assert not out.ours_error
        assert paths <= set(out.merged_ours)
        return
    assert bool(out.ours_error) == bool(out.theirs_error), (out.theirs_error, out.ours_error)
    if case in BEYOND_CONTAINERD:
        expected, _ = BEYOND_CONTAINERD[case]
        assert out.layer_diffs != {}  # the layers say it differently on purpose
        paths_theirs = set(out.merged_theirs) - {".", "hardlinks"}
        assert set(out.merged_ours) - {".", "hardlinks"} == expected(paths_theirs)
    else:
        assert out.layer_diffs == {}
        assert trees.diff(out.merged_theirs, out.merged_ours) == []
