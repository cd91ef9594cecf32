"""Decompress and hash a layer in a thread of its own, a few chunks ahead of its tar reader.

Inflating gzip (ISA-L) and SHA-256 release the interpreter lock, so a second thread doing
them overlaps with the thread applying the entries (Python work and file-creating system
calls): measured in ``bench/README.md``. The reader hands out the chunks in order; what the
thread raised (a corrupt stream, a bomb limit, a failed download) is raised by the
:meth:`Readahead.read` that reaches it. The diff ID is hashed by the thread as it reads, so
the tar reader does not hash again (:meth:`Readahead.digest`).

An applier that waits for a chunk the thread has not made yet gives its turn at writing
(:func:`agent.images.turns.waiting`) meanwhile: the layer is then waiting for its download
or its decompression, and another layer can write. Before each chunk it makes way for a
layer earlier in line that is ready to write again (:func:`agent.images.turns.make_way`).
"""

from __future__ import annotations

import collections
import sys
import threading
from typing import Final

from agent.images import digests, turns
from agent.images.unpack import compression

#: Chunks read ahead at most (the memory a layer holds: DEPTH x the chunk size).
DEPTH: Final = 4

#: The interpreter's thread switch interval for a process that pulls (Python's default is
#: 5 ms). The read-ahead thread needs the interpreter lock back after every inflate call,
#: and a tar reader busy in Python held it for the whole interval each time: the read-ahead
#: starved and cost CPU instead of saving time (190 MiB shape: ~1 s more CPU, no faster);
#: at 0.5 ms it keeps ahead (bench/README.md, session 4).
SWITCH_INTERVAL: Final = 0.0005


def tune_interpreter() -> None:
    """Set :data:`SWITCH_INTERVAL` for this process, unless something set a shorter one."""
    if sys.getswitchinterval() > SWITCH_INTERVAL:
        sys.setswitchinterval(SWITCH_INTERVAL)


class Readahead:
    """Reads ``stream`` in ``chunk``-sized reads on a daemon thread, at most :data:`DEPTH`
    chunks ahead. :meth:`close` it (also after an error): the thread stops at its next read.
    """

    def __init__(self, stream: compression.Readable, chunk: int, *, name: str = "layer"):
        self._stream = stream
        self._chunk = chunk
        self._hasher = digests.Hasher("sha256")
        self._cond = threading.Condition()
        self._ready: collections.deque[bytes] = collections.deque()
        self._error: BaseException | None = None
        self._eof = False
        self._closed = False
        self._thread = threading.Thread(
            target=self._run, name=f"readahead {name}"[:64], daemon=True
        )
        self._thread.start()

    def read(self, size: int = -1, /) -> bytes:
        """The next chunk (``size`` is ignored: chunks are what the thread read); ``b""``
        at the end of the stream."""
        turns.make_way()
        with self._cond:
            waited = not self._has_news()
        if waited:
            # The turn is given away outside the lock the reading thread needs.
            with turns.waiting(), self._cond:
                while not self._has_news():
                    self._cond.wait()
        with self._cond:
            if self._ready:
                data = self._ready.popleft()
                self._cond.notify_all()
                return data
            if self._error is not None:
                raise self._error
            return b""

    def _has_news(self) -> bool:
        return bool(self._ready) or self._eof or self._error is not None

    def digest(self) -> digests.Digest:
        """SHA-256 of every byte read from the stream (all of it, once :meth:`read` has
        returned ``b""``)."""
        return self._hasher.digest()

    def close(self) -> None:
        """Stop the thread (it may finish the read it is in) and drop what it read."""
        with self._cond:
            self._closed = True
            self._ready.clear()
            self._cond.notify_all()

    def __enter__(self) -> Readahead:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self) -> None:
        read, update = self._stream.read, self._hasher.update
        try:
            while True:
                with self._cond:
                    while len(self._ready) >= DEPTH and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                data = read(self._chunk)
                if data:
                    update(data)
                with self._cond:
                    if not data:
                        self._eof = True
                    elif not self._closed:
                        self._ready.append(data)
                    self._cond.notify_all()
                    if self._eof or self._closed:
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the reader
            with self._cond:
                self._error = e
                self._cond.notify_all()
