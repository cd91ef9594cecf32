"""Apply one OCI layer (an uncompressed tar stream) to a directory, confined to it.

The entries come from :mod:`.tar` (Go's ``archive/tar`` rules); they are applied as
containerd's ``archive.Apply`` applies them, with file data going from the decompressor's
buffer to ``write(2)`` without copies, and no path ever handed to a path-walking syscall:
every entry is created through a directory file descriptor resolved inside the root.

Path rules (the applier runs as root on every node):

* A name with a ``..`` component, an absolute name, or a NUL byte is refused
  (:class:`~agent.images.errors.UnsafeLayer`; stricter than containerd, which clamps them
  into the root). ``./`` prefixes are dropped; an entry naming the root itself (``./``, or
  a PAX ``path`` of ``.``) is ignored, as containerd ignores it: a layer never changes the
  owner or mode of the container's ``/``.
* Parent directories are opened one component at a time with ``O_NOFOLLOW``; a missing one
  is created (0755, as containerd does). A parent that is a symlink is resolved by the
  kernel with ``openat2(RESOLVE_IN_ROOT)``, so it is followed as if the root were ``/`` and
  can never leave it (``bin -> /usr/bin`` works, ``x -> /etc`` lands in ``root/etc``). On a
  kernel without ``openat2`` such a layer is refused.
* The entry's own name is never followed: creation uses ``O_EXCL``/``O_NOFOLLOW`` and
  ``*at`` calls on the parent fd; metadata of symlinks is set with ``follow_symlinks=False``.
* A hardlink's target is resolved as containerd resolves it: its directory inside the
  root (an absolute ``/a/file`` or ``../a/file`` is ``a/file`` of the root), its last
  component not followed. It must already exist in the root. The link header's owner,
  mode and mtime then apply to the shared inode, as containerd applies them.
* ``trusted.*`` xattrs (which include ``trusted.overlay.*``) are refused; ``user.*``,
  ``security.*`` (including ``security.capability``) and ``system.*`` are applied, and a
  filesystem that does not support one is ignored, as GNU tar and containerd do.

Entry types are containerd's: regular files (sparse ones keep their holes as holes),
directories, hard and symbolic links, devices and fifos. A PAX global header applies to
nothing, but like containerd it removes what is at its name. Contiguous (``7``), old GNU
sparse (``S``) and other types are refused, as containerd refuses them. Whiteouts are
recognised by name before the type, so a ``.wh.`` entry of any type is a whiteout.

Replacement: an entry replaces whatever non-directory is at its name, and a non-directory
replaces a directory (recursively); a directory over a directory merges and takes the new
owner, mode and xattrs. Directory mtimes are set last, after all their children. Times
before the epoch or after 2262 become the epoch, as containerd's ``boundTime`` makes them.

Beyond containerd, for overlay upper directories: a directory re-created in the layer that
whited it out is made opaque (the lower one's content must not show through), and an
opaque marker at the layer's root (which overlayfs ignores on a root) is reported in
:attr:`ApplyResult.opaque_root` for :func:`hide_lower_entries`.

The diff ID is the digest of every uncompressed byte read (including the end-of-archive
padding, which is drained), computed as the bytes pass.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Final

from agent.images import digests, errors, syscalls
from agent.images.unpack import compression, tar, whiteouts

#: Deepest path a layer may name (Linux' PATH_MAX of 4096 allows at most 2048 components).
_MAX_DEPTH: Final = 2048
#: uid/gid a layer may set: 2**32-1 means "unchanged" to chown(2), so it is not an id.
_MAX_ID: Final = 2**32 - 2
_MAX_CACHED_DIRS: Final = 512
#: containerd's boundTime: os.Chtimes' range on 64-bit Linux.
_MAX_TIME_NS: Final = 2**63 - 1

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_ALLOWED_XATTR_NAMESPACES: Final = ("user.", "security.", "system.")
_NO_XATTRS: Final[dict[str, bytes]] = {}
# _Applier._plain_file's names: none starts with these (nor holds "/." or "//"), and they are
# short enough to have fewer than _MAX_DEPTH components.
_NOT_PLAIN_START: Final = (b"/", b".")
_PLAIN_NAME_MAX: Final = 2 * _MAX_DEPTH

# Errors that mean "this layer does not fit this root", not "the machine is broken".
_LAYER_ERRNOS: Final = frozenset(
    {
        errno.ENOENT,
        errno.EEXIST,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.ELOOP,
        errno.EPERM,
        errno.EINVAL,
        errno.ENOTEMPTY,
        errno.EMLINK,
        errno.ENAMETOOLONG,
        errno.EXDEV,
        errno.E2BIG,  # an xattr value larger than the filesystem takes
        errno.ERANGE,
        errno.EFBIG,  # a sparse file larger than the filesystem allows
    }
)
_SPACE_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT})


@dataclass(frozen=True)
class ApplyResult:
    """What one applied layer was.

    Attributes:
        diff_id: the digest of the uncompressed tar stream.
        size: the number of uncompressed bytes read.
        entries: the number of tar entries applied (including whiteouts).
        implicit_dirs: directories (relative paths, parents first) that the layer did not
            carry but that had to be created (0755, root) for its entries. On an overlay
            upper directory they shadow the lower layers' directories: see
            :func:`copy_up_parents`.
        opaque_root: with overlay whiteouts, the layer holds ``.wh..wh..opq`` at its root:
            every lower entry is to be hidden, which is :func:`hide_lower_entries`' job
            once the lower layers are known (the remove strategy did it already).
    """

    diff_id: digests.Digest
    size: int
    entries: int
    implicit_dirs: tuple[str, ...] = ()
    opaque_root: bool = False


def apply(
    stream: compression.Readable,
    root: str | os.PathLike[str],
    *,
    whiteouts: whiteouts.Whiteouts = whiteouts.REMOVE,
    on_progress: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
    name: str = "layer",
) -> ApplyResult:
    """Apply the tar ``stream`` (already decompressed) to the directory ``root``.

    Args:
        stream: uncompressed tar bytes (see :func:`compression.open_layer`).
        root: an existing directory; nothing outside it is ever written.
        whiteouts: how ``.wh.*`` entries are written (:data:`whiteouts.OVERLAY` for overlay
            upper directories, :data:`whiteouts.REMOVE` for flat trees).
        on_progress: called with the number of uncompressed bytes read so far, once per
            chunk (about 1 MiB).
        cancel: checked before each entry; when set, :class:`CancelledError` is raised.
        name: how the layer is named in error messages (usually its digest).

    Raises:
        UnsafeLayer: a name escapes the root, a forbidden xattr, a truncated or corrupt
            archive, or an entry that cannot be applied.
        DiskPressure: the filesystem is full.
    """
    root_fd = os.open(root, _DIR_FLAGS)
    try:
        applier = _Applier(stream, root_fd, whiteouts, on_progress, cancel, name)
        return applier.run()
    finally:
        os.close(root_fd)


def _components(name: bytes, layer: str, what: str = "entry") -> list[bytes]:
    if name.startswith(b"/"):
        raise errors.UnsafeLayer(f"{layer}: {what} {name!r} is an absolute path")
    if b"\0" in name:
        raise errors.UnsafeLayer(f"{layer}: {what} {name!r} holds a NUL byte")
    parts = name.split(b"/")
    if b"" in parts or b"." in parts:
        parts = [p for p in parts if p and p != b"."]
    if b".." in parts:
        raise errors.UnsafeLayer(f"{layer}: {what} {name!r} has a '..' component")
    if len(parts) > _MAX_DEPTH:
        raise errors.UnsafeLayer(f"{layer}: {what} is {len(parts)} directories deep")
    return parts


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:  # pragma: no cover
        pass
    return 0o022  # pragma: no cover


class _Applier:
    def __init__(
        self,
        stream: compression.Readable,
        root_fd: int,
        strategy: whiteouts.Whiteouts,
        on_progress: Callable[[int], None] | None,
        cancel: threading.Event | None,
        name: str,
    ):
        self.reader = tar.Reader(stream, on_progress, name)
        self.root_fd = root_fd
        self.strategy = strategy
        self.cancel = cancel
        self.name = name
        self.umask = _umask()
        self.euid = os.geteuid()
        self.egid = os.getegid()
        # Open directory fds by their path in the root ("" is the root itself), and whether
        # each has the setgid bit (new entries in it inherit its group).
        self.dirs: dict[bytes, int] = {}
        self.setgid: dict[bytes, bool] = {}
        # Directory mtimes, set last (after all their children).
        self.dir_mtimes: dict[bytes, int] = {}
        self.created: set[bytes] = set()
        self.implicit: dict[bytes, None] = {}
        # Overlay whiteouts written by this layer: a directory re-created there is opaque.
        self.whited_out: set[bytes] = set()
        self.opaque_root = False
        self.entries = 0

    # -- the loop ---------------------------------------------------------------------

    def run(self) -> ApplyResult:
        try:
            self._loop()
            self._set_dir_mtimes()
        finally:
            for fd in self.dirs.values():
                os.close(fd)
            self.dirs.clear()
        implicit = tuple(os.fsdecode(k) for k in self.implicit)
        r = self.reader
        return ApplyResult(r.digest(), r.total, self.entries, implicit, self.opaque_root)

    def _loop(self) -> None:
        layer = self.name
        cancel = self.cancel
        reader = self.reader
        next_plain = reader.next_plain
        next_entry = reader.next_by_full_rules  # next_plain was asked first
        plain_file = self._plain_file
        while True:
            if cancel is not None and cancel.is_set():
                raise CancelledError(f"{layer}: unpack cancelled")
            # The common entry quickly (its fields are in range by its format: 7 and 11
            # octal digits, no link name), any other by the full rules.
            plain = next_plain()
            if plain is None:
                h = next_entry()
                if h is None:
                    break
                if h.uid > _MAX_ID or h.gid > _MAX_ID or h.uid < 0 or h.gid < 0:
                    raise errors.UnsafeLayer(
                        f"{layer}: entry {h.name!r} has uid/gid out of range"
                    )
                if b"\0" in h.linkname:
                    raise errors.UnsafeLayer(
                        f"{layer}: entry {h.name!r} links to a name with NUL"
                    )
                if not 0 <= h.mtime_ns <= _MAX_TIME_NS:
                    h.mtime_ns = 0
                name = h.name
            else:
                name = plain[0]
            self.entries += 1
            try:
                if plain is not None:
                    if plain_file(*plain):
                        continue
                    h = tar.Header(name, tar.REG, *plain[1:])
                assert h is not None  # read by next_entry() otherwise
                self._entry(h)
            except OSError as e:
                raise self._os_error(e, name) from e
            except (OverflowError, ValueError) as e:  # a field out of the kernel's range
                raise errors.UnsafeLayer(f"{layer}: cannot apply entry {name!r}: {e}") from e

    def _os_error(self, e: OSError, name: bytes) -> Exception:
        if e.errno in _SPACE_ERRNOS:
            return errors.DiskPressure(f"{self.name}: no space left to write {name!r}: {e}")
        if e.errno in _LAYER_ERRNOS:
            return errors.UnsafeLayer(f"{self.name}: cannot apply entry {name!r}: {e}")
        return e

    # -- entries ----------------------------------------------------------------------

    def _entry(self, h: tar.Header) -> None:
        """Apply one entry (its data, if not written, is skipped by the reader)."""
        layer = self.name
        if len(self.dirs) >= _MAX_CACHED_DIRS:
            self._forget_dirs()  # only between entries: no fd is in use here
        if (
            h.typeflag == tar.REG
            and not h.pax
            and self._plain_file(h.name, h.mode, h.uid, h.gid, h.size, h.mtime_ns)
        ):
            return  # e.g. a GNU-format header (next_plain reads only USTAR ones)
        xattrs = h.xattrs if h.pax else {}
        for xname in xattrs:
            if xname.startswith("trusted."):
                raise errors.UnsafeLayer(
                    f"{layer}: entry {h.name!r} carries the xattr {xname!r}; trusted.* xattrs"
                    " (including trusted.overlay.*) are never taken from a layer"
                )
        parts = _components(h.name, layer)
        if not parts:
            return  # the root itself: containerd ignores it, whatever its type
        t = h.typeflag
        key = b"/".join(parts)
        parent_key, _, base = key.rpartition(b"/")
        d = self.dirs.get(parent_key)
        if d is None:
            d = self._dir(parent_key)

        if base.startswith(whiteouts.PREFIX):
            if base == whiteouts.OPAQUE:
                if not parent_key and not self.strategy.tracks_created:
                    # overlayfs ignores the xattr on an upper root (containerd sets it all
                    # the same): hide_lower_entries does the hiding at commit.
                    self.opaque_root = True
                self.strategy.opaque(d, lambda child: self._was_created(parent_key, child))
                if self.strategy.tracks_created:
                    self._invalidate_below(parent_key)
            else:
                target = whiteouts.target_of(base)
                target_key = _join(parent_key, target)
                self._invalidate(target_key)
                self.strategy.whiteout(d, target, h.uid, h.gid)
                if not self.strategy.tracks_created:
                    self.whited_out.add(target_key)
            return

        if t == tar.XGLOBAL:
            # containerd removes what is at a global header's name, then writes nothing.
            self._remove(d, base, key)
            return
        if self.strategy.tracks_created:
            self.created.add(key)
        # New entries are owned by us, in the group of a setgid parent: chown unless that
        # is already what the header asks for.
        chown = (
            h.uid != self.euid or h.gid != self.egid or self.setgid.get(parent_key, True)
        )
        if t == tar.REG:
            self._file(
                d, base, key, h.mode, h.uid, h.gid, h.mtime_ns, xattrs, chown,
                h if h.sparse is not None else None,
            )
            return
        if t == tar.DIR:
            self._mkdir(d, base, key, h, xattrs, chown)
            return
        self.dir_mtimes.pop(key, None)
        if t == tar.SYMLINK:
            self._replace(d, base, key, lambda: os.symlink(h.linkname, base, dir_fd=d))
        elif t == tar.LINK:
            self._hardlink(d, base, key, h)
            # containerd then applies the link header's metadata to the shared inode (but
            # never chmods a symlink).
            linked = os.stat(base, dir_fd=d, follow_symlinks=False)
            os.chown(base, h.uid, h.gid, dir_fd=d, follow_symlinks=False)
            if not stat.S_ISLNK(linked.st_mode):
                os.chmod(base, h.mode & 0o7777, dir_fd=d)  # not a symlink: nothing to follow
        elif t in (tar.CHAR, tar.BLOCKDEV, tar.FIFO):
            if t == tar.FIFO:
                kind, dev = stat.S_IFIFO, 0
            else:
                kind = stat.S_IFCHR if t == tar.CHAR else stat.S_IFBLK
                dev = _go_mkdev(h.devmajor, h.devminor)
            perm = h.mode & 0o7777
            self._replace(d, base, key, lambda: os.mknod(base, kind | perm, dev, dir_fd=d))
            if chown:
                os.chown(base, h.uid, h.gid, dir_fd=d, follow_symlinks=False)
            if chown or perm & (0o7000 | self.umask):
                # The node was just created here by us and is not a symlink.
                os.chmod(base, perm, dir_fd=d)
        else:
            raise errors.UnsafeLayer(
                f"{layer}: entry {h.name!r} has the tar type {t!r}, which containerd does"
                " not apply either"
            )
        if t == tar.SYMLINK:
            if chown:
                os.chown(base, h.uid, h.gid, dir_fd=d, follow_symlinks=False)
        self._xattrs_at(d, base, xattrs)
        os.utime(base, ns=(h.mtime_ns, h.mtime_ns), dir_fd=d, follow_symlinks=False)

    def _plain_file(
        self, name: bytes, mode: int, uid: int, gid: int, size: int, mtime_ns: int
    ) -> bool:
        """Apply the common entry (:meth:`tar.Reader.next_plain`: a regular file without
        PAX records) if its name is plain and its directory already open, and say so;
        ``False`` (nothing done) for any other, left to :meth:`_entry`.

        A plain name has no component that is empty or starts with a dot (so no ``.``,
        ``..``, whiteout or root), no leading or trailing slash, and fewer than
        ``_MAX_DEPTH`` components: it is its own key and passes every check of
        :meth:`_entry` and :func:`_components`, so what :meth:`_entry` does for it is done
        here, without its checks: this is most entries of most layers. (``size`` is the
        reader's current entry's: its data is written as it comes.)
        """
        if (
            not name
            or name.startswith(_NOT_PLAIN_START)
            or b"/." in name
            or b"//" in name
            or name.endswith(b"/")
            or len(name) >= _PLAIN_NAME_MAX
        ):
            return False
        dirs = self.dirs
        parent_key, _, base = name.rpartition(b"/")
        d = dirs.get(parent_key)
        if d is None or len(dirs) >= _MAX_CACHED_DIRS:
            return False
        if self.strategy.tracks_created:
            self.created.add(name)
        chown = uid != self.euid or gid != self.egid or self.setgid.get(parent_key, True)
        self._file(d, base, name, mode, uid, gid, mtime_ns, _NO_XATTRS, chown)
        return True

    def _file(
        self,
        d: int,
        base: bytes,
        key: bytes,
        mode: int,
        uid: int,
        gid: int,
        mtime_ns: int,
        xattrs: dict[str, bytes],
        chown: bool,
        sparse: tar.Header | None = None,
    ) -> None:
        """Create the regular file ``base`` in ``d`` with the current entry's data
        (``sparse``: its header, whose sparse map the data follows)."""
        perm = mode & 0o7777
        self.dir_mtimes.pop(key, None)
        try:
            fd = os.open(base, _FILE_FLAGS, perm & 0o777, dir_fd=d)
        except FileExistsError:
            self._remove(d, base, key)
            fd = os.open(base, _FILE_FLAGS, perm & 0o777, dir_fd=d)
        try:
            if sparse is None:
                self.reader.copy_data(fd)
            else:
                self.reader.write_to(fd, sparse)
            if chown:
                os.fchown(fd, uid, gid)
            if chown or perm & (0o7000 | self.umask):
                os.fchmod(fd, perm)
            for xname, value in xattrs.items():
                self._setxattr(fd, xname, value)
            os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    def _mkdir(
        self,
        d: int,
        base: bytes,
        key: bytes,
        h: tar.Header,
        xattrs: dict[str, bytes],
        chown: bool,
    ) -> None:
        self.implicit.pop(key, None)
        try:
            os.mkdir(base, 0o700, dir_fd=d)
        except FileExistsError:
            st = os.stat(base, dir_fd=d, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                self._remove(d, base, key)
                os.mkdir(base, 0o700, dir_fd=d)
            else:
                chown = True  # not a new inode: it keeps its owner unless chowned
        fd = self.dirs.get(key)
        if fd is None:
            fd = os.open(base, _DIR_FLAGS, dir_fd=d)
            self._cache(key, fd)
        if key in self.whited_out:
            # Whited out and re-created by this layer: nothing of the lower one may show.
            self.strategy.opaque(fd, lambda child: True)
        self._dir_meta(fd, h, xattrs, key, chown)

    def _dir_meta(
        self, fd: int, h: tar.Header, xattrs: dict[str, bytes], key: bytes, chown: bool
    ) -> None:
        if chown:
            os.fchown(fd, h.uid, h.gid)
        perm = h.mode & 0o7777
        os.fchmod(fd, perm)
        self.setgid[key] = bool(perm & stat.S_ISGID)
        for xname, value in xattrs.items():
            self._setxattr(fd, xname, value)
        self.dir_mtimes[key] = h.mtime_ns

    def _hardlink(self, d: int, base: bytes, key: bytes, h: tar.Header) -> None:
        """Link to ``h.linkname`` resolved as containerd's ``hardlinkRootPath`` does."""
        tdir, _, tbase = h.linkname.rpartition(b"/")
        if tbase in (b"", b".", b".."):
            raise errors.UnsafeLayer(
                f"{self.name}: hardlink {h.name!r} points at the directory {h.linkname!r}"
            )
        try:
            self._link(tdir, tbase, d, base, h)
        except FileExistsError:
            # Replace what is there; that may remove the target or its directory (whose
            # fd is then closed): resolve it again, as containerd links after RemoveAll.
            self._remove(d, base, key)
            self._link(tdir, tbase, d, base, h)

    def _link(self, tdir: bytes, tbase: bytes, d: int, base: bytes, h: tar.Header) -> None:
        tparts = tdir.split(b"/")
        owned = h.linkname.startswith(b"/") or b".." in tparts
        try:
            if owned:
                td = syscalls.open_in_root(self.root_fd, tdir or b".", _DIR_FLAGS & ~os.O_NOFOLLOW)
            else:
                td = self._dir(b"/".join(p for p in tparts if p and p != b"."), create=False)
        except FileNotFoundError:
            raise self._link_target_missing(h) from None
        try:
            os.link(tbase, base, src_dir_fd=td, dst_dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            raise self._link_target_missing(h) from None
        finally:
            if owned:
                os.close(td)

    def _link_target_missing(self, h: tar.Header) -> errors.UnsafeLayer:
        return errors.UnsafeLayer(
            f"{self.name}: hardlink {h.name!r} points at {h.linkname!r},"
            " which is not in this layer's root"
        )

    def _replace(self, d: int, base: bytes, key: bytes, create: Callable[[], None]) -> None:
        try:
            create()
        except FileExistsError:
            self._remove(d, base, key)
            create()

    def _remove(self, d: int, base: bytes, key: bytes) -> None:
        self._invalidate(key)
        self.implicit.pop(key, None)
        whiteouts.remove_at(d, base)

    def _xattrs_at(self, d: int, base: bytes, xattrs: dict[str, bytes]) -> None:
        if not xattrs:
            return
        # No *at variant of lsetxattr: go through the directory fd's /proc entry, which
        # names exactly the directory already resolved, and do not follow ``base``.
        path = f"/proc/self/fd/{d}/".encode() + base
        for xname, value in xattrs.items():
            self._setxattr(path, xname, value, follow_symlinks=False)

    def _setxattr(
        self, target: int | bytes, xname: str, value: bytes, *, follow_symlinks: bool = True
    ) -> None:
        if not xname.startswith(_ALLOWED_XATTR_NAMESPACES):
            raise errors.UnsafeLayer(f"{self.name}: xattr {xname!r} is in no allowed namespace")
        try:
            os.setxattr(target, xname, value, follow_symlinks=follow_symlinks)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EPERM):
                raise

    # -- directories ------------------------------------------------------------------

    def _dir(self, key: bytes, *, create: bool = True) -> int:
        """An open fd of the directory ``key`` (``b""`` is the root), resolved in the root."""
        fd = self.dirs.get(key)
        if fd is not None:
            return fd
        if not key:
            fd = os.dup(self.root_fd)
            self._cache(b"", fd, check_setgid=True)
            return fd
        parent_key, _, base = key.rpartition(b"/")
        parent = self._dir(parent_key, create=create)
        try:
            fd = os.open(base, _DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(base, 0o755, dir_fd=parent)
            self.implicit[key] = None
            if self.strategy.tracks_created:
                self.created.add(key)
            fd = os.open(base, _DIR_FLAGS, dir_fd=parent)
            # Exactly 0755, as containerd's mkparent chmods it: no setgid bit inherited
            # from a setgid parent, no umask.
            os.fchmod(fd, 0o755)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                raise errors.UnsafeLayer(
                    f"{self.name}: {key!r} is used as a directory but is not one"
                ) from None
            fd = self._open_through_symlink(key)
        self._cache(key, fd, check_setgid=True)
        return fd

    def _open_through_symlink(self, key: bytes) -> int:
        """Open the directory ``key`` following symlinks as if the root were ``/``."""
        try:
            return syscalls.open_in_root(self.root_fd, key, _DIR_FLAGS & ~os.O_NOFOLLOW)
        except OSError as e:
            if e.errno == errno.ENOSYS:  # pragma: no cover - kernels before 5.6
                raise errors.UnsafeLayer(
                    f"{self.name}: {key!r} goes through a symlink, and this kernel has no"
                    " openat2 to resolve it safely inside the root"
                ) from None
            raise errors.UnsafeLayer(
                f"{self.name}: {key!r} goes through a symlink that does not resolve to a"
                f" directory inside the root: {e.strerror}"
            ) from None

    def _cache(self, key: bytes, fd: int, *, check_setgid: bool = False) -> None:
        self.dirs[key] = fd
        if check_setgid and key not in self.setgid:
            self.setgid[key] = bool(os.fstat(fd).st_mode & stat.S_ISGID)

    def _forget_dirs(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()
        self.setgid.clear()

    def _invalidate(self, key: bytes) -> None:
        """Drop cached fds at or below ``key``: that path is about to be replaced."""
        self._drop(key)
        self._invalidate_below(key)
        self.dir_mtimes.pop(key, None)

    def _invalidate_below(self, key: bytes) -> None:
        """Drop cached fds strictly below ``key``: they may be about to be removed."""
        prefix = key + b"/" if key else b""
        for k in [k for k in self.dirs if k and k.startswith(prefix) and k != key]:
            self._drop(k)

    def _drop(self, key: bytes) -> None:
        fd = self.dirs.pop(key, None)
        if fd is not None:
            os.close(fd)
        self.setgid.pop(key, None)

    def _was_created(self, parent_key: bytes, child: bytes) -> bool:
        return _join(parent_key, child) in self.created

    def _set_dir_mtimes(self) -> None:
        """Directory mtimes, last, on the directories still there at their names (reached
        without symlinks). containerd instead follows the names as they resolve then: a
        directory replaced later in the layer by a file gives it its mtime, and one
        replaced by a dangling symlink fails the layer; here neither happens."""
        for key, mtime_ns in self.dir_mtimes.items():
            fd = _open_under(self.root_fd, key.split(b"/"))
            if fd is None:
                continue  # replaced or removed later in the layer
            try:
                os.utime(fd, ns=(mtime_ns, mtime_ns))
            finally:
                os.close(fd)


def _go_mkdev(major: int, minor: int) -> int:
    """The device number containerd passes to mknod(2): Go's ``unix.Mkdev`` of the
    numbers cut to 32 bits, then cut to the 32-bit ``dev`` mknod(2) takes."""
    major &= 0xFFFFFFFF
    minor &= 0xFFFFFFFF
    dev = (
        ((major & 0x00000FFF) << 8)
        | ((major & 0xFFFFF000) << 32)
        | (minor & 0x000000FF)
        | ((minor & 0xFFFFFF00) << 12)
    )
    return dev & 0xFFFFFFFF


def copy_up_parents(
    upper: str | os.PathLike[str],
    lowers: list[str],
    paths: tuple[str, ...] | list[str],
) -> None:
    """Give implicitly created directories of an overlay upper dir their lower metadata.

    A layer that writes ``tmp/x`` without a ``tmp`` entry gets a default ``tmp`` (0755,
    root) in its upper directory, and overlayfs would show that instead of the ``tmp`` of
    the layers below. Like containerd's ``mkparent``, copy owner, mode, xattrs and mtime
    from the nearest lower layer (``lowers`` nearest first) whose merged view holds that
    directory. Each lookup walks one component at a time without following symlinks, and
    stops at a whiteout, a non-directory or an opaque directory.

    ``paths`` come parents first. One with no lower counterpart whose parent was copied
    up setgid takes the parent's group, as the kernel gives it where containerd creates it
    (in the parent already copied up).
    """
    if not paths or not lowers:
        return
    upper_fd = os.open(upper, _DIR_FLAGS)
    setgid_groups: dict[bytes, int] = {}  # copied-up setgid directories: their group
    try:
        for path in paths:
            key = os.fsencode(path)
            parts = _components(key, "upper", "directory")
            source = _find_lower_dir(lowers, parts)
            parent_gid = setgid_groups.get(key.rpartition(b"/")[0])
            if source is None and parent_gid is None:
                continue
            fd = _open_under(upper_fd, parts)
            if fd is None:
                if source is not None:
                    os.close(source)
                continue
            try:
                if source is None:
                    if parent_gid is not None:
                        os.fchown(fd, -1, parent_gid)
                    continue
                _copy_dir_meta(source, fd)
                st = os.fstat(fd)
                if st.st_mode & stat.S_ISGID:
                    setgid_groups[key] = st.st_gid
            finally:
                if source is not None:
                    os.close(source)
                os.close(fd)
    finally:
        os.close(upper_fd)


def hide_lower_entries(upper: str | os.PathLike[str], lowers: list[str]) -> None:
    """Make an overlay upper directory opaque at its root: hide every lower entry.

    overlayfs ignores ``trusted.overlay.opaque`` on a layer's root directory (containerd
    sets it there all the same, and the lower entries stay visible). So for a layer with
    ``.wh..wh..opq`` at its root: a whiteout for every name in the root of a lower layer
    (``lowers``) that the upper root does not hold, and every upper directory that shares
    its name with a lower entry is made opaque. Names the upper holds as non-directories
    hide the lower ones already.
    """
    names: set[bytes] = set()
    for lower in lowers:
        names.update(os.listdir(os.fsencode(lower)))
    upper_fd = os.open(upper, _DIR_FLAGS)
    try:
        for name in sorted(names):
            try:
                st = os.stat(name, dir_fd=upper_fd, follow_symlinks=False)
            except FileNotFoundError:
                whiteouts.OVERLAY.whiteout(upper_fd, name, 0, 0)
                continue
            if stat.S_ISDIR(st.st_mode):
                fd = os.open(name, _DIR_FLAGS, dir_fd=upper_fd)
                try:
                    whiteouts.OVERLAY.opaque(fd, lambda child: True)
                finally:
                    os.close(fd)
    finally:
        os.close(upper_fd)


def _open_under(root_fd: int, parts: list[bytes]) -> int | None:
    """Open ``parts`` below ``root_fd`` as a directory without following symlinks."""
    fd = os.dup(root_fd)
    try:
        for part in parts:
            nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError:
        os.close(fd)
        return None
    return fd


def _find_lower_dir(lowers: list[str], parts: list[bytes]) -> int | None:
    for lower in lowers:
        fd = os.open(lower, _DIR_FLAGS)
        for i, part in enumerate(parts):
            try:
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                opaque = _is_opaque(fd)
                os.close(fd)
                if opaque:
                    return None
                break  # not in this layer: look further down
            except OSError:
                os.close(fd)
                return None  # a whiteout, a symlink or a file hides it
            os.close(fd)
            fd = nxt
            if i < len(parts) - 1 and _is_opaque(fd):
                # Below an opaque directory nothing further down is visible.
                rest = _open_under(fd, parts[i + 1 :])
                os.close(fd)
                return rest
        else:
            return fd
    return None


def _is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, whiteouts.OVERLAY_OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _copy_dir_meta(src: int, dst: int) -> None:
    st = os.fstat(src)
    os.fchown(dst, st.st_uid, st.st_gid)
    os.fchmod(dst, stat.S_IMODE(st.st_mode))
    for xname in os.listxattr(src):
        if not xname.startswith("trusted.overlay."):
            os.setxattr(dst, xname, os.getxattr(src, xname))
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


def _join(parent_key: bytes, name: bytes) -> bytes:
    return parent_key + b"/" + name if parent_key else name
