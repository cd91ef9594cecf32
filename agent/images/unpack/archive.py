"""Apply one OCI layer (an uncompressed tar stream) to a directory, confined to it.

The applier reads the tar stream itself (ustar, GNU long names and base-256 numbers, PAX
records including ``SCHILY.xattr.*``) rather than using :mod:`tarfile`, so that file data
goes from the decompressor's buffer to ``write(2)`` without copies, and so that no path is
ever handed to a path-walking syscall: every entry is created through a directory file
descriptor that was resolved inside the root.

Path rules (the applier runs as root on every node):

* A name with a ``..`` component, an absolute name, or a NUL byte is refused
  (:class:`~agent.images.errors.UnsafeLayer`). ``./`` prefixes are dropped; ``.`` is the
  root directory itself (its owner, mode, xattrs and mtime are applied).
* Parent directories are opened one component at a time with ``O_NOFOLLOW``; a missing one
  is created (0755, as containerd does). A parent that is a symlink is resolved by the
  kernel with ``openat2(RESOLVE_IN_ROOT)``, so it is followed as if the root were ``/`` and
  can never leave it (``bin -> /usr/bin`` works, ``x -> /etc`` lands in ``root/etc``). On a
  kernel without ``openat2`` such a layer is refused.
* The entry's own name is never followed: creation uses ``O_EXCL``/``O_NOFOLLOW`` and
  ``*at`` calls on the parent fd; metadata of symlinks is set with ``follow_symlinks=False``.
* A hardlink's target is resolved by the same rules and must already exist in the root.
* ``trusted.*`` xattrs (which include ``trusted.overlay.*``) are refused; ``user.*``,
  ``security.*`` (including ``security.capability``) and ``system.*`` are applied, and a
  filesystem that does not support one is ignored, as GNU tar and containerd do.

Replacement: an entry replaces whatever non-directory is at its name, and a non-directory
replaces a directory (recursively); a directory over a directory merges and takes the new
owner, mode and xattrs. Directory mtimes are set last, after all their children.

The diff ID is the digest of every uncompressed byte read (including the end-of-archive
padding, which is drained), computed as the bytes pass.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass
from typing import Final

from agent.images import digests, errors
from agent.images.unpack import compression, whiteouts

BLOCK: Final = 512
_ZERO_BLOCK: Final = bytes(BLOCK)
_CHUNK: Final = 1 << 20
_MAX_META_BYTES: Final = 1 << 20  # PAX records and GNU long names, in all for one entry
#: Deepest path a layer may name (Linux' PATH_MAX of 4096 allows at most 2048 components).
_MAX_DEPTH: Final = 2048
#: uid/gid a layer may set: 2**32-1 means "unchanged" to chown(2), so it is not an id.
_MAX_ID: Final = 2**32 - 2
_MAX_CACHED_DIRS: Final = 512

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

_XATTR_PREFIX: Final = b"SCHILY.xattr."
_ALLOWED_XATTR_NAMESPACES: Final = ("user.", "security.", "system.")

# Entry types.
_REG = frozenset({b"0", b"\0", b"7"})
_HARDLINK, _SYMLINK, _CHAR, _BLOCK, _DIR, _FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = b"x", b"g", b"L", b"K"

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
    """

    diff_id: digests.Digest
    size: int
    entries: int
    implicit_dirs: tuple[str, ...] = ()


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


