"""The raw Linux system calls the image service needs and :mod:`os` does not offer.

One ``libc`` handle for all of them:

* :func:`open_in_root` — ``openat2(2)`` with ``RESOLVE_IN_ROOT``: open a path below a
  directory fd, following symlinks as if that directory were ``/`` (never leaving it).
* :func:`syncfs` — ``syncfs(2)``: flush the whole filesystem that holds a path.
* :func:`fsync_dir` — ``fsync(2)`` a directory, so that a rename or a new entry in it is
  durable.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Final

_libc: Final = ctypes.CDLL(None, use_errno=True)

_SYS_OPENAT2: Final = 437  # the same number on every architecture (new syscall table)
_RESOLVE_NO_MAGICLINKS: Final = 0x02
_RESOLVE_IN_ROOT: Final = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_in_root(root_fd: int, path: bytes, flags: int) -> int:
    """``openat2(root_fd, path, flags, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)``.

    Symlinks (absolute ones too) and ``..`` are resolved as if ``root_fd`` were ``/``, so
    the result is always inside it. Raises :class:`OSError` (``ENOSYS`` on kernels before
    5.6).
    """
    how = _OpenHow(flags, 0, _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(
        ctypes.c_long(_SYS_OPENAT2),
        ctypes.c_int(root_fd),
        ctypes.c_char_p(path),
        ctypes.byref(how),
        ctypes.c_size_t(ctypes.sizeof(how)),
    )
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err), os.fsdecode(path))


def syncfs(path: str | os.PathLike[str]) -> None:
    """``syncfs(2)``: flush the whole filesystem that holds ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs({os.fspath(path)}): {os.strerror(err)}")
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """``fsync(2)`` the directory ``path`` (a filesystem that refuses it is ignored)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover - some filesystems refuse fsync on dirs
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
