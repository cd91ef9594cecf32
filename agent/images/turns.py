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

Turns go by place in line: an unpacker takes a line when it starts and asks for each layer's
turn at ``(line, layer index)``, so its layers are written in chain order (the order they
are committed in) and before the layers of any unpacker that started later; a thread back
from such a wait keeps its place. Otherwise a lower layer whose download was late waited for
every layer above it that asked while it waited, and every commit above it then ran one
after the other once it was finally written (measured on the 190 MiB shape into containerd:
the second layer written last, four snapshot commits of 40-110 ms each at the end of the
pull). For the same reason a layer that holds the turn makes way between two chunks
(:func:`make_way`) for a layer earlier in line that is back from its wait: otherwise the
later layer kept the turn until its own next wait, often to its end.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
from collections.abc import Iterator
from concurrent.futures import CancelledError
from typing import Final

#: Layers one process applies at once unless configured (``images.max_concurrent_unpacks``).
DEFAULT_LIMIT: Final = 1

#: How often a thread waiting for a turn checks whether its unpack was cancelled.
_CANCEL_POLL: Final = 0.1


class Turns:
    """At most ``limit`` threads hold a turn at once; the others wait by their place in
    line (without one: in the order they asked)."""

    def __init__(self, limit: int = DEFAULT_LIMIT):
        if limit < 1:
            raise ValueError(f"turns: the limit must be at least 1, not {limit}")
        self.limit = limit
        self._cond = threading.Condition()
        self._held = 0
        self._lines = itertools.count()
        self._queue: list[tuple[int, int]] = []  # a heap of the waiters' places in line

    @property
    def held(self) -> int:
        """How many turns are taken now."""
        return self._held

    @property
    def waiting(self) -> int:
        """How many threads wait for a turn now."""
        return len(self._queue)

    def line(self) -> int:
        """A new line number: whoever asks for turns with it (:meth:`turn`'s ``place``)
        comes after every line taken before."""
        return next(self._lines)

    @contextlib.contextmanager
    def turn(
        self, cancel: threading.Event | None = None, place: tuple[int, int] | None = None
    ) -> Iterator[None]:
        """Hold a turn while the block runs (waiting for one first).

        ``place`` is ``(line, index)``: the waiters go in this order (an unpacker takes one
        line and asks for each layer's turn at ``(line, layer index)``, so its layers go in
        chain order, before those of every unpacker that came later); by default a new line.

        Raises:
            CancelledError: ``cancel`` was set while waiting for the turn.
        """
        previous = getattr(_local, "held", None)
        if previous is not None:  # already holding one (of these or other turns): reuse it
            yield
            return
        if place is None:
            place = (self.line(), 0)
        self._acquire(cancel, place)
        _local.held = (self, cancel, place)
        try:
            yield
        finally:
            if getattr(_local, "held", None) is not None:  # not lost by waiting()'s cancel
                _local.held = None
                self._release()

    def _acquire(self, cancel: threading.Event | None, place: tuple[int, int]) -> None:
        with self._cond:
            heapq.heappush(self._queue, place)
            try:
                while self._queue[0] != place or self._held >= self.limit:
                    if cancel is not None and cancel.is_set():
                        raise CancelledError("cancelled while waiting for a turn to unpack")
                    self._cond.wait(_CANCEL_POLL if cancel is not None else None)
            except BaseException:
                self._queue.remove(place)
                heapq.heapify(self._queue)
                self._cond.notify_all()
                raise
            heapq.heappop(self._queue)
            self._held += 1
            self._cond.notify_all()  # the next in line may fit too (limit > 1)

    def _release(self) -> None:
        with self._cond:
            self._held -= 1
            self._cond.notify_all()


_local = threading.local()


def _holding() -> tuple[Turns, threading.Event | None, tuple[int, int]] | None:
    """The turn the calling thread holds: (its turns, its cancel event, its place)."""
    held: tuple[Turns, threading.Event | None, tuple[int, int]] | None = getattr(
        _local, "held", None
    )
    return held


@contextlib.contextmanager
def waiting() -> Iterator[None]:
    """Around a wait for I/O: the calling thread's turn, if it holds one, goes to the next
    in line meanwhile and is queued for again afterwards, at its old place in line (which
    may raise :class:`CancelledError` if the unpack was cancelled)."""
    held = _holding()
    if held is None:
        yield
        return
    turns, cancel, place = held
    _local.held = None
    turns._release()
    try:
        yield
    finally:
        turns._acquire(cancel, place)
        _local.held = held


def make_way() -> None:
    """Between two chunks of a layer: if a thread earlier in line waits for a turn the
    calling thread holds (a lower layer back from waiting for its bytes, or the first
    layer of an image that started earlier), it takes the turn now and the calling thread
    asks again at its own place; otherwise nothing happens. May raise
    :class:`CancelledError` as :func:`waiting` does."""
    held = _holding()
    if held is None:
        return
    turns, _, place = held
    with turns._cond:
        behind = bool(turns._queue) and turns._queue[0] < place
    if behind:
        with waiting():
            pass