class _Input:
    """The tar byte stream: buffered reads, hashed and counted as they are taken."""

    __slots__ = ("_stream", "_hasher", "_on_progress", "buf", "view", "pos", "total", "_name")

    def __init__(
        self,
        stream: compression.Readable,
        on_progress: Callable[[int], None] | None,
        name: str,
    ):
        self._stream = stream
        self._hasher = digests.Hasher("sha256")
        self._on_progress = on_progress
        self._name = name
        self.buf = b""
        self.view = memoryview(self.buf)
        self.pos = 0
        self.total = 0

    def _fill(self) -> bool:
        data = self._stream.read(_CHUNK)
        if not data:
            return False
        self._hasher.update(data)
        self.total += len(data)
        self.buf = data
        self.view = memoryview(data)
        self.pos = 0
        if self._on_progress is not None:
            self._on_progress(self.total)
        return True

    def _truncated(self) -> errors.UnsafeLayer:
        return errors.UnsafeLayer(f"{self._name}: truncated tar archive after {self.total} bytes")

    def header(self) -> bytes | None:
        """The next 512-byte block, or ``None`` at a clean end of stream."""
        if self.pos >= len(self.buf) and not self._fill():
            return None
        return self.read(BLOCK)

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end <= len(self.buf):
            data = self.buf[self.pos : end]
            self.pos = end
            return data
        parts = [self.buf[self.pos :]]
        need = n - len(parts[0])
        self.pos = len(self.buf)
        while need > 0:
            if not self._fill():
                raise self._truncated()
            part = self.buf[:need]
            parts.append(part)
            self.pos = len(part)
            need -= len(part)
        return b"".join(parts)

    def skip(self, n: int) -> None:
        while n > 0:
            avail = len(self.buf) - self.pos
            if avail <= 0:
                if not self._fill():
                    raise self._truncated()
                continue
            k = min(avail, n)
            self.pos += k
            n -= k

    def copy(self, fd: int, n: int) -> None:
        """Write the next ``n`` bytes to ``fd``."""
        write = os.write
        while n > 0:
            avail = len(self.buf) - self.pos
            if avail <= 0:
                if not self._fill():
                    raise self._truncated()
                continue
            k = min(avail, n)
            chunk = self.view[self.pos : self.pos + k]
            while chunk:
                written = write(fd, chunk)
                chunk = chunk[written:]
            self.pos += k
            n -= k

    def drain(self) -> None:
        self.pos = len(self.buf)
        while self._fill():
            self.pos = len(self.buf)

    def digest(self) -> digests.Digest:
        return self._hasher.digest()


@dataclass
class _Header:
    name: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    typeflag: bytes
    linkname: bytes
    devmajor: int
    devminor: int
    xattrs: dict[str, bytes]


def _number(field: bytes, what: str, layer: str) -> int:
    if field and field[0] & 0x80:
        if field[0] == 0xFF:
            raise errors.UnsafeLayer(f"{layer}: negative {what} in a tar header")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        raise errors.UnsafeLayer(f"{layer}: corrupt {what} field in a tar header") from None


# name mode uid gid size mtime chksum typeflag linkname magic version uname gname
# devmajor devminor prefix
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s6s2s32s32s8s8s155s12x")


def _parse_header(block: bytes, layer: str) -> _Header:
    (name, mode, uid, gid, size, mtime, chksum, typeflag, linkname, magic, _version, _u, _g,
     devmajor, devminor, prefix) = _USTAR.unpack(block)  # fmt: skip
    stored = _number(chksum, "checksum", layer)
    unsigned = sum(block) - sum(chksum) + 256
    if stored != unsigned:
        signed = unsigned - 2 * sum(b for b in block if b > 127)
        if stored != signed:
            raise errors.UnsafeLayer(f"{layer}: tar header checksum mismatch (corrupt archive)")
    name = name.split(b"\0", 1)[0]
    if magic == b"ustar\x00" and prefix[0]:
        name = prefix.split(b"\0", 1)[0] + b"/" + name
    if typeflag in (_CHAR, _BLOCK):
        major = _number(devmajor, "devmajor", layer)
        minor = _number(devminor, "devminor", layer)
    else:
        major = minor = 0
    return _Header(
        name=name,
        mode=_number(mode, "mode", layer),
        uid=_number(uid, "uid", layer),
        gid=_number(gid, "gid", layer),
        size=_number(size, "size", layer),
        mtime_ns=_number(mtime, "mtime", layer) * 1_000_000_000,
        typeflag=typeflag,
        linkname=linkname.split(b"\0", 1)[0] if linkname[0] else b"",
        devmajor=major,
        devminor=minor,
        xattrs={},
    )


def _parse_pax(data: bytes, layer: str) -> dict[bytes, bytes]:
    records: dict[bytes, bytes] = {}
    pos = 0
    try:
        while pos < len(data):
            if data[pos] == 0:  # NUL padding after the records
                break
            sp = data.index(b" ", pos)
            length = int(data[pos:sp])
            record = data[sp + 1 : pos + length]
            if length <= 0 or not record.endswith(b"\n"):
                raise ValueError("bad record length")
            key, eq, value = record[:-1].partition(b"=")
            if not eq:
                raise ValueError("record without '='")
            records[key] = value
            pos += length
    except ValueError as e:
        raise errors.UnsafeLayer(f"{layer}: corrupt PAX header: {e}") from None
    return records


def _pax_time_ns(value: bytes, layer: str) -> int:
    try:
        whole, _, frac = value.decode("ascii").partition(".")
        ns = int(whole) * 1_000_000_000
        if frac:
            part = int((frac + "000000000")[:9])
            ns += -part if whole.startswith("-") else part
        if not -(2**62) < ns < 2**62:
            raise ValueError(value)
        return ns
    except ValueError:
        raise errors.UnsafeLayer(f"{layer}: corrupt PAX mtime {value!r}") from None


