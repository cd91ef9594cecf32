"""Unpack an image's layers into committed snapshots named by their chain IDs.

Per image (containerd ``core/unpack``): compute the chain IDs; skip every layer whose chain
ID is already committed; for each missing layer prepare an active snapshot (key
``extract-<random> <chainID>``, labelled with its owner process so ``cleanup()`` can remove
it after a crash), stream the blob through decompression into the snapshot's directory while
hashing the uncompressed bytes, compare that diff ID with the image config's, ``syncfs`` when
asked, and commit the snapshot under its chain ID on the previous chain ID. An
:class:`~agent.images.errors.AlreadyExists` at commit means another pull won the race: the
active snapshot is dropped and the layer counts as done.

When the snapshotter can rebase (overlay: layers are independent directories) the missing
layers are taken up by worker threads, up to ``concurrency`` at a time, and committed
strictly in chain order by the calling thread, while the workers go on with the next layers;
otherwise (naive, containerd: a snapshot is prepared on its committed parent) one after the
other. Writing a layer's files needs a :class:`~agent.images.turns.Turns` turn (one layer at
a time in the process by default, whatever the number of pulls): a layer that waits for its
download's next bytes gives its turn to the next worker meanwhile, so the workers overlap
downloads, not file creation. Each layer is inflated and hashed by a
:class:`~.readahead.Readahead` thread a few MiB ahead of its tar reader.

With ``sync_fs`` a layer's ``syncfs`` runs in a :class:`~.syncer.Syncer` thread: the layer is
committed once a ``syncfs`` started after its last write has returned, but the next layers
are applied meanwhile, and early flushes while layers are written keep the last one short.

A failed layer (unsafe, corrupt, diff ID mismatch, cancelled) has its active snapshot
removed; layers committed before it stay (they are correct and shared by chain ID), nothing
after it is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final

from agent.images import descriptors, digests, errors, snapshots, tracing
from agent.images import turns as turns_mod
from agent.images.content import store
from agent.images.snapshots import chains
from agent.images.unpack import archive, compression, readahead, syncer, tar, whiteouts

DEFAULT_CONCURRENCY: Final = 3

SPAN_PREFIX: Final = "agent.images.unpack"


@dataclass(frozen=True)
class UnpackEvent:
    """Progress of one layer.

    Attributes:
        kind: ``"started"`` (its snapshot is prepared), ``"progress"`` (about every MiB),
            ``"done"`` (committed, or committed by someone else) or ``"skipped"`` (its chain
            ID was already committed before this unpack).
        index: the layer's position in the image, bottom first.
        layer: the layer's descriptor.
        chain_id: the name its snapshot is committed under.
        compressed_bytes: blob bytes read so far (of ``layer.size``).
        uncompressed_bytes: tar bytes applied so far.
    """

    kind: str
    index: int
    layer: descriptors.Descriptor
    chain_id: digests.Digest
    compressed_bytes: int = 0
    uncompressed_bytes: int = 0


OnProgress = Callable[[UnpackEvent], None]


@dataclass(frozen=True)
class _Applied:
    key: str  # the active snapshot
    target: str  # the directory the layer was written into
    result: archive.ApplyResult
    span: tracing.Span | None = None  # the layer's span, ended once it is committed
    synced: Future[None] | None = None  # its syncfs (with sync_fs), awaited before the commit


class Unpacker:
    """Unpacks images from a blob provider into a snapshotter.

    Args:
        provider: where the layer blobs are read from (only ``open_blob`` is used).
        snapshotter: where the layers are unpacked to.
        sync_fs: ``syncfs(2)`` each layer's filesystem after its files are written and
            before its snapshot is committed (``image_pull_with_sync_fs``), without holding
            up the next layers (see the module doc). Equivalent to the snapshotter's own
            ``sync_fs``, which flushes inline; turn on one of them.
        max_uncompressed_bytes: refuse a layer that decompresses to more than this.
        max_image_uncompressed_bytes: refuse the image once the layers this unpacker applies
            decompress to more than this together (0: no cap). One unpacker per image.
        max_ratio: refuse a layer whose uncompressed/compressed ratio passes this.
        concurrency: how many layers are taken up at once (with a rebasing snapshotter).
        turns: the turns at writing a layer's files, shared by every unpacker of the
            process (default: :data:`PROCESS_TURNS`, one layer at a time).
        on_progress: called with an :class:`UnpackEvent`, from worker threads.
    """

    def __init__(
        self,
        provider: store.BlobProvider,
        snapshotter: snapshots.Snapshotter,
        *,
        sync_fs: bool = False,
        max_uncompressed_bytes: int = compression.DEFAULT_MAX_UNCOMPRESSED_BYTES,
        max_image_uncompressed_bytes: int = 0,
        max_ratio: float = compression.DEFAULT_MAX_RATIO,
        concurrency: int = DEFAULT_CONCURRENCY,
        turns: turns_mod.Turns | None = None,
        on_progress: OnProgress | None = None,
    ):
        self.provider = provider
        self.snapshotter = snapshotter
        self.sync_fs = sync_fs
        self.max_uncompressed_bytes = max_uncompressed_bytes
        self.max_ratio = max_ratio
        self.image_limit = compression.ImageLimit(
            max_image_uncompressed_bytes, setting="images.max_image_uncompressed_bytes"
        )
        self.concurrency = max(1, concurrency)
        self.turns = turns if turns is not None else PROCESS_TURNS
        self._line = self.turns.line()  # this image's layers go in chain order, after others'
        self.on_progress = on_progress
        # One syncer for the unpacks running at once (with sync_fs), and how many they are.
        self._syncer: syncer.Syncer | None = None
        self._syncer_users = 0
        self._syncer_lock = threading.Lock()
        caps = snapshotter.capabilities
        self._rebase = _CAP_REBASE in caps
        if _CAP_OVERLAY_WHITEOUTS in caps:
            if not whiteouts.overlay_permitted():
                raise errors.Unavailable(
                    "overlay whiteouts need root with CAP_MKNOD and CAP_SYS_ADMIN outside a"
                    " user namespace; use the naive snapshotter here"
                )
            self._whiteouts = whiteouts.OVERLAY
        else:
            self._whiteouts = whiteouts.REMOVE

    async def unpack(
        self,
        layers: Sequence[descriptors.Descriptor],
        diff_ids: Sequence[digests.Digest],
    ) -> digests.Digest:
        """Unpack ``layers`` (bottom first) and return the top chain ID.

        The blocking work runs in threads. Cancelling the awaiting task stops the unpack at
        the next tar entry, removes the active snapshots, and then re-raises.

        Raises:
            DigestMismatch: a layer's diff ID is not the config's.
            UnsafeLayer, UnsupportedMediaType, DiskPressure: a layer cannot be applied.
            NotFound: a blob is missing from the provider.
        """
        cancel = threading.Event()
        task = asyncio.ensure_future(
            asyncio.to_thread(self.unpack_blocking, layers, diff_ids, cancel=cancel)
        )
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.set()
            with contextlib.suppress(BaseException):
                await task
            raise

    def unpack_blocking(
        self,
        layers: Sequence[descriptors.Descriptor],
        diff_ids: Sequence[digests.Digest],
        *,
        cancel: threading.Event | None = None,
    ) -> digests.Digest:
        """:meth:`unpack`, blocking the calling thread."""
        if len(layers) != len(diff_ids):
            raise errors.InvalidManifest(
                f"the manifest has {len(layers)} layers but the config {len(diff_ids)} diff IDs"
            )
        if not layers:
            raise errors.InvalidManifest("an image without layers cannot be unpacked")
        cancel = cancel or threading.Event()
        chain = digests.chain_ids(diff_ids)
        depth = chains.committed_depth(self.snapshotter, diff_ids)
        for i in range(depth):
            self._emit("skipped", i, layers[i], chain[i])
        missing = list(range(depth, len(chain)))
        if not missing:
            return chain[-1]

        def parent_of(i: int) -> str:
            return chain[i - 1] if i else ""

        with self._syncing():
            if self._rebase and len(missing) > 1:
                self._unpack_concurrently(layers, diff_ids, chain, missing, parent_of, cancel)
            else:
                for i in missing:
                    parent = "" if self._rebase else parent_of(i)
                    applied = self._traced_apply(
                        i, layers[i], diff_ids[i], chain[i], parent, cancel
                    )
                    self._traced_commit(i, layers[i], chain[i], applied, parent_of(i))
        return chain[-1]

    # -- internals ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _syncing(self) -> Iterator[None]:
        """With ``sync_fs``: a running :attr:`_syncer` while the block runs."""
        if not self.sync_fs:
            yield
            return
        with self._syncer_lock:
            if self._syncer is None:
                self._syncer = syncer.Syncer()
            self._syncer_users += 1
        try:
            yield
        finally:
            with self._syncer_lock:
                self._syncer_users -= 1
                done, self._syncer = (
                    (self._syncer, None) if not self._syncer_users else (None, self._syncer)
                )
            if done is not None:
                done.close()

    def _unpack_concurrently(
        self,
        layers: Sequence[descriptors.Descriptor],
        diff_ids: Sequence[digests.Digest],
        chain: list[digests.Digest],
        missing: list[int],
        parent_of: Callable[[int], str],
        cancel: threading.Event,
    ) -> None:
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="unpack") as pool:
            futures: dict[int, Future[_Applied]] = {
                i: pool.submit(
                    tracing.in_current_span(self._traced_apply),
                    i, layers[i], diff_ids[i], chain[i], "", cancel,
                )
                for i in missing
            }
            done: set[int] = set()
            try:
                for i in missing:
                    applied = futures[i].result()
                    done.add(i)
                    self._traced_commit(i, layers[i], chain[i], applied, parent_of(i))
            except BaseException as e:
                cancel.set()
                for i, fut in futures.items():
                    if i in done:
                        continue
                    fut.cancel()
                    with contextlib.suppress(BaseException):
                        self._remove(fut.result().key)
                    with contextlib.suppress(BaseException):
                        tracing.end(fut.result().span, e)
                raise

    def _traced_apply(
        self,
        index: int,
        layer: descriptors.Descriptor,
        diff_id: digests.Digest,
        chain_id: digests.Digest,
        parent: str,
        cancel: threading.Event,
    ) -> _Applied:
        """:meth:`_apply` in a new ``layer`` span, left open for :meth:`_traced_commit`."""
        span = tracing.start_span(SPAN_PREFIX, "layer", {
            tracing.LAYER_DIGEST: str(layer.digest),
            tracing.LAYER_SIZE: layer.size,
            tracing.LAYER_MEDIA_TYPE: layer.media_type,
            "layer.index": index,
            "layer.chain_id": str(chain_id),
        })
        try:
            with tracing.use(span):
                applied = self._apply(index, layer, diff_id, chain_id, parent, cancel)
        except BaseException:
            tracing.end(span)  # use() recorded the error
            raise
        return dataclasses.replace(applied, span=span)

    def _traced_commit(
        self,
        index: int,
        layer: descriptors.Descriptor,
        chain_id: digests.Digest,
        applied: _Applied,
        parent: str,
    ) -> None:
        """:meth:`_commit` in a ``commit`` span under the layer's, which then ends."""
        if applied.span is None:  # pragma: no cover - _traced_apply always sets it
            self._commit(index, layer, chain_id, applied, parent)
            return
        with tracing.use(applied.span, end=True), tracing.span(SPAN_PREFIX, "commit"):
            self._commit(index, layer, chain_id, applied, parent)

    def _apply(
        self,
        index: int,
        layer: descriptors.Descriptor,
        diff_id: digests.Digest,
        chain_id: digests.Digest,
        parent: str,
        cancel: threading.Event,
    ) -> _Applied:
        """Apply one layer into a new active snapshot (not committed yet).

        The provider may hand out a blob that is still downloading (an object with
        ``confirm()`` and ``outcome()``, see :class:`_Unconfirmed`). Its bytes are applied
        as they arrive, and the layer is only returned once ``confirm()`` says the blob was
        committed (size and digest verified) and the layer's uncompressed bytes hash to its
        diff ID. If anything fails during such a speculative apply (bytes that fail to
        decompress or parse, or — after a download restarted under it — to match the diff
        ID), the active snapshot is removed and, once the blob is committed, the layer is
        applied again from the committed blob; that second attempt's error, if any, is the
        layer's. Without a restart the bytes applied were the committed blob's, and a diff
        ID mismatch is the layer's error at once.
        """
        if cancel.is_set():
            raise CancelledError(f"layer {layer.digest}: unpack cancelled")
        try:
            return self._apply_once(index, layer, diff_id, chain_id, parent, cancel, True)
        except _Unconfirmed as e:
            tracing.set_attributes({"layer.speculation_abandoned": str(e)})
            return self._apply_once(index, layer, diff_id, chain_id, parent, cancel, False)

    def _apply_once(
        self,
        index: int,
        layer: descriptors.Descriptor,
        diff_id: digests.Digest,
        chain_id: digests.Digest,
        parent: str,
        cancel: threading.Event,
        speculate: bool,
    ) -> _Applied:
        key = f"extract-{secrets.token_hex(8)} {chain_id}"
        labels = {_LABEL_OWNER: snapshots.snapshotter.owner_token()}
        mounts = self.snapshotter.prepare(key, parent, labels)
        opened: compression.Decompressed | None = None  # counted against the image limit
        try:
            target = _target(mounts)
            if speculate:
                self._emit("started", index, layer, chain_id)
            name = f"layer {layer.digest}"
            with self.provider.open_blob(layer.digest) as blob:
                confirm = getattr(blob, "confirm", None)
                if confirm is not None and not speculate:
                    raise errors.Unavailable(f"{name}: its blob was not committed")
                try:
                    with self.turns.turn(cancel, (self._line, index)):
                        stream = compression.open_layer(
                            blob,
                            layer.media_type,
                            max_uncompressed_bytes=self.max_uncompressed_bytes,
                            max_ratio=self.max_ratio,
                            image_limit=self.image_limit,
                            name=name,
                        )
                        opened = stream

                        written = 0

                        def progress(n: int) -> None:
                            nonlocal written
                            if self._syncer is not None:
                                self._syncer.wrote(target, n - written)
                                written = n
                            self._emit(
                                "progress", index, layer, chain_id, stream.compressed_bytes, n
                            )

                        # Inflated and hashed on a thread of its own, a few MiB ahead.
                        with readahead.Readahead(stream, tar.CHUNK, name=name) as ahead:
                            result = archive.apply(
                                ahead,
                                target,
                                whiteouts=self._whiteouts,
                                on_progress=(
                                    progress if self.on_progress or self._syncer else None
                                ),
                                cancel=cancel,
                                name=name,
                            )
                    # The blob must be committed (verified) before its layer is; and if
                    # its download was restarted under the apply, only the diff ID below
                    # tells whether the bytes applied were the blob's.
                    certain = confirm() if confirm is not None else True
                except Exception as e:
                    if confirm is None or cancel.is_set():
                        raise
                    # Unverified bytes may be the cause: judge the layer by its committed
                    # blob, once the download is over (if it fails, so does the pull).
                    if not getattr(blob, "outcome")():  # noqa: B009
                        raise
                    raise _Unconfirmed(str(e)) from e
            if result.diff_id != diff_id:
                if not certain:  # perhaps the bytes of the first attempt: judge the blob
                    raise _Unconfirmed(f"{name}: its download was restarted under the apply")
                raise errors.DigestMismatch(
                    f"{name}: uncompressed it hashes to {result.diff_id}, but the image"
                    f" config says its diff ID is {diff_id}"
                )
            # The commit waits for this syncfs; the next layer need not.
            synced = self._syncer.barrier(target) if self._syncer is not None else None
        except BaseException:
            self._remove(key)
            if opened is not None:  # its bytes are gone with the snapshot
                self.image_limit.give_back(opened.uncompressed_bytes)
            raise
        self._emit("progress", index, layer, chain_id, stream.compressed_bytes, result.size)
        return _Applied(key, target, result, synced=synced)

    def _commit(
        self,
        index: int,
        layer: descriptors.Descriptor,
        chain_id: digests.Digest,
        applied: _Applied,
        parent: str,
    ) -> None:
        key = applied.key
        try:
            result = applied.result
            if (result.implicit_dirs or result.opaque_root) and parent and (
                self._whiteouts is whiteouts.OVERLAY
            ):
                # Now that the parents are committed: hide all of them under a layer opaque
                # at its root, or give the directories this layer created implicitly their
                # metadata from the layers below.
                lowers = _lowers(self.snapshotter.mounts(parent))
                if result.opaque_root:
                    archive.hide_lower_entries(applied.target, lowers)
                else:
                    archive.copy_up_parents(applied.target, lowers, result.implicit_dirs)
                if self._syncer is not None:
                    applied = dataclasses.replace(
                        applied, synced=self._syncer.barrier(applied.target)
                    )
            if applied.synced is not None:
                with tracing.span(SPAN_PREFIX, "syncfs"):
                    applied.synced.result()  # file data on disk before the metadata commit
            self.snapshotter.commit(chain_id, key, parent=parent if self._rebase else None)
        except errors.AlreadyExists:
            self._remove(key)  # committed meanwhile by another unpack: the same content
        except BaseException:
            self._remove(key)
            raise
        self._emit("done", index, layer, chain_id, layer.size)

    def _remove(self, key: str) -> None:
        with contextlib.suppress(errors.NotFound):
            self.snapshotter.remove(key)

    def _emit(
        self,
        kind: str,
        index: int,
        layer: descriptors.Descriptor,
        chain_id: digests.Digest,
        compressed: int = 0,
        uncompressed: int = 0,
    ) -> None:
        if self.on_progress is not None:
            self.on_progress(UnpackEvent(kind, index, layer, chain_id, compressed, uncompressed))


