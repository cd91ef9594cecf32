"""``PreparedAhead``: containerd's snapshotter for one import, with the layers' empty active
snapshots prepared in advance.

containerd's overlayfs ``Commit`` walks the whole layer (its disk usage) inside containerd's
metadata transaction, and every ``Prepare`` meanwhile waits for it: an unpack thread that
finished a layer and starts the next one would sit idle for the length of the walk of the
layer committed before. Here a background thread prepares as many parentless active
snapshots as the import will apply (while nothing is being committed yet), and
:meth:`PreparedAhead.prepare` of a parentless snapshot hands out one of them: the unpacker
applies side by side on empty parents and rebases at commit
(:data:`~agent.images.snapshots.CAP_REBASE`), so which empty snapshot a layer starts in
does not matter. Every other call goes to the snapshotter, with the unpacker's keys mapped
to the snapshots it was given. :meth:`close` removes the spares nobody took; like every
active snapshot of the agent they carry its owner label, so a crash leaves them to
:meth:`~.snapshotter.ContainerdSnapshotter.cleanup`.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from agent.images import digests, errors
from agent.images.containerd import snapshotter as snapshotter_mod
from agent.images.snapshots import chains
from agent.images.snapshots import snapshotter as snapshots


class PreparedAhead:
    """``inner`` (under the import's lease), with an empty snapshot prepared ahead for each
    layer of ``diff_ids`` above those containerd has committed."""

    def __init__(
        self, inner: snapshotter_mod.ContainerdSnapshotter, diff_ids: Sequence[digests.Digest]
    ):
        self._inner = inner
        self._lock = threading.Lock()
        self._spares: list[tuple[str, list[snapshots.Mount]]] = []
        self._given: dict[str, str] = {}  # the unpacker's key -> the spare's
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._prepare_spares, args=(list(diff_ids),), name="ctrd-prepare",
            daemon=True,
        )
        self._thread.start()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[snapshots.Mount]:
        if not parent:
            with self._lock:
                if self._spares:
                    spare, mounts = self._spares.pop(0)
                    self._given[key] = spare
                    return mounts
        return self._inner.prepare(key, parent, labels)

    def stat(self, key: str) -> snapshots.Info:
        return self._inner.stat(self._key(key))

    def mounts(self, key: str) -> list[snapshots.Mount]:
        return self._inner.mounts(self._key(key))

    def commit(
        self,
        name: str,
        key: str,
        labels: Mapping[str, str] | None = None,
        *,
        parent: str | None = None,
    ) -> None:
        spare = self._key(key)
        if labels is None and spare != key:
            labels = {}  # the spare's own labels are only the owner's, which go anyway
        self._inner.commit(name, spare, labels, parent=parent)
        self._forget(key)

    def remove(self, key: str) -> None:
        try:
            self._inner.remove(self._key(key))
        finally:
            self._forget(key)

    def close(self) -> None:
        """Stop preparing and remove the spares nobody took."""
        self._stop.set()
        self._thread.join()
        with self._lock:
            left, self._spares = self._spares, []
        for spare, _ in left:
            with contextlib.suppress(errors.ImageError):
                self._inner.remove(spare)

    # -- internals ----------------------------------------------------------------------

    def _key(self, key: str) -> str:
        with self._lock:
            return self._given.get(key, key)

    def _forget(self, key: str) -> None:
        with self._lock:
            self._given.pop(key, None)

    def _prepare_spares(self, diff_ids: list[digests.Digest]) -> None:
        labels = {snapshots.LABEL_OWNER: snapshots.owner_token()}
        try:
            count = len(diff_ids) - chains.committed_depth(self._inner, diff_ids)
        except errors.ImageError:
            return
        for _ in range(count):
            if self._stop.is_set():
                return
            key = f"{snapshotter_mod.UNPACK_KEY_PREFIX}{secrets.token_hex(8)}"
            try:
                mounts = self._inner.prepare(key, "", labels)
            except errors.ImageError:
                return  # the unpacker prepares its own
            with self._lock:
                if self._stop.is_set():
                    stale = True
                else:
                    stale = False
                    self._spares.append((key, mounts))
            if stale:
                with contextlib.suppress(errors.ImageError):
                    self._inner.remove(key)
                return