def _components(name: bytes, layer: str, what: str = "entry") -> list[bytes]:
    if name.startswith(b"/"):
        raise errors.UnsafeLayer(f"{layer}: {what} {name!r} is an absolute path")
    if b"\0" in name:
        raise errors.UnsafeLayer(f"{layer}: {what} {name!r} holds a NUL byte")
    parts = [p for p in name.split(b"/") if p and p != b"."]
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
        self.input = _Input(stream, on_progress, name)
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
        self.dir_mtimes: dict[bytes, int] = {}
        self.created: set[bytes] = set()
        self.implicit: dict[bytes, None] = {}
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
        return ApplyResult(self.input.digest(), self.input.total, self.entries, implicit)

    def _loop(self) -> None:
        inp = self.input
        layer = self.name
        pax: dict[bytes, bytes] = {}
        meta_bytes = 0  # metadata pending for the next entry: bounded in total
        long_name: bytes | None = None
        long_link: bytes | None = None
        while True:
            if self.cancel is not None and self.cancel.is_set():
                raise CancelledError(f"{layer}: unpack cancelled")
            block = inp.header()
            if block is None:
                break  # end of stream without an end-of-archive marker (Go's reader allows it)
            if block == _ZERO_BLOCK:
                inp.drain()
                break
            h = _parse_header(block, layer)
            t = h.typeflag
            if t in (_PAX, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK):
                meta_bytes += h.size
                if meta_bytes > _MAX_META_BYTES:
                    raise errors.UnsafeLayer(
                        f"{layer}: more than {_MAX_META_BYTES} bytes of tar metadata for one entry"
                    )
                data = inp.read(h.size)
                inp.skip(-h.size % BLOCK)
                if t == _PAX:
                    pax.update(_parse_pax(data, layer))
                elif t == _PAX_GLOBAL:
                    # Go's archive/tar returns a global header as an entry of its own and
                    # containerd skips it: applying it to later entries would make this
                    # reader see another tree than every Go-based tool does.
                    pass
                elif t == _GNU_LONGNAME:
                    long_name = data.split(b"\0", 1)[0]
                else:
                    long_link = data.split(b"\0", 1)[0]
                continue
            meta_bytes = 0
            if (long_name is not None and b"path" in pax) or (
                long_link is not None and b"linkpath" in pax
            ):
                raise errors.UnsafeLayer(
                    f"{layer}: an entry carries both a GNU long name and a PAX path; tar"
                    " readers disagree on which one wins"
                )
            if long_name is not None:
                h.name, long_name = long_name, None
            if long_link is not None:
                h.linkname, long_link = long_link, None
            if pax:
                self._apply_pax(h, pax)
                pax = {}
            if t not in _REG:
                # Header-only types carry no data, whatever their size field says (Go's
                # isHeaderOnlyType, GNU tar): bytes "inside" a directory or link entry are
                # the next headers for every other reader, so they are for this one too.
                h.size = 0
            if h.uid > _MAX_ID or h.gid > _MAX_ID:
                raise errors.UnsafeLayer(f"{layer}: entry {h.name!r} has uid/gid out of range")
            if b"\0" in h.linkname:
                raise errors.UnsafeLayer(f"{layer}: entry {h.name!r} links to a name with NUL")
            self.entries += 1
            try:
                data_left = self._entry(h)
            except OSError as e:
                raise self._os_error(e, h.name) from e
            except (OverflowError, ValueError) as e:  # a field out of the kernel's range
                raise errors.UnsafeLayer(f"{layer}: cannot apply entry {h.name!r}: {e}") from e
            if data_left:
                inp.skip(data_left)
            pad = -h.size % BLOCK
            if pad:
                inp.skip(pad)

    def _apply_pax(self, h: _Header, records: dict[bytes, bytes]) -> None:
        layer = self.name
        for key, value in records.items():
            try:
                if key == b"path":
                    h.name = value
                elif key == b"linkpath":
                    h.linkname = value
                elif key == b"size":
                    h.size = int(value)
                elif key == b"uid":
                    h.uid = int(value)
                elif key == b"gid":
                    h.gid = int(value)
                elif key == b"mtime":
                    h.mtime_ns = _pax_time_ns(value, layer)
                elif key.startswith(_XATTR_PREFIX):
                    h.xattrs[key[len(_XATTR_PREFIX) :].decode("utf-8", "surrogateescape")] = value
                elif key.startswith(b"GNU.sparse."):
                    raise errors.UnsafeLayer(f"{layer}: GNU sparse files are not supported")
            except ValueError:
                raise errors.UnsafeLayer(f"{layer}: corrupt PAX record {key!r}") from None
        if h.size < 0 or h.uid < 0 or h.gid < 0:
            raise errors.UnsafeLayer(f"{layer}: negative size, uid or gid in a PAX header")

    def _os_error(self, e: OSError, name: bytes) -> Exception:
        if e.errno in _SPACE_ERRNOS:
            return errors.DiskPressure(f"{self.name}: no space left to write {name!r}: {e}")
        if e.errno in _LAYER_ERRNOS:
            return errors.UnsafeLayer(f"{self.name}: cannot apply entry {name!r}: {e}")
        return e

    # -- entries ----------------------------------------------------------------------

    def _entry(self, h: _Header) -> int:
        """Apply one entry; returns how many of its data bytes are still to be skipped."""
        layer = self.name
        if len(self.dirs) >= _MAX_CACHED_DIRS:
            self._forget_dirs()  # only between entries: no fd is in use here
        for xname in h.xattrs:
            if xname.startswith("trusted."):
                raise errors.UnsafeLayer(
                    f"{layer}: entry {h.name!r} carries the xattr {xname!r}; trusted.* xattrs"
                    " (including trusted.overlay.*) are never taken from a layer"
                )
        parts = _components(h.name, layer)
        t = h.typeflag
        if not parts:
            if t != _DIR:
                raise errors.UnsafeLayer(f"{layer}: a non-directory entry names the root")
            fd = self._dir(b"")
            self._dir_meta(fd, h, b"", self._chown_needed(h, b""))
            return h.size
        base = parts[-1]
        parent_key = b"/".join(parts[:-1])
        key = b"/".join(parts)
        d = self._dir(parent_key)

        if base.startswith(whiteouts.PREFIX):
            if base == whiteouts.OPAQUE:
                self.strategy.opaque(d, lambda child: self._was_created(parent_key, child))
                if self.strategy.tracks_created:
                    self._invalidate_below(parent_key)
            elif not base.startswith(whiteouts.META_PREFIX):
                target = whiteouts.target_of(base)
                self._invalidate(_join(parent_key, target))
                self.strategy.whiteout(d, target, h.uid, h.gid)
            return h.size

        if self.strategy.tracks_created:
            self.created.add(key)
        chown = self._chown_needed(h, parent_key)
        if t in _REG:
            self._file(d, base, key, h, chown)
            return 0
        if t == _DIR:
            self._mkdir(d, base, key, h, chown)
            return h.size
        self.dir_mtimes.pop(key, None)
        if t == _SYMLINK:
            self._replace(d, base, key, lambda: os.symlink(h.linkname, base, dir_fd=d))
        elif t == _HARDLINK:
            self._hardlink(d, base, key, h)
            return h.size
        elif t in (_CHAR, _BLOCK, _FIFO):
            if t == _FIFO:
                kind, dev = stat.S_IFIFO, 0
            else:
                kind = stat.S_IFCHR if t == _CHAR else stat.S_IFBLK
                dev = os.makedev(h.devmajor, h.devminor)
            perm = h.mode & 0o7777
            self._replace(d, base, key, lambda: os.mknod(base, kind | perm, dev, dir_fd=d))
            if chown:
                os.chown(base, h.uid, h.gid, dir_fd=d, follow_symlinks=False)
            if chown or perm & (0o7000 | self.umask):
                # The node was just created here by us and is not a symlink.
                os.chmod(base, perm, dir_fd=d)
        else:
            raise errors.UnsafeLayer(
                f"{layer}: entry {h.name!r} has the unsupported tar type {t!r}"
            )
        if t == _SYMLINK:
            if chown:
                os.chown(base, h.uid, h.gid, dir_fd=d, follow_symlinks=False)
        self._xattrs_at(d, base, h.xattrs)
        os.utime(base, ns=(h.mtime_ns, h.mtime_ns), dir_fd=d, follow_symlinks=False)
        return h.size

    def _chown_needed(self, h: _Header, parent_key: bytes) -> bool:
        if h.uid != self.euid or h.gid != self.egid:
            return True
        return self.setgid.get(parent_key, True)

    def _file(self, d: int, base: bytes, key: bytes, h: _Header, chown: bool) -> None:
        perm = h.mode & 0o7777
        self.dir_mtimes.pop(key, None)
        try:
            fd = os.open(base, _FILE_FLAGS, perm & 0o777, dir_fd=d)
        except FileExistsError:
            self._remove(d, base, key)
            fd = os.open(base, _FILE_FLAGS, perm & 0o777, dir_fd=d)
        try:
            if h.size:
                self.input.copy(fd, h.size)
            if chown:
                os.fchown(fd, h.uid, h.gid)
            if chown or perm & (0o7000 | self.umask):
                os.fchmod(fd, perm)
            for xname, value in h.xattrs.items():
                self._setxattr(fd, xname, value)
            os.utime(fd, ns=(h.mtime_ns, h.mtime_ns))
        finally:
            os.close(fd)

    def _mkdir(self, d: int, base: bytes, key: bytes, h: _Header, chown: bool) -> None:
        self.implicit.pop(key, None)
        try:
            os.mkdir(base, 0o700, dir_fd=d)
        except FileExistsError:
            st = os.stat(base, dir_fd=d, follow_symlinks=False)
            if not stat.S_ISDIR(st.st_mode):
                self._remove(d, base, key)
                os.mkdir(base, 0o700, dir_fd=d)
        fd = self.dirs.get(key)
        if fd is None:
            fd = os.open(base, _DIR_FLAGS, dir_fd=d)
            self._cache(key, fd)
        self._dir_meta(fd, h, key, chown)

    def _dir_meta(self, fd: int, h: _Header, key: bytes, chown: bool) -> None:
        if chown:
            os.fchown(fd, h.uid, h.gid)
        perm = h.mode & 0o7777
        os.fchmod(fd, perm)
        self.setgid[key] = bool(perm & stat.S_ISGID)
        for xname, value in h.xattrs.items():
            self._setxattr(fd, xname, value)
        self.dir_mtimes[key] = h.mtime_ns

    def _hardlink(self, d: int, base: bytes, key: bytes, h: _Header) -> None:
        tparts = _components(h.linkname, self.name, "hardlink target")
        if not tparts:
            raise errors.UnsafeLayer(f"{self.name}: hardlink {h.name!r} points at the root")
        tkey = b"/".join(tparts)
        if tkey == key:
            return  # a link to itself: nothing to do
        td = self._dir(b"/".join(tparts[:-1]), create=False)
        tbase = tparts[-1]
        try:
            os.link(tbase, base, src_dir_fd=td, dst_dir_fd=d, follow_symlinks=False)
        except FileExistsError:
            self._remove(d, base, key)
            os.link(tbase, base, src_dir_fd=td, dst_dir_fd=d, follow_symlinks=False)
        except FileNotFoundError:
            raise errors.UnsafeLayer(
                f"{self.name}: hardlink {h.name!r} points at {h.linkname!r},"
                " which is not in this layer's root"
            ) from None

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
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(base, dir_fd=parent, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                raise errors.UnsafeLayer(
                    f"{self.name}: {key!r} is used as a directory but is not one"
                ) from None
            fd = _open_in_root(self.root_fd, key, self.name)
        self._cache(key, fd, check_setgid=True)
        return fd

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
        for key, mtime_ns in self.dir_mtimes.items():
            if not key:
                os.utime(self._dir(b""), ns=(mtime_ns, mtime_ns))
                continue
            parent_key, _, base = key.rpartition(b"/")
            try:
                d = self._dir(parent_key, create=False)
                os.utime(base, ns=(mtime_ns, mtime_ns), dir_fd=d, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed later in the layer (a whiteout or a replacement)


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
    """
    if not paths or not lowers:
        return
    upper_fd = os.open(upper, _DIR_FLAGS)
    try:
        for path in paths:
            parts = _components(os.fsencode(path), "upper", "directory")
            source = _find_lower_dir(lowers, parts)
            if source is None:
                continue
            fd = _open_under(upper_fd, parts)
            if fd is None:
                continue
            try:
                _copy_dir_meta(source, fd)
            finally:
                os.close(source)
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


# -- openat2(RESOLVE_IN_ROOT) -----------------------------------------------------------

_SYS_OPENAT2: Final = 437  # the same number on every architecture (new syscall table)
_RESOLVE_NO_MAGICLINKS: Final = 0x02
_RESOLVE_IN_ROOT: Final = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def _open_in_root(root_fd: int, key: bytes, layer: str) -> int:
    """Open the directory ``key`` following symlinks as if ``root_fd`` were ``/``."""
    how = _OpenHow(_DIR_FLAGS & ~os.O_NOFOLLOW, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(root_fd),
        ctypes.c_char_p(key),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err == errno.ENOSYS:  # pragma: no cover - kernels before 5.6
        raise errors.UnsafeLayer(
            f"{layer}: {key!r} goes through a symlink, and this kernel has no openat2 to"
            " resolve it safely inside the root"
        )
    raise errors.UnsafeLayer(
        f"{layer}: {key!r} goes through a symlink that does not resolve to a directory"
        f" inside the root: {os.strerror(err)}"
    )