#: The turns of every unpacker not given its own: one layer written at a time per process.
PROCESS_TURNS: Final = turns_mod.Turns()

_CAP_REBASE: Final = snapshots.CAP_REBASE
_CAP_OVERLAY_WHITEOUTS: Final = snapshots.CAP_OVERLAY_WHITEOUTS
_LABEL_OWNER: Final = snapshots.LABEL_OWNER


class _Unconfirmed(Exception):  # noqa: N818
    """A layer applied from a blob still downloading failed, or did not match its diff ID
    after the download was restarted under it; the layer is applied again from the committed
    blob."""


def _lowers(mounts: Sequence[snapshots.Mount]) -> list[str]:
    """The directories of a read-only chain's mounts, nearest first."""
    lowers: list[str] = []
    for m in mounts:
        if m.type == "bind":
            lowers.append(m.source)
        elif lowerdir := m.option("lowerdir"):
            lowers.extend(lowerdir.split(":"))
    return lowers


def _target(mounts: Sequence[snapshots.Mount]) -> str:
    """The directory a layer is written into: an overlay's upper dir or a bind's source."""
    if len(mounts) == 1:
        m = mounts[0]
        if m.type == "bind":
            return m.source
        upper = m.option("upperdir")
        if m.type == "overlay" and upper:
            return upper
    raise errors.UnsupportedMediaType(
        f"cannot apply a layer to the mounts {mounts!r}: expected one bind or overlay mount"
    )
