"""The applier's quick path for plain files gives the tree (or the refusal) of the full path.

``_Applier._plain_file`` applies a regular file whose parent directory is already open
without the per-entry checks of ``_entry``; it must take only names those checks would pass
unchanged. Each layer here opens a directory first (so the quick path is on offer) and then
names a file in every shape where the two could part: whiteouts, ``.``/``..``/empty
components, leading and trailing slashes, dotfiles, a file over a file, over a directory,
over a symlink, in a setgid directory, owned by someone else, and in the naive snapshotter's
whiteout mode. Applied with the quick path and without it, both must give the same tree
and the same verdict.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from fixtures import layers as L
from fixtures import rawtar as R
from fixtures.rawtar import END

from agent.images import errors
from agent.images.unpack import archive, whiteouts

from . import trees

LOWER = (
    L.Layer()
    .dir("a")
    .file("a/x", b"lower x")
    .file("a/y", b"lower y")
    .dir("a/d")
    .file("a/d/inner", b"inner")
    .symlink("a/s", "x")
    .file(".hidden", b"lower dotfile")
    .tar()
)

# Each case: raw entries after an entry that opens "a" (a file in it).
CASES: dict[str, bytes] = {
    "plain": R.entry(b"a/new", b"new"),
    "over a file": R.entry(b"a/x", b"upper x"),
    "over a directory": R.entry(b"a/d", b"file now"),
    "over a symlink": R.entry(b"a/s", b"not a link"),
    "over the open directory": R.entry(b"a", b"a file"),
    "in the root": R.entry(b"top", b"top"),
    "whiteout": R.entry(b"a/.wh.y"),
    "opaque marker": R.entry(b"a/.wh..wh..opq"),
    "dotfile": R.entry(b"a/.dot", b"dot"),
    "dot component": R.entry(b"a/./z", b"z"),
    "empty component": R.entry(b"a//z", b"z"),
    "dotdot": R.entry(b"a/../z", b"z"),
    "absolute": R.entry(b"/a/z", b"z"),
    "trailing slash": R.entry(b"a/z/", b"z"),
    "trailing slash on an open directory": R.entry(b"a/", b"a file"),
    "double slash after an open directory": R.entry(b"a//", b"a file"),
    "dot-slash prefix": R.entry(b"./a/z", b"z"),
    "root itself": R.entry(b"./", b""),
    "someone else's": R.entry(b"a/theirs", b"t", uid=1234, gid=5678),
    "odd mode": R.entry(b"a/odd", b"o", mode=0o4751),
    "in a new directory": L.header(b"a/n/", type=b"5") + R.entry(b"a/n/f", b"f"),
    "in a setgid directory": L.header(b"g/", type=b"5", mode=0o2775, gid=77)
    + R.entry(b"g/opener", b"")
    + R.entry(b"g/f", b"f"),
    "in an implicit directory": R.entry(b"imp/f", b"f") + R.entry(b"imp/g", b"g"),
    "deep": R.entry(b"a/" + b"q/" * 40 + b"f", b"deep") + R.entry(b"a/" + b"q/" * 40 + b"g"),
    # More directories than the applier keeps open: it forgets them, then opens "a" again.
    "past the open-directory cache": b"".join(
        L.header(f"c{i}/".encode(), type=b"5") + R.entry(f"c{i}/f".encode(), b"f")
        for i in range(archive._MAX_CACHED_DIRS + 8)
    )
    + R.entry(b"a/late", b"late")
    + R.entry(b"a/later", b"later"),
}


def apply(tmp_path: Path, label: str, entries: bytes, *, quick: bool, strategy: str,
          monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, Any]]:  # fmt: skip
    root = tmp_path / f"{label}-{quick}"
    root.mkdir()
    os.chmod(root, 0o755)
    how = whiteouts.by_name(strategy)
    archive.apply(io.BytesIO(LOWER), root, whiteouts=how)
    with monkeypatch.context() as m:
        if not quick:
            m.setattr(archive._Applier, "_plain_file", lambda self, *fields: False)
        try:
            archive.apply(io.BytesIO(R.entry(b"a/opener", b"") + entries + END), root,
                          whiteouts=how)  # fmt: skip
            verdict = "applied"
        except errors.UnsafeLayer as e:
            verdict = f"refused: {e}"
    return verdict, trees.describe(root, with_root=True, overlay_xattrs=True)


@pytest.mark.parametrize("strategy", ["overlay", "remove"])
@pytest.mark.parametrize("label", list(CASES))
def test_a_file_applies_the_same_with_and_without_the_quick_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, label: str, strategy: str
) -> None:
    calls = 0
    plain = archive._Applier._plain_file

    def counting(self: archive._Applier, *fields: Any) -> bool:
        nonlocal calls
        taken = plain(self, *fields)
        calls += taken
        return taken

    monkeypatch.setattr(archive._Applier, "_plain_file", counting)
    quick = apply(tmp_path, label, CASES[label], quick=True, strategy=strategy,
                  monkeypatch=monkeypatch)  # fmt: skip
    assert calls >= 1  # "a/opener" at least: the quick path was on offer
    full = apply(tmp_path, label, CASES[label], quick=False, strategy=strategy,
                 monkeypatch=monkeypatch)  # fmt: skip
    assert quick[0] == full[0]
    assert trees.diff(quick[1], full[1]) == []
