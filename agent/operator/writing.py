"""The one writer of ``NodeImageSet.spec`` in an operator process: per node, coalesced.

Every prefetch's reconcile says what it wants on a node — its contributions (the same on
every node it targets) or nothing (withdraw) — with :meth:`NodeWriter.write`, and waits for
the writes that carry it. The writer keeps, per node, the latest :class:`Change` of every
prefetch not yet written; a node becomes due ``debounce`` seconds after its first pending
change, and one of ``concurrency`` workers then folds *all* pending changes of that node into
the node's current entries (:func:`.entries.release` / :func:`.entries.upsert`, owners merged
as :mod:`agent.kube.specs` documents) and writes the result once. 20 prefetches dispatching
to the same 1,000 nodes thus cost about 1,000 writes, not 20,000, and no two writes of one
node are ever in flight at once, so concurrent reconciles cannot lose each other's entries.

The write is a JSON merge patch of ``spec.images`` carrying the ``resourceVersion`` of the
body the entries were folded into (the watched body in the shared index,
:class:`.index.State`, which always includes our own last write: the writer stores the body
each write returns, and the index ignores events older than what it holds). Two writers
(an old and a new operator replica during a failover, or anything else) thus never clobber
each other: a 409 Conflict (the object changed since; an agent's status write does that
too) makes the writer read the object again and fold the changes into it, without a
back-off, up to :data:`CONFLICTS` times.

A node without a NodeImageSet gets one created (POST). A failed write is retried (bounded,
with back-off) on the then-current index; after that its waiters get the error and their
reconciles retry later.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from agent.kube import resources, specs
from agent.operator import entries, errors, kubeapi

JSON = dict[str, Any]
logger = logging.getLogger("agent.operator")

DEBOUNCE = 0.05
CONCURRENCY = 16
ATTEMPTS = 4
#: Conflicts (409) retried at once, on a fresh read, per flush.
CONFLICTS = 10
#: The CRD's caps (crds/nodeimagesets...yaml): entries per node, owners and secrets per entry,
#: owners of all the entries of a node. The size of a NodeImageSet grows with its owner
#: references, wherever they are: a budget of 2,048 per node (8 per entry on average) keeps
#: the worst case where 8 per entry kept it (~0.9 MB of etcd's 1.5 MiB), while up to 64
#: prefetches may share one image on a node (docs/limits.md).
MAX_ENTRIES = 256
MAX_OWNERS = 64
MAX_SECRETS = 8
MAX_OWNER_REFS = 2048


class NodeFull(errors.APIError):
    """A change would take a node's NodeImageSet past a cap of the CRD: refused alone."""

    def __init__(self, message: str) -> None:
        super().__init__(422, "NodeImageSetFull", message)


@dataclasses.dataclass(frozen=True)
class Change:
    """What one prefetch wants on one node: ``wanted`` (entry name → its contribution) or,
    when None, none of its entries (withdraw)."""

    uid: str
    wanted: Mapping[str, specs.ImageEntry] | None

    def apply(self, images: list[specs.ImageEntry],
              known: Mapping[tuple[str, str], specs.ImageEntry]) -> list[specs.ImageEntry]:
        if self.wanted is None:
            return entries.release(images, self.uid, known=known)
        kept = entries.release(images, self.uid, keep=set(self.wanted), known=known)
        return entries.upsert(kept, self.wanted.values(), known)


@dataclasses.dataclass
class _Pending:
    change: Change
    waiters: list[asyncio.Future[None]]


