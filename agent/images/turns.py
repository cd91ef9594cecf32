"""Turns at writing layers: how many layers one process writes to disk at once.

Applying a layer is CPU work in this process (the tar reader and the per-entry calls run
under one interpreter lock) plus the kernel's file creation. Two layers applied by two
threads at once are *slower* than one after the other: they take turns at the interpreter
lock for every entry, and on some filesystems the kernel's inode allocation contends too
(ext4 without a journal checks every new inode against recently deleted ones; measured in
``bench/README.md``: GNU tar extracting two layers at once there used 6x the system time of
one at a time). So, like containerd's own unpacker, which applies an image's layers one at a
time, a process applies ``limit`` layers at once (default 1) across all its pulls.

A layer applied while its blob downloads would then hold the turn while it waits for the
network. It does not: a reader that is about to wait for bytes that have not arrived calls
:func:`waiting`, which gives the calling thread's turn to the next layer in line for the
wait and queues for it again afterwards (:class:`~.content.local.FollowingReader` does, and
:class:`~.unpack.readahead.Readahead` when the layer's next inflated chunk is not ready).
Turns are handed out first come, first served.
"""

from __future__ import annotations

import collections
import contextlib
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError
from typing import Final

#: Layers one process applies at once unless configured (``images.max_concurrent_unpacks``).
DEFAULT_LIMIT: Final = 1

#: How often a thread waiting for a turn checks whether its unpack was cancelled.
_CANCEL_POLL: Final = 0.1


class Turns:
    """At most ``limit`` threads hold a turn at once; the others wait in arrival order."""

    def __init__(self, limit: int = DEFAULT_LIMIT):
        if limit < 1:
            raise ValueError(f"turns: the limit must be at least 1, not {limit}")
        self.limit = limit
        self._cond = threading.Condition()
        self._held = 0
        self._queue: collections.deque[object] = collections.deque()

    @property
    def held(self) -> int:
        """How many turns are taken now."""
        return self._held

    @property
    def waiting(self) -> int:
        """How many threads wait for a turn now."""
        return len(self._queue)

    @contextlib.contextmanager
    def turn(self, cancel: threading.Event | None = None) -> Iterator[None]:
        """Hold a turn while the block runs (waiting for one first).

        Raises:
            CancelledError: ``cancel`` was set while waiting for the turn.
        """
        previous = getattr(_local, "held", None)
        if previous is not None:  # already holding one (of these or other turns): reuse it
            yield
            return
        self._acquire(cancel)
        _local.held = (self, cancel)
        try:
            yield
        finally:
            if getattr(_local, "held", None) is not None:  # not lost by waiting()'s cancel
                _local.held = None
                self._release()

    def _acquire(self, cancel: threading.Event | None) -> None:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                while self._queue[0] is not ticket or self._held >= self.limit:
                    if cancel is not None and cancel.is_set():
                        raise CancelledError("cancelled while waiting for a turn to unpack")
                    self._cond.wait(_CANCEL_POLL if cancel is not None else None)
            except BaseException:
                self._queue.remove(ticket)
                self._cond.notify_all()
                raise
            self._queue.popleft()
            self._held += 1
            self._cond.notify_all()  # the next in line may fit too (limit > 1)

    def _release(self) -> None:
        with self._cond:
            self._held -= 1
            self._cond.notify_all()


_local = threading.local()


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Around a wait for I/O: the calling thread's turn, if it holds one, goes to the next
    in line meanwhile and is queued for again afterwards (which may raise
    :class:`CancelledError` if the unpack was cancelled)."""
    held: tuple[Turns, threading.Event | None] | None = getattr(_local, "held", None)
    if held is None:
        yield
        return
    turns, cancel = held
    _local.held = None
    turns._release()
    try:
        yield
    finally:
        turns._acquire(cancel)
        _local.held = held
