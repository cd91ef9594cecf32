"""Every tricky layer we know, applied by containerd's own code and by ours: same verdict,
same tree.

The tree covers names, types, modes, owners, xattrs (``trusted.overlay.opaque`` included),
link targets, contents, whiteout devices and the root directory itself. Two tables name
every case where the two differ today:

* :data:`INTENDED_DIFFERENCES`: we differ on purpose: we refuse what containerd applies,
  confined, but which no honest image carries; or containerd has a bug (it refuses a valid
  layer, or gives an entry another's mtime). The test asserts that exact difference.
* :data:`READER_BUGS`: our tar reader or applier is wrong (issue #15's "Differences found",
  and what this suite and ``test_fuzz`` found since): strict xfails, so each one fails
  loudly once fixed and must be flipped here.

Each layer is applied into a fresh directory, as containerd applies a layer into an overlay
upper directory whose lower layers hold none of its paths (``test_merged_views`` stacks
layers).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.images.unpack import trees

from . import appliers, cases


@dataclass(frozen=True)
class Intended:
    """Why we differ, and how: containerd applies the layer and we refuse it with ``ours``
    (a regular expression of our error); or, with ``containerd``, containerd refuses it
    with that error (a containerd bug) and we apply it."""

    why: str
    ours: str = ""
    containerd: str = ""
    #: Both apply it, and the trees differ only in these paths' mtimes:
    #: ``{path: (containerd's, ours)}``.
    mtimes: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: Both apply it, and ours differs only in carrying these xattrs: ``{path: {name: value}}``.
    extra_xattrs: dict[str, dict[str, bytes]] = field(default_factory=dict)


_STRICTER_PATHS = (
    "a name with '..' or an absolute name is an attack or a broken writer; containerd "
    "re-roots it, we refuse the layer"
)
_STRICTER_SYMLINK = (
    "an entry below a symlink that points out of the root: containerd re-roots the "
    "symlink's target and writes there, we refuse the layer"
)
_STRICTER_TRUSTED = (
    "a layer carrying trusted.* xattrs (overlayfs' own metadata) is hostile; containerd "
    "accepts it (dropping the xattr), we refuse it"
)

INTENDED_DIFFERENCES: dict[str, Intended] = {
    "hostile-dotdot-file": Intended(_STRICTER_PATHS, "has a '..' component"),
    "hostile-dotdot-inside-name": Intended(_STRICTER_PATHS, "has a '..' component"),
    "hostile-dotdot-dir": Intended(_STRICTER_PATHS, "has a '..' component"),
    "hostile-dotdot-in-pax-path": Intended(_STRICTER_PATHS, "has a '..' component"),
    "hostile-whiteout-dotdot-parent": Intended(_STRICTER_PATHS, "has a '..' component"),
    "hostile-absolute-file": Intended(_STRICTER_PATHS, "is an absolute path"),
    "hostile-absolute-dir": Intended(_STRICTER_PATHS, "is an absolute path"),
    "hostile-symlink-escape-absolute": Intended(_STRICTER_SYMLINK, "goes through a symlink"),
    "hostile-symlink-escape-relative": Intended(_STRICTER_SYMLINK, "goes through a symlink"),
    "hostile-symlink-chain-escape": Intended(_STRICTER_SYMLINK, "goes through a symlink"),
    "hostile-trusted-overlay-opaque-xattr": Intended(_STRICTER_TRUSTED, "trusted.overlay.opaque"),
    "hostile-trusted-overlay-redirect-xattr": Intended(
        _STRICTER_TRUSTED, "trusted.overlay.redirect"
    ),
    "hostile-trusted-other-xattr": Intended(_STRICTER_TRUSTED, "'trusted.x'"),
    "directory-replaced-by-a-dangling-symlink": Intended(
        "containerd bug: its last pass sets directory mtimes through paths that a later"
        " entry made symlinks, and fails on a dangling one (found by test_fuzz)",
        containerd="UtimesNanoAt .*: no such file or directory",
    ),
    "directory-replaced-by-a-symlink-to-itself": Intended(
        "containerd bug: its directory mtime pass follows the symlink that replaced the"
        " directory, and fails (found by test_fuzz)",
        containerd="too many links",
    ),
    "implicit-directory-replaced-by-a-file": Intended(
        "containerd bug: its directory mtime pass resolves 'a/a' through the file that"
        " replaced its parent, and fails with ENOTDIR (found by test_fuzz)",
        containerd="lstat .*: not a directory",
    ),
    "directory-replaced-by-a-file": Intended(
        "containerd bug: its directory mtime pass gives the file that replaced a directory"
        " the directory's mtime; the file keeps its own here (found by test_fuzz)",
        mtimes={"d": (cases.MTIME_DIR, cases.MTIME_FILE)},
    ),
    "whiteout-and-recreate-in-one-layer": Intended(
        "beyond containerd (OCI layer semantics): a directory whited out and re-created in"
        " the same layer replaces the lower one, so ours is opaque; containerd's is not, and"
        " the merged view shows the lower directory's content through it",
        extra_xattrs={"d": {"trusted.overlay.opaque": b"y"}},
    ),
}

#: Cases where our reader or applier differs from containerd by mistake (strict xfails until
#: fixed). Issue #15's "Differences found" and what this suite and test_fuzz found since are
#: all fixed now; a new divergence goes here with its reason, or is fixed at once.
READER_BUGS: dict[str, str] = {}


CANARY = Path("/nonexistent-canary")  # hostile layers' names only; rebuilt per test


def _all_cases(canary: Path) -> dict[str, list[bytes]]:
    return {**cases.ordinary(), **cases.issue_15(), **cases.hostile(canary)}


def _params() -> list[object]:
    out: list[object] = []
    for name in _all_cases(CANARY):
        marks = []
        if name in READER_BUGS:
            marks.append(pytest.mark.xfail(strict=True, reason=READER_BUGS[name]))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def test_the_tables_name_only_existing_cases() -> None:
    names = set(_all_cases(CANARY))
    assert set(INTENDED_DIFFERENCES) <= names
    assert set(READER_BUGS) <= names
    assert not set(INTENDED_DIFFERENCES) & set(READER_BUGS)


def _explain(tool: Path, tar: bytes, theirs: appliers.Outcome, mine: appliers.Outcome) -> str:
    lines = [f"containerd: {theirs.error or 'accepted'}", f"ours: {mine.error or 'accepted'}"]
    if theirs.accepted and mine.accepted:
        lines += ["tree differences (containerd != ours):", *trees.diff(theirs.tree, mine.tree)]
    lines.append("Go archive/tar reads:")
    lines += [json.dumps(h) for h in appliers.go_headers(tool, tar)]
    return "\n".join(lines)


@pytest.mark.parametrize("case", _params())
def test_a_layer_applies_as_containerd_applies_it(
    case: str, containerd_apply: Path, canary: Path, tmp_path: Path
) -> None:
    tars = _all_cases(canary)[case]
    for i, tar in enumerate(tars):
        theirs = appliers.containerd(containerd_apply, tar, tmp_path / f"containerd-{i}")
        mine = appliers.ours(tar, tmp_path / f"ours-{i}")
        intended = INTENDED_DIFFERENCES.get(case)
        if intended is None:
            assert mine.view() == theirs.view(), _explain(containerd_apply, tar, theirs, mine)
        elif intended.mtimes:
            assert theirs.accepted and mine.accepted, (theirs.error, mine.error)
            for path, (theirs_mtime, mine_mtime) in intended.mtimes.items():
                assert theirs.tree[path].pop("mtime") == theirs_mtime
                assert mine.tree[path].pop("mtime") == mine_mtime
            assert mine.view() == theirs.view(), _explain(containerd_apply, tar, theirs, mine)
        elif intended.extra_xattrs:
            assert theirs.accepted and mine.accepted, (theirs.error, mine.error)
            for path, xattrs in intended.extra_xattrs.items():
                for name, value in xattrs.items():
                    assert name not in theirs.tree[path]["xattrs"]
                    assert mine.tree[path]["xattrs"].pop(name) == value
            assert mine.view() == theirs.view(), _explain(containerd_apply, tar, theirs, mine)
        elif intended.containerd:
            assert len(tars) == 1
            assert re.search(intended.containerd, theirs.error), theirs.error
            assert mine.accepted, mine.error
        else:
            assert len(tars) == 1
            assert theirs.accepted, f"containerd now refuses it too: {theirs.error}"
            assert not mine.accepted, f"we now accept it: {intended.why}"
            assert re.search(intended.ours, mine.error), mine.error


def test_the_oracle_reads_tar_as_go_does(containerd_apply: Path) -> None:
    """The oracle's header listing: Go reads item 1's size as 1024 bytes of data, so the
    header inside that data is no entry (ours saw one: the reason for item 1)."""
    (tar,) = cases.issue_15()["1-leading-nul-in-size"]
    headers = appliers.go_headers(containerd_apply, tar)
    assert [(h["name"], h["size"]) for h in headers] == [("a", 1024)]
