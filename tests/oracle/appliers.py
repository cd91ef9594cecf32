"""Apply one layer both ways: with containerd's own code (the reference) and with ours.

containerd's side is ``containerd-apply`` (``tests/oracle/containerd-apply/main.go``): its
``archive.Apply`` with the overlay whiteout conversion, as containerd's overlayfs snapshotter
applies a layer into a fresh upper directory. Ours is the applier the unpacker calls for an
overlay snapshot (:func:`agent.images.unpack.apply` with
:data:`~agent.images.unpack.whiteouts.OVERLAY`). Both run as root into fresh directories, and
the outcome is what a user would see: accepted or refused, and the tree.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.images import errors, unpack
from agent.images.unpack import whiteouts
from tests.images.unpack import trees

GO_SOURCE = Path(__file__).parent / "containerd-apply"
#: Where Debian's golang-github-containerd-containerd-dev puts containerd 1.6's source.
GOPATH = "/usr/share/gocode"


def build_tool(out_dir: Path) -> Path:
    """Build ``containerd-apply`` offline into ``out_dir``; return the binary's path."""
    binary = out_dir / "containerd-apply"
    env = {
        **os.environ,
        "GOPATH": GOPATH,
        "GO111MODULE": "off",
        "GOFLAGS": "",
        "GOCACHE": str(out_dir / "gocache"),
        "CGO_ENABLED": "0",
    }
    proc = subprocess.run(
        ["go", "build", "-o", str(binary), "."],
        cwd=GO_SOURCE, env=env, capture_output=True, text=True, timeout=300,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"building containerd-apply failed:\n{proc.stderr}")
    return binary


@dataclass
class Outcome:
    """What applying a layer did: ``error`` is empty when it was accepted."""

    error: str
    tree: dict[str, Any] = field(default_factory=dict)

    @property
    def accepted(self) -> bool:
        return not self.error

    def view(self) -> tuple[bool, dict[str, Any]]:
        """What the two appliers must agree on: accepted or not, and the tree when accepted
        (a refused layer's partial tree is thrown away by both snapshotters)."""
        return self.accepted, self.tree if self.accepted else {}


def describe(root: Path) -> dict[str, Any]:
    """The tree a layer left in ``root``, the root itself included (its mode and owner
    become the container's ``/``), with overlay whiteouts (0:0 character devices) and
    opaque markers (``trusted.overlay.opaque``)."""
    tree = trees.describe(root, with_root=True, overlay_xattrs=True)
    for entry in tree.values():
        if isinstance(entry, dict) and entry.get("rdev") == (0, 0) and entry["mode"] == "0o0":
            entry.pop("mtime", None)  # a whiteout: created now, its mtime is no layer's
    return tree


def containerd(tool: Path, tar: bytes, root: Path) -> Outcome:
    """Apply ``tar`` to ``root`` (created here) with containerd's ``archive.Apply``."""
    root.mkdir()
    proc = subprocess.run(
        [str(tool), "apply", str(root)], input=tar, capture_output=True, timeout=120
    )
    if proc.returncode != 0:
        return Outcome(proc.stderr.decode(errors="replace").strip() or f"exit {proc.returncode}")
    return Outcome("", describe(root))


def ours(tar: bytes, root: Path) -> Outcome:
    """Apply ``tar`` to ``root`` (created here) as the unpacker does for an overlay
    snapshot. Only a refusal (an :class:`~agent.images.errors.ImageError`) is an outcome:
    any other exception is a bug and propagates."""
    root.mkdir()
    try:
        unpack.apply(io.BytesIO(tar), root, whiteouts=whiteouts.OVERLAY, name="layer")
    except errors.ImageError as e:
        return Outcome(f"{type(e).__name__}: {e}")
    return Outcome("", describe(root))


def go_headers(tool: Path, tar: bytes) -> list[dict[str, Any]]:
    """The headers Go's ``archive/tar`` reads from ``tar`` (a final ``{"error": ...}`` on a
    reader error): shown when the appliers differ, so a reader-level difference is plain."""
    proc = subprocess.run([str(tool), "list"], input=tar, capture_output=True, timeout=120)
    if proc.returncode != 0:
        return [{"error": proc.stderr.decode(errors="replace")}]
    out: list[dict[str, Any]] = json.loads(proc.stdout)
    return out


def remove(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
