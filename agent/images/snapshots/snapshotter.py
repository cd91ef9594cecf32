"""The snapshotter protocol and its value types: keys, names, parents, kinds and mounts.

Shaped like containerd's ``core/snapshots``; see :class:`Snapshotter` for the vocabulary and
the lifecycle.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

from agent.images import errors

#: An active snapshot carrying this label belongs to the process it names
#: (:func:`owner_token`); ``cleanup()`` removes it once that process is gone.
LABEL_OWNER: Final = "prefetcher.dev/snapshot.owner"

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")

#: Capability: layers are independent directories, so an active snapshot may be prepared
#: without a parent and given one at :meth:`Snapshotter.commit` (``parent=``). This is what
#: lets an unpacker apply the layers of one image concurrently.
CAP_REBASE: Final = "rebase"
#: Capability: a layer's deletions must be written as overlay whiteouts (0:0 character
#: devices, ``trusted.overlay.opaque``) because the snapshot does not contain its parent's
#: files. Without it, the snapshot holds a full copy and deletions are applied by removing.
CAP_OVERLAY_WHITEOUTS: Final = "whiteouts.overlay"


class Kind(enum.Enum):
    """The three kinds of snapshot."""

    #: Writable, named by a key; becomes committed through :meth:`Snapshotter.commit`.
    ACTIVE = "active"
    #: Read-only, named by a key; cannot be committed.
    VIEW = "view"
    #: Immutable, named by a name (the chain ID); may be a parent.
    COMMITTED = "committed"


@dataclass(frozen=True)
class Info:
    """What a snapshotter knows about one snapshot.

    Attributes:
        name: the key of an active or view snapshot, or the name of a committed one.
        parent: the name of the committed parent, or ``""``.
        kind: active, view or committed.
        labels: free-form string labels (``prefetcher.dev/…``, ``containerd.io/…``).
        created: seconds since the epoch.
        updated: seconds since the epoch (the commit time of a committed snapshot).
    """

    name: str
    parent: str
    kind: Kind
    labels: Mapping[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0


@dataclass(frozen=True)
class Usage:
    """Disk usage of one snapshot's own directory (not its parents)."""

    size: int  # bytes of allocated blocks, each hardlinked inode counted once
    inodes: int


@dataclass(frozen=True)
class Mount:
    """One mount, as ``mount(8)`` takes it. The snapshotter mounts nothing itself.

    ``Mount("overlay", "overlay", ("workdir=…", "upperdir=…", "lowerdir=A:B"))`` or
    ``Mount("bind", "/…/snapshots/7/fs", ("ro", "rbind"))``.
    """

    type: str
    source: str
    options: tuple[str, ...] = ()

    def option(self, name: str) -> str | None:
        """The value of a ``name=value`` option, or ``None``."""
        prefix = name + "="
        for opt in self.options:
            if opt.startswith(prefix):
                return opt[len(prefix) :]
        return None

    def with_options(self, *options: str) -> Mount:
        """This mount with ``options`` added (those it already has are not repeated)."""
        extra = tuple(o for o in options if o not in self.options)
        return dataclasses.replace(self, options=(*self.options, *extra))

    def argv(self, target: str | os.PathLike[str]) -> list[str]:
        """The ``mount(8)`` command line that mounts this at ``target``."""
        opts = ",".join(self.options)
        if self.type == "bind":
            return ["mount", "-o", opts, self.source, os.fspath(target)]
        return ["mount", "-t", self.type, "-o", opts, self.source, os.fspath(target)]

    def compacted(self) -> tuple[str | None, Mount]:
        """``(directory, mount)``: this mount as ``mount(8)`` must run it, from ``directory``
        (``None``: anywhere).

        The kernel takes at most a page of mount options, and an overlay of a hundred
        layers names more lower directories than that. As containerd does
        (``mount.compactLowerdirOption``), an overlay whose options come near a page gets
        its ``lowerdir=`` paths made relative to their common parent directory, and is
        mounted from there.
        """
        if self.type != "overlay" or len(",".join(self.options)) < _PAGE_SIZE - 512:
            return None, self
        lowers = (self.option("lowerdir") or "").split(":")
        if len(lowers) < 2:
            return None, self
        common = os.path.commonpath(lowers)
        if common in ("", "/") or not os.path.isabs(common):
            return None, self
        relative = ":".join(os.path.relpath(p, common) for p in lowers)
        options = tuple(
            f"lowerdir={relative}" if o.startswith("lowerdir=") else o for o in self.options
        )
        return common, dataclasses.replace(self, options=options)

    def mount(self, target: str | os.PathLike[str]) -> None:
        """Mount at ``target`` (needs root). Raises ``OSError`` with mount's message."""
        target = os.path.abspath(target)
        cwd, m = self.compacted()
        proc = subprocess.run(m.argv(target), capture_output=True, text=True, cwd=cwd)
        if proc.returncode:
            raise OSError(f"mount {self.type} at {target}: {proc.stderr.strip()}")


