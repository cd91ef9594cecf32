"""Describe a directory tree as comparable data: what a layer stack must reproduce."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from typing import Any


def describe(
    root: Path, *, mtimes: bool = True, with_root: bool = False, overlay_xattrs: bool = False
) -> dict[str, Any]:
    """Every entry below ``root`` (and ``root`` itself as ``"."`` with ``with_root``), by
    relative path.

    Each value holds type, permission bits (with setuid/setgid/sticky), owner, size and
    sha256 of regular files, symlink target, device numbers (so overlay whiteouts show),
    xattrs (overlayfs' own ``trusted.overlay.*``, such as opaque markers, only with
    ``overlay_xattrs``) and, for non-directories, the mtime in seconds. Hardlinks come out
    as ``"hardlinks"``: the set of groups of paths sharing an inode.
    """
    out: dict[str, Any] = {}
    inodes: dict[tuple[int, int], list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        names = sorted(dirnames + filenames)
        if with_root and dirpath == str(root):
            names.insert(0, ".")
        for name in names:
            path = os.path.normpath(os.path.join(dirpath, name))
            rel = os.path.relpath(path, root)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                # Overlayfs lists a whiteout in a directory with nothing below it, and a
                # lookup of it finds nothing: it is no entry of the merged view.
                continue
            entry: dict[str, Any] = {
                "type": stat.S_IFMT(st.st_mode),
                "mode": oct(stat.S_IMODE(st.st_mode)),
                "owner": (st.st_uid, st.st_gid),
                "xattrs": _xattrs(path, overlay_xattrs),
            }
            if stat.S_ISREG(st.st_mode):
                entry["size"] = st.st_size
                entry["sha256"] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif stat.S_ISLNK(st.st_mode):
                entry["target"] = os.readlink(path)
                del entry["mode"]
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            if mtimes and not stat.S_ISDIR(st.st_mode):
                entry["mtime"] = int(st.st_mtime)
            out[rel] = entry
    out["hardlinks"] = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    return out


def _xattrs(path: str, overlay: bool = False) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return {}
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in sorted(names)
        if overlay or not n.startswith("trusted.overlay.")
    }


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`describe` results."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"{key}: {a.get(key)!r} != {b.get(key)!r}")
    return lines