class NodeWriter:
    """Coalesces the entry changes of every prefetch into one spec write per node.

    Args:
        client: the API client.
        cached: node name → the NodeImageSet body the index holds (or None).
        remember: stores a body a write returned into the index.
        forget: drops a node's body from the index (the object is gone).
        known: every prefetch's contributions known in this process, for owner merging.
        debounce: seconds a node's first pending change waits for others to join it.
        concurrency: nodes written at once.
        node_uid: node name → its Node's uid ("" if unknown): every NodeImageSet gets an
            ownerReference to its Node, so the garbage collector removes it with the Node.
        node_exists: whether the node is still known when its write is flushed: no
            NodeImageSet is created for a Node deleted since the change was queued (a
            dispatch to thousands of nodes takes minutes; one created then would have no
            owner left to be collected with, and would stay for good).
    """

    def __init__(self, client: kubeapi.Client, cached: Callable[[str], JSON | None],
                 remember: Callable[[JSON], None], forget: Callable[[str], None],
                 known: Mapping[tuple[str, str], specs.ImageEntry], *,
                 debounce: float = DEBOUNCE, concurrency: int = CONCURRENCY,
                 attempts: int = ATTEMPTS,
                 node_uid: Callable[[str], str] = lambda node: "",
                 node_exists: Callable[[str], bool] = lambda node: True) -> None:
        self.client = client
        self.cached = cached
        self.remember = remember
        self.forget = forget
        self.known = known
        self.debounce = debounce
        self.concurrency = concurrency
        self.attempts = attempts
        self.node_uid = node_uid
        self.node_exists = node_exists
        self.writes = 0  # spec writes sent (creates and patches)
        #: (uid, node) → why that prefetch's last change there was refused (a cap).
        self.refused: dict[tuple[str, str], str] = {}
        #: prefetches being deleted: a put still in flight from a reconcile that started
        #: before the delete becomes a withdrawal, so nothing re-adds their entries.
        self.retired: set[str] = set()
        #: (uid, node) → the NodeImageSet generation our last write of uid's entries there
        #: produced: the agent's status describes them only once its observedGeneration
        #: reaches it (see :func:`.dispatching.report`).
        self.generations: dict[tuple[str, str], int] = {}
        self._pending: dict[str, dict[str, _Pending]] = {}
        self._scheduled: set[str] = set()  # due soon, queued, or being written
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------------------ API

    def submit(self, node: str, change: Change) -> asyncio.Future[None]:
        """Queue ``change`` for ``node``; the future is done when a write carrying it (or a
        later change of the same prefetch) succeeded, or failed for good."""
        loop = asyncio.get_running_loop()
        self._start(loop)
        if change.uid in self.retired and change.wanted is not None:
            change = Change(change.uid, None)
        future: asyncio.Future[None] = loop.create_future()
        per_node = self._pending.setdefault(node, {})
        older = per_node.get(change.uid)
        waiters = (older.waiters if older is not None else []) + [future]
        per_node[change.uid] = _Pending(change, waiters)  # the latest change supersedes
        if node not in self._scheduled:
            self._scheduled.add(node)
            loop.call_later(self.debounce, self._queue.put_nowait, node)
        return future

    async def write(self, changes: Mapping[str, Change], logger: Any = None) -> list[str]:
        """Submit one change per node and wait for all of them; the nodes whose write
        failed (after the writer's own retries) are returned, sorted."""
        futures = {node: self.submit(node, change) for node, change in changes.items()}
        failed: dict[str, errors.APIError] = {}
        for node, future in futures.items():
            try:
                await future
            except errors.APIError as e:
                failed[node] = e
        if failed and logger is not None:  # one line (and Event), not one per node
            first = min(failed)
            logger.warning(f"NodeImageSet writes failed on {len(failed)} node(s), e.g."
                           f" {first}: {failed[first]}; retrying later")
        return sorted(failed)

    def _owner(self, node: str) -> list[JSON]:
        uid = self.node_uid(node)
        return node_owner(node, uid) if uid else []

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()

    # ------------------------------------------------------------------------------ work

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if not self._workers:
            self._workers = [loop.create_task(self._work(), name=f"node-writer-{i}")
                             for i in range(self.concurrency)]

    async def _work(self) -> None:
        while True:
            node = await self._queue.get()
            batch = self._pending.pop(node, {})
            try:
                await self._flush(node, batch)
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # pragma: no cover - a bug; never strand waiters
                logger.exception(f"NodeImageSet {node}: unexpected error")
                _settle(batch, e if isinstance(e, Exception) else RuntimeError(str(e)))
            finally:
                self._scheduled.discard(node)
                if self._pending.get(node):  # changes that came while writing: next round
                    self._scheduled.add(node)
                    asyncio.get_running_loop().call_later(self.debounce,
                                                          self._queue.put_nowait, node)

    async def _flush(self, node: str, batch: Mapping[str, _Pending]) -> None:
        if not batch:
            return
        error: errors.APIError | None = None
        attempt = conflicts = 0
        while attempt < self.attempts:
            try:
                await self._write_once(node, [p.change for p in batch.values()])
            except errors.Conflict as e:  # read again and fold into that, at once
                error = e
                conflicts += 1
                if conflicts > CONFLICTS or not await self._reread(node):
                    attempt += 1
                continue
            except errors.APIError as e:
                error = e
                attempt += 1
                if attempt < self.attempts:
                    await asyncio.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))
                continue
            _settle(batch, None)
            return
        assert error is not None
        _settle(batch, error)

    async def _reread(self, node: str) -> bool:
        """Read the node's object into the index after a conflict; False if that failed.
        (A list by name: the operator's RBAC has list and watch on NodeImageSets, no get.)"""
        try:
            found = await self.client.list(kubeapi.node_set_path(),
                                           fieldSelector=f"metadata.name={node}")
        except errors.APIError:
            return False
        fresh = found[0] if found else None
        if fresh is None:
            self.forget(node)
        else:
            self.remember(fresh)
        return True

    async def _write_once(self, node: str, changes: list[Change]) -> None:
        body = self.cached(node)
        before = list(((body or {}).get("spec") or {}).get("images") or [])
        images = before
        # A prefetch deleted since its change was queued: withdraw it instead.
        changes = [Change(c.uid, None) if c.uid in self.retired else c for c in changes]
        for change in changes:
            applied = change.apply(images, self.known)
            problem = _over_cap(images, applied)
            if problem:  # this change alone is refused; the others are written
                self.refused[(change.uid, node)] = problem
                continue
            self.refused.pop((change.uid, node), None)
            images = applied
        if images == before and body is not None:
            return
        if body is None:
            if not images or not self.node_exists(node):
                return  # nothing to write, or the Node is gone: nothing to create
            new: JSON = {
                "apiVersion": resources.API_VERSION, "kind": resources.NODE_SET_KIND,
                "metadata": {"name": node,
                             "labels": {resources.LABEL_MANAGED_BY: resources.MANAGED_BY}},
                "spec": {"images": images},
            }
            if owner := self._owner(node):
                new["metadata"]["ownerReferences"] = owner
            self.writes += 1
            # AlreadyExists (409): the index has not seen it yet; the retry uses the watch.
            written = await self.client.create(kubeapi.node_set_path(), new)
        else:
            self.writes += 1
            version = str((body.get("metadata") or {}).get("resourceVersion") or "")
            patch: JSON = {"spec": {"images": images}}
            if version:
                patch["metadata"] = {"resourceVersion": version}
            if not (body.get("metadata") or {}).get("ownerReferences") and (
                    owner := self._owner(node)):  # made before owners were set
                patch.setdefault("metadata", {})["ownerReferences"] = owner
            try:
                written = await self.client.merge_patch(kubeapi.node_set_path(node), patch)
            except errors.NotFound:
                self.forget(node)  # deleted behind our back: created on the next attempt
                raise
        self.remember(written)
        generation = int((written.get("metadata") or {}).get("generation") or 0)
        for change in changes:
            if entries.owned(before, change.uid) != entries.owned(images, change.uid):
                if change.wanted is None:
                    self.generations.pop((change.uid, node), None)
                else:
                    self.generations[(change.uid, node)] = generation