def mount_all(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
    """Mount each of ``mounts`` at ``target``, in order."""
    for m in mounts:
        m.mount(target)


def unmount(target: str | os.PathLike[str], *, lazy: bool = False) -> None:
    """Unmount ``target``. Raises ``OSError`` with umount's message."""
    argv = ["umount", *(["-l"] if lazy else []), os.fspath(target)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode:
        raise OSError(f"umount {os.fspath(target)}: {proc.stderr.strip()}")


@runtime_checkable
class Snapshotter(Protocol):
    """Stores layered filesystems as snapshots, named by keys and chain IDs.

    Vocabulary:

    * **key** — the name of an *active* (writable) or *view* (read-only) snapshot, chosen
      by the caller. Unpackers use a unique key such as ``extract-<random> <chainID>``.
    * **name** — the name of a *committed* snapshot. For image layers it is the layer's
      **chain ID**, so the same stack of layers is stored once however many images share
      it. Keys and names share one namespace: a key cannot equal a committed name.
    * **parent** — the name of a committed snapshot that a new one is stacked on; ``""``
      for a bottom layer. A snapshot's mounts show its parent chain with its own changes
      on top.
    * **mounts** — a list of :class:`Mount` that, mounted in order at one target, give the
      snapshot's filesystem. The snapshotter never mounts anything itself.

    Lifecycle:

    * :meth:`prepare` creates an active snapshot on ``parent`` and returns its mounts. Write
      into it (through the mounts, or into the upper directory they name).
    * :meth:`commit` turns an active snapshot into a committed one named ``name``; the key
      is gone afterwards. Only active snapshots can be committed. When ``name`` exists the
      commit raises :class:`~agent.images.errors.AlreadyExists` and leaves the active
      snapshot in place: the caller removes it and treats that as success.
    * :meth:`view` creates a read-only view of ``parent``; it is removed, never committed.
    * :meth:`remove` deletes an active, view or committed snapshot; a committed snapshot
      that is the parent of another one is refused
      (:class:`~agent.images.errors.Unavailable`).
    * Commits are atomic and durable: after a crash a snapshot is either committed with all
      its files or not there. Leftovers of a killed process (half-built directories,
      active snapshots of dead owners, see :data:`LABEL_OWNER`) are removed by the
      implementation's ``cleanup()``.

    Importing a layer (what :class:`~agent.images.unpack.unpacker.Unpacker` does)::

        chain = digests.chain_ids(diff_ids)        # names of the committed layers
        parent = ""
        for layer, chain_id in zip(layers, chain):
            try:
                sn.stat(chain_id)                   # already unpacked: skip
            except errors.NotFound:
                key = f"extract-{secrets.token_hex(8)} {chain_id}"
                mounts = sn.prepare(key, parent)    # active snapshot on the previous layer
                apply(open(layer), upperdir(mounts))  # write the layer's changes
                try:
                    sn.commit(chain_id, key)        # name = chain ID
                except errors.AlreadyExists:
                    sn.remove(key)                  # someone else committed it: fine
            parent = chain_id
        sn.view("inspect", parent)                  # mounts of the whole image, read-only

    With :data:`CAP_REBASE` the loop may prepare every missing layer with ``parent=""``,
    apply them concurrently, and commit them in chain order with ``parent=`` the previous
    chain ID.

    Methods are synchronous and thread-safe; async callers run them in threads.
    """

    #: Optional features, from ``CAP_*``.
    capabilities: frozenset[str]

    def stat(self, key: str) -> Info:
        """The snapshot named ``key`` (a key or a name). Raises :class:`NotFound`."""
        ...

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create the active snapshot ``key`` on ``parent`` and return its mounts.

        Raises:
            AlreadyExists: ``key`` is taken.
            NotFound: ``parent`` is not a committed snapshot.
        """
        ...

    def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create a read-only view ``key`` of ``parent`` and return its mounts."""
        ...

    def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active snapshot or a view, or read-only mounts of a committed
        snapshot with its parents. Raises :class:`NotFound`."""
        ...

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        *,
        parent: str | None = None,
    ) -> None:
        """Commit the active snapshot ``key`` as ``name``.

        Args:
            labels: replace the snapshot's labels (``None`` keeps them).
            parent: with :data:`CAP_REBASE`, stack the snapshot (prepared without a
                parent) on this committed snapshot.

        Raises:
            AlreadyExists: ``name`` is taken; ``key`` stays active.
            NotFound: no active snapshot ``key``, or ``parent`` is not committed.
        """
        ...

    def remove(self, key: str) -> None:
        """Remove a snapshot and its files. Raises :class:`NotFound` or :class:`Unavailable`
        (a committed snapshot that still has children)."""
        ...

    def update(self, key: str, labels: Mapping[str, str]) -> Info:
        """Replace a snapshot's labels."""
        ...

    def walk(self) -> Iterator[Info]:
        """Every snapshot, in creation order."""
        ...

    def usage(self, key: str) -> Usage:
        """Disk usage of the snapshot's own files (walks its directory)."""
        ...

    def close(self) -> None:
        """Release the metadata store."""
        ...

    def cleanup(self) -> list[str]:
        """Remove what processes that died mid-operation left: active snapshots whose owner
        is gone and half-built directories. Call once at start-up, before preparing
        anything. Returns the keys or paths removed."""
        ...


def owner_token(pid: int | None = None) -> str:
    """``"<pid>:<start time>"`` of a process: names it uniquely while it runs."""
    pid = os.getpid() if pid is None else pid
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    # The command name (field 2) may hold spaces; fields after its ')' are plain.
    fields = data[data.rindex(b")") + 2 :].split()
    return f"{pid}:{int(fields[19])}"


def owner_alive(token: str) -> bool:
    """Whether the process an :func:`owner_token` names is still running."""
    try:
        pid = int(token.split(":", 1)[0])
        return owner_token(pid) == token
    except (OSError, ValueError, IndexError):
        return False


def not_found(key: str) -> errors.NotFound:
    return errors.NotFound(f"snapshot {key!r} does not exist")
