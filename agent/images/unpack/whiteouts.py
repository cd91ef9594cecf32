"""How a layer's deletions are written: the whiteout strategies.

An OCI layer says "delete ``dir/NAME`` from the layers below" with an entry ``dir/.wh.NAME``,
and "hide everything below in ``dir``" with ``dir/.wh..wh..opq``. Other AUFS metadata names
(``.wh..wh.plnk``) are whiteouts of ``.wh.plnk``, as containerd treats them.

Two strategies, as containerd has (``pkg/archive``):

* :data:`OVERLAY` — for an overlay *upper* directory that will be stacked on its parents
  by an ``overlay`` mount: ``.wh.NAME`` becomes a 0:0 character device ``NAME`` and
  ``.wh..wh..opq`` sets ``trusted.overlay.opaque=y`` on the directory. It needs
  ``CAP_MKNOD`` and the right to set ``trusted.*`` xattrs (root outside a user namespace);
  :func:`overlay_permitted` says whether this process has them.
* :data:`REMOVE` — for a flat root filesystem that already holds the parent's files (the
  naive snapshotter copies them): delete the target, or every child of the opaque
  directory that this layer did not itself create.

Both act only through a directory file descriptor that the applier resolved inside the
snapshot root, and with names that hold no ``/`` and are never ``.`` or ``..``.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from typing import Final, Protocol

from agent.images import errors

PREFIX: Final = b".wh."
META_PREFIX: Final = b".wh..wh."
OPAQUE: Final = b".wh..wh..opq"
OVERLAY_OPAQUE_XATTR: Final = "trusted.overlay.opaque"

_CAP_MKNOD: Final = 27
_CAP_SYS_ADMIN: Final = 21


class Whiteouts(Protocol):
    """A whiteout strategy. ``dir_fd`` is an open directory inside the snapshot root."""

    #: ``"overlay"`` or ``"remove"``.
    name: str
    #: Whether :meth:`opaque` needs to know which children this layer created.
    tracks_created: bool

    def whiteout(self, dir_fd: int, name: bytes, uid: int, gid: int) -> None:
        """Record the deletion of ``name`` (a plain name) in the directory ``dir_fd``."""
        ...

    def opaque(self, dir_fd: int, created: Callable[[bytes], bool]) -> None:
        """Hide the lower layers' contents of directory ``dir_fd``.

        ``created(child)`` says whether this layer itself created ``child``.
        """
        ...


def target_of(name: bytes) -> bytes:
    """The name a ``.wh.NAME`` entry deletes. Raises :class:`UnsafeLayer` if it traverses."""
    target = name[len(PREFIX) :]
    if not target or target in (b".", b"..") or b"/" in target or b"\0" in target:
        raise errors.UnsafeLayer(f"whiteout {name!r} names no valid entry")
    return target


def remove_at(dir_fd: int, name: bytes) -> bool:
    """Delete ``name`` in ``dir_fd`` (recursively if a directory), never following symlinks.

    Returns whether a directory was removed (callers holding directory fds drop them).
    """
    try:
        os.unlink(name, dir_fd=dir_fd)
        return False
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno not in (errno.EISDIR, errno.EPERM):
            raise
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):  # pragma: no cover - EPERM on a non-directory
        raise PermissionError(errno.EPERM, "cannot remove", os.fsdecode(name))
    shutil.rmtree(os.fsdecode(name), dir_fd=dir_fd)
    return True


class _Overlay:
    name = "overlay"
    tracks_created = False

    def whiteout(self, dir_fd: int, name: bytes, uid: int, gid: int) -> None:
        # Over an entry of the same layer this fails (EEXIST), as it does in containerd.
        os.mknod(name, stat.S_IFCHR, os.makedev(0, 0), dir_fd=dir_fd)
        if uid or gid:
            os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

    def opaque(self, dir_fd: int, created: Callable[[bytes], bool]) -> None:
        os.setxattr(dir_fd, OVERLAY_OPAQUE_XATTR, b"y")


class _Remove:
    name = "remove"
    tracks_created = True

    def whiteout(self, dir_fd: int, name: bytes, uid: int, gid: int) -> None:
        remove_at(dir_fd, name)

    def opaque(self, dir_fd: int, created: Callable[[bytes], bool]) -> None:
        for entry in os.scandir(dir_fd):
            child = os.fsencode(entry.name)
            if not created(child):
                remove_at(dir_fd, child)


#: 0:0 character devices and ``trusted.overlay.opaque``, for overlay upper directories.
OVERLAY: Final[Whiteouts] = _Overlay()
#: Delete the targets, for flat root filesystems.
REMOVE: Final[Whiteouts] = _Remove()


def by_name(name: str) -> Whiteouts:
    """:data:`OVERLAY` or :data:`REMOVE` by their names."""
    if name == "overlay":
        return OVERLAY
    if name == "remove":
        return REMOVE
    raise ValueError(f"unknown whiteout strategy {name!r}; expected 'overlay' or 'remove'")


def overlay_permitted() -> bool:
    """Whether this process may write overlay whiteouts: root, ``CAP_MKNOD``, no user namespace.

    ``trusted.*`` xattrs need ``CAP_SYS_ADMIN`` in the initial user namespace.
    """
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/self/status") as f:
            caps = next((line.split()[1] for line in f if line.startswith("CapEff:")), "0")
        with open("/proc/self/uid_map") as f:
            uid_map = f.read().split()
    except OSError:  # pragma: no cover - no /proc
        return False
    eff = int(caps, 16)
    in_userns = uid_map[:3] != ["0", "0", "4294967295"]
    return bool(eff & (1 << _CAP_MKNOD)) and bool(eff & (1 << _CAP_SYS_ADMIN)) and not in_userns
