"""Apply layers both ways: with containerd's own code (the reference) and with ours.

containerd's side is ``containerd-apply`` (``tests/oracle/containerd-apply/main.go``): its
``archive.Apply`` with the overlay whiteout conversion, as containerd's diff applier applies
a layer into an overlay snapshot's upper directory (``diff/apply/apply_linux.go``; with the
lower layers' directories as ``WithParents`` in :func:`containerd_stack`). Ours is the
applier the unpacker calls for an overlay snapshot (:func:`agent.images.unpack.apply` with
:data:`~agent.images.unpack.whiteouts.OVERLAY`), or for a stack the unpacker itself. Both run
as root into fresh directories, and the outcome is what a user would see: accepted or
refused, and the tree.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fixtures import layers as L

from agent.images import digests, errors, snapshots, unpack
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


def containerd(tool: Path, tar: bytes, root: Path, parents: Sequence[Path] = ()) -> Outcome:
    """Apply ``tar`` to ``root`` (created here) with containerd's ``archive.Apply``, the
    lower layers' directories ``parents`` nearest first."""
    root.mkdir()
    proc = subprocess.run(
        [str(tool), "apply", str(root), *map(str, parents)],
        input=tar, capture_output=True, timeout=120,
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


@dataclass
class Stack:
    """An image's layers applied one above the other: each layer's own directory (bottom
    first), and the error of the first layer refused."""

    layers: list[Path]
    error: str = ""


def containerd_stack(tool: Path, tars: Sequence[bytes], root: Path) -> Stack:
    """Apply ``tars`` (bottom first) as containerd's overlayfs snapshotter and diff applier
    do: each into its own directory, with the layers below as parents. The bottom layer is
    applied the same way (containerd applies it through a bind mount, with whiteouts
    removed rather than converted: the merged view is the same)."""
    root.mkdir()
    dirs: list[Path] = []
    for i, tar in enumerate(tars):
        out = containerd(tool, tar, root / str(i), parents=dirs[::-1])
        if not out.accepted:
            return Stack(dirs, f"layer {i}: {out.error}")
        dirs.append(root / str(i))
    return Stack(dirs)


def our_stack(tars: Sequence[bytes], root: Path) -> tuple[Stack, snapshots.Snapshotter]:
    """Unpack ``tars`` (bottom first) with our unpacker into an overlay snapshotter at
    ``root``; returns the stack and the snapshotter (close it)."""
    img = L.image(list(tars))
    sn = snapshots.OverlaySnapshotter(root)
    u = unpack.Unpacker(L.MemoryProvider(img.blobs), sn)  # type: ignore[arg-type]
    try:
        u.unpack_blocking(L.descriptors_of(img), L.diff_ids_of(img))
    except errors.ImageError as e:
        return Stack([], f"{type(e).__name__}: {e}"), sn
    dirs = []
    for i, chain_id in enumerate(digests.chain_ids(L.diff_ids_of(img))):
        (m,) = sn.view(f"oracle-layer-{i}", chain_id)
        own = m.source if m.type == "bind" else (m.option("lowerdir") or "").split(":")[0]
        dirs.append(Path(own))
        sn.remove(f"oracle-layer-{i}")
    return Stack(dirs), sn


def merged_view(layers: Sequence[Path], target: Path) -> dict[str, Any]:
    """The tree a container sees of ``layers`` (bottom first) stacked: mounted read-only
    at ``target`` (created here), described, unmounted."""
    if len(layers) == 1:
        mount = snapshots.Mount("bind", str(layers[0]), ("ro", "rbind"))
    else:
        lowers = ":".join(str(p) for p in reversed(layers))
        mount = snapshots.Mount("overlay", "overlay", ("ro", f"lowerdir={lowers}"))
    target.mkdir()
    mount.mount(target)
    try:
        return trees.describe(target, with_root=True)
    finally:
        snapshots.unmount(target)


@dataclass
class Stacks:
    """An image unpacked both ways: the verdicts, the differences of each upper layer's
    own directory (the bottom one differs on purpose: containerd removes its whiteouts, we
    convert them; the merged views are the same), and the merged views."""

    theirs_error: str
    ours_error: str
    layer_diffs: dict[int, list[str]] = field(default_factory=dict)
    merged_theirs: dict[str, Any] = field(default_factory=dict)
    merged_ours: dict[str, Any] = field(default_factory=dict)


def compare_stacks(tool: Path, tars: Sequence[bytes], tmp: Path) -> Stacks:
    """Unpack ``tars`` with containerd's applier and with our unpacker under ``tmp``."""
    theirs = containerd_stack(tool, tars, tmp / "containerd")
    mine, sn = our_stack(tars, tmp / "ours")
    try:
        out = Stacks(theirs.error, mine.error)
        if not mine.error:
            out.merged_ours = merged_view(mine.layers, tmp / "merged-ours")
        if theirs.error or mine.error:
            return out
        for i in range(1, len(tars)):
            diff = trees.diff(describe(theirs.layers[i]), describe(mine.layers[i]))
            if diff:
                out.layer_diffs[i] = diff
        out.merged_theirs = merged_view(theirs.layers, tmp / "merged-containerd")
        return out
    finally:
        sn.close()


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