def _over_cap(before: list[specs.ImageEntry], after: list[specs.ImageEntry]) -> str:
    """Why ``after`` cannot be written where ``before`` could ("" when it can): a cap of
    the CRD it reaches that ``before`` did not exceed already."""
    if len(after) > max(len(before), MAX_ENTRIES):
        return f"the node already has {len(before)} image entries (at most {MAX_ENTRIES})"
    refs, refs_before = (sum(len(e["owners"]) for e in images) for images in (after, before))
    if refs > max(MAX_OWNER_REFS, refs_before):
        return (f"the node's image entries already have {refs_before} owner references in all (at"
                f" most {MAX_OWNER_REFS}: one per ImagePrefetch per image)")
    old = {e["name"]: e for e in before}
    for entry in after:
        was = old.get(entry["name"])
        if len(entry["owners"]) > max(MAX_OWNERS, len(was["owners"]) if was else 0):
            return (f"{entry['image']} already has {len(entry['owners']) - 1} ImagePrefetches"
                    f" owning it on the node (at most {MAX_OWNERS})")
        secrets = entry.get("pullSecrets") or []
        had = (was.get("pullSecrets") or []) if was is not None else []
        if len(secrets) > max(MAX_SECRETS, len(had)):
            return (f"{entry['image']} would need {len(secrets)} pull secrets on the node"
                    f" (at most {MAX_SECRETS})")
    return ""


def node_owner(node: str, uid: str) -> list[JSON]:
    """The ownerReferences of a node's NodeImageSet: its Node (not a controller)."""
    return [{"apiVersion": "v1", "kind": "Node", "name": node, "uid": uid,
             "controller": False, "blockOwnerDeletion": False}]


def _settle(batch: Mapping[str, _Pending], error: Exception | None) -> None:
    for pending in batch.values():
        for future in pending.waiters:
            if future.done():
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)
