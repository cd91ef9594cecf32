"""``Syncer``: ``syncfs(2)`` in a background thread, so a layer's flush does not hold up the next.

``image_pull_with_sync_fs`` promises: a layer's file data is on disk before its snapshot's
metadata is committed (a committed snapshot never lacks data after a power loss). Done inline
— apply, ``syncfs``, commit, next layer — every flush stops the pipeline while the disk
writes. The syncer runs the flushes beside it instead:

* :meth:`Syncer.barrier` asks for a ``syncfs`` of a layer's directory *started after the
  call*; its future completes when that ``syncfs`` returned (or failed). The unpacker asks
  once a layer's files are written and verified, and commits the layer only when the future
  says so, while its workers already apply the next layers.
* :meth:`Syncer.wrote` counts bytes written; once :data:`BACKGROUND_BYTES` are dirty, an
  early ``syncfs`` starts writeback while the layers are still being applied, so the flush a
  barrier waits for — and the last one, which nothing overlaps — stays small.

Requests that arrive while a ``syncfs`` runs are served by the next one (one ``syncfs`` after
another; they flush the same filesystem).
"""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError, Future
from typing import Final

from agent.images import snapshots

#: Dirty bytes after which an early ``syncfs`` starts writeback.
BACKGROUND_BYTES: Final = 32 * 1024 * 1024


class Syncer:
    """One background thread running ``syncfs`` for an unpack; :meth:`close` it."""

    def __init__(self, background_bytes: int = BACKGROUND_BYTES):
        self._background_bytes = background_bytes
        self._cond = threading.Condition()
        self._dirty: dict[str, int] = {}  # directory → bytes written since the last syncfs
        self._waiting: list[tuple[str, Future[None]]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="syncfs", daemon=True)
        self._thread.start()

    def wrote(self, target: str, nbytes: int) -> None:
        """``nbytes`` more bytes were written under ``target``."""
        with self._cond:
            total = self._dirty.get(target, 0) + nbytes
            self._dirty[target] = total
            if total >= self._background_bytes:
                self._cond.notify()

    def barrier(self, target: str) -> Future[None]:
        """A future done once a ``syncfs`` of ``target`` that started after this call
        returned; it holds the ``OSError`` if that ``syncfs`` failed."""
        future: Future[None] = Future()
        with self._cond:
            if self._closed:
                future.set_exception(CancelledError("the syncer is closed"))
                return future
            self._waiting.append((target, future))
            self._cond.notify()
        return future

    def close(self) -> None:
        """Stop the thread; barriers not served yet are cancelled."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    def __enter__(self) -> Syncer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _due(self) -> bool:
        return bool(self._waiting) or any(
            n >= self._background_bytes for n in self._dirty.values()
        )

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._due():
                    self._cond.wait()
                if self._closed:
                    waiting, self._waiting = self._waiting, []
                    break
                waiting, self._waiting = self._waiting, []
                targets = list(dict.fromkeys(t for t, _ in waiting))
                if not targets:  # an early flush: the filesystem of the dirtiest directory
                    targets = [max(self._dirty, key=self._dirty.__getitem__)]
                self._dirty.clear()  # one syncfs flushes the whole filesystem
            failures: dict[str, OSError] = {}
            for target in targets:
                try:
                    snapshots.syncfs(target)
                except OSError as e:  # an early flush of a removed directory: harmless
                    failures[target] = e
            for target, future in waiting:
                if target in failures:
                    future.set_exception(failures[target])
                else:
                    future.set_result(None)
        for _, future in waiting:
            future.set_exception(CancelledError("the syncer is closed"))
