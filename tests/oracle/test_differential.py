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
    "directory-replaced-by-a-file": Intended(
        "containerd bug: its directory mtime pass gives the file that replaced a directory"
        " the directory's mtime; the file keeps its own here (found by test_fuzz)",
        mtimes={"d": (cases.MTIME_DIR, cases.MTIME_FILE)},
    ),
}

#: Cases where our reader or applier differs from containerd by mistake: issue #15's
#: "Differences found" (engineer ``tar`` is fixing them) and what this suite found since.
READER_BUGS: dict[str, str] = {
    "1-leading-nul-in-size": (
        "issue #15 item 1: we cut a numeric field at its first NUL, Go trims leading NULs"
        " (we see size 0 and a hidden entry)"
    ),
    "2-whiteout-with-unknown-type-and-body": (
        "issue #15 item 2: we force an unknown type's size to 0 and read its data as headers"
    ),
    "3-two-pax-headers-in-a-row": (
        "issue #15 item 3: we merge two PAX headers in a row, Go keeps the last"
    ),
    "4-pax-then-global-then-entry": (
        "issue #15 item 4: a global header consumes the pending PAX header in Go, not in ours"
    ),
    "5-old-regular-type-with-slash-and-data": (
        "issue #15 item 5: typeflag NUL with a name ending in '/' is a directory for Go"
    ),
    "6-pax-empty-path": (
        "issue #15 item 6: PAX path='' keeps the ustar name in Go; we apply it to the root"
    ),
    "7-size-with-sign": "issue #15 item 7: Go refuses a '+' in a numeric field, int() takes it",
    "7-size-with-underscore": (
        "issue #15 item 7: Go refuses a '_' in a numeric field, int() takes it"
    ),
    "8-star-prefix": "issue #15 item 8: a STAR header's prefix is 131 bytes, we read 155",
    "8-gnu-non-numeric-atime": (
        "issue #15 item 8: Go reads a GNU header with a non-numeric atime as ustar (prefix)"
    ),
    "9-dot-entry-with-mode-and-owner": (
        "issue #15 item 9: containerd ignores a './' entry, we chmod/chown the root"
    ),
    "10-hardlink-to-absolute-path": (
        "issue #15 item 10: containerd resolves '/a/file' inside the root, we refuse"
    ),
    "11-gnu-sparse-pax-0.1": "issue #15 item 11: PAX 0.1 sparse files are refused",
    "11-gnu-sparse-pax-1.0": "issue #15 item 11: PAX 1.0 sparse files are refused",
    "hardlink-header-metadata": (
        "found by this suite (not in issue #15): containerd applies a hardlink header's"
        " owner, mode and mtime to the shared inode; we keep the target's"
    ),
    "hardlink-to-itself": (
        "found by test_fuzz (not in issue #15): containerd removes 'a' before linking 'a' to"
        " it and refuses the layer; we accept it"
    ),
    "hardlink-replaces-the-directory-holding-its-target": (
        "found by test_fuzz (not in issue #15): containerd removes directory 'a', finds no"
        " 'a/a' to link and refuses the layer; our applier fails with EBADF, an internal"
        " error the agent would retry, not UnsafeLayer"
    ),
    "negative-pax-mtime": (
        "found by test_fuzz (not in issue #15): containerd sets mtimes before 1970 to the"
        " epoch (archive.boundTime); we set them as given"
    ),
    "whiteout-of-an-entry-of-the-same-layer": (
        "found by test_fuzz (not in issue #15): containerd's mknod of the whiteout fails"
        " with EEXIST and the layer is refused (OCI: a whiteout applies to lower layers"
        " only); we replace this layer's own entry by the whiteout and accept it"
    ),
}

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
    case: str, containerd_apply: Path, tmp_path: Path
) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret").write_bytes(b"do not touch")
    before = trees.describe(canary)
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
        elif intended.containerd:
            assert len(tars) == 1
            assert re.search(intended.containerd, theirs.error), theirs.error
            assert mine.accepted, mine.error
        else:
            assert len(tars) == 1
            assert theirs.accepted, f"containerd now refuses it too: {theirs.error}"
            assert not mine.accepted, f"we now accept it: {intended.why}"
            assert re.search(intended.ours, mine.error), mine.error
    assert trees.describe(canary) == before  # nothing written outside either root


def test_the_oracle_reads_tar_as_go_does(containerd_apply: Path) -> None:
    """The oracle's header listing: Go reads item 1's size as 1024 bytes of data, so the
    header inside that data is no entry (ours saw one: the reason for item 1)."""
    (tar,) = cases.issue_15()["1-leading-nul-in-size"]
    headers = appliers.go_headers(containerd_apply, tar)
    assert [(h["name"], h["size"]) for h in headers] == [("a", 1024)]
