"""``coordination.k8s.io/v1`` Leases: leader election and per-node heartbeats.

Leader election follows client-go's ``leaderelection`` package: the Lease's ``spec`` holds
``holderIdentity``, ``leaseDurationSeconds``, ``acquireTime``, ``renewTime`` and
``leaseTransitions``; every write is a ``PUT`` conditional on the ``resourceVersion`` read
(409 = someone else wrote first). A candidate judges expiry by when IT last saw the record
change, on its own monotonic clock (never by comparing ``renewTime`` with its own clock), so
clock skew between replicas does not matter. Two differences, both documented where used:
a holder restarted under the same identity (a container restarted in the same pod after
``kill -9``) takes its lease back at once, and :meth:`LeaderElector.release` hands the lease
over on a clean stop (client-go's ``ReleaseOnCancel``), so a rolling update waits
``retry_period`` rather than ``lease_duration``.

Heartbeats follow the kubelet's node leases: :class:`Heartbeat` renews one Lease per node
(``renewTime``); the operator watches them (:mod:`agent.operator.heartbeats`) and judges an
agent alive by when it observed the last renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.kube import client as kube_client
from agent.kube import errors, resources

logger = logging.getLogger("agent.kube.leases")

JSON = dict[str, Any]
API_VERSION = "coordination.k8s.io/v1"
#: Label value (app.kubernetes.io/component) of the agents' heartbeat Leases.
COMPONENT_HEARTBEAT = "agent-heartbeat"
#: Prefix of a node's heartbeat Lease name (the node name follows).
HEARTBEAT_PREFIX = "prefetcher-agent-"
NAME_MAX = 253


def micro_time(when: datetime.datetime | None = None) -> str:
    """A ``MicroTime`` as the API serialises it (``renewTime``, ``acquireTime``)."""
    when = when or datetime.datetime.now(datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def heartbeat_name(node: str) -> str:
    """The name of ``node``'s heartbeat Lease (a hash replaces the tail of very long names)."""
    name = HEARTBEAT_PREFIX + node
    if len(name) <= NAME_MAX:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:10]
    return f"{name[:NAME_MAX - 11]}-{digest}"


def heartbeat_labels() -> dict[str, str]:
    return {resources.LABEL_MANAGED_BY: resources.MANAGED_BY,
            resources.LABEL_COMPONENT: COMPONENT_HEARTBEAT}


def heartbeat_selector() -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(heartbeat_labels().items()))


def heartbeat_node(lease: Mapping[str, Any]) -> str | None:
    """The node a heartbeat Lease is about (its ``prefetcher.dev/node`` annotation)."""
    meta = lease.get("metadata") or {}
    node = (meta.get("annotations") or {}).get(NODE_ANNOTATION)
    return str(node) if node else None


NODE_ANNOTATION = f"{resources.GROUP}/node"


class LeaseObject:
    """One Lease: read it, create it, write its ``spec`` conditionally."""

    def __init__(self, client: kube_client.Client, namespace: str, name: str, *,
                 labels: Mapping[str, str] | None = None,
                 annotations: Mapping[str, str] | None = None) -> None:
        self.client = client
        self.namespace = namespace
        self.name = name
        self.labels = dict(labels or {})
        self.annotations = dict(annotations or {})
        self.path = kube_client.lease_path(namespace, name)
        #: The Lease as last read or written (None: not known).
        self.body: JSON | None = None

    async def read(self) -> JSON | None:
        self.body = await self.client.get(self.path)
        return self.body

    async def create(self, spec: JSON) -> JSON:
        body: JSON = {"apiVersion": API_VERSION, "kind": "Lease",
                      "metadata": {"name": self.name, "namespace": self.namespace,
                                   "labels": self.labels, "annotations": self.annotations},
                      "spec": spec}
        self.body = await self.client.create(kube_client.lease_path(self.namespace), body)
        return self.body

    async def update(self, spec: JSON) -> JSON:
        """PUT ``spec`` onto the Lease last read: 409 Conflict if it changed since."""
        assert self.body is not None
        body = {**self.body, "spec": spec}
        try:
            self.body = await self.client.replace(self.path, body)
        except errors.APIError:
            self.body = None  # re-read before the next write
            raise
        return self.body


class LostLeadership(Exception):
    """The lease could not be renewed within the renew deadline, or another holder has it."""


class LeaderElector:
    """client-go's leader election on one Lease (see the module documentation)."""

    def __init__(self, client: kube_client.Client, namespace: str, name: str, identity: str, *,
                 lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.lease = LeaseObject(client, namespace, name)
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period
        self.clock = clock
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None

    @property
    def leader(self) -> bool:
        """Whether we hold the lease (renewed within the renew deadline)."""
        return self._renewed_at is not None and \
            self.clock() - self._renewed_at < self.renew_deadline

    def _spec(self, acquire_time: str | None, transitions: int) -> JSON:
        """Our record; ``acquire_time`` None: acquired now."""
        now = micro_time()
        return {"holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.lease_duration)),
                "acquireTime": acquire_time or now, "renewTime": now,
                "leaseTransitions": transitions}

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when we hold the lease afterwards."""
        now = self.clock()
        if self.leader and self.lease.body is not None:
            # client-go's fast path: the holder writes its renewal onto the Lease as it
            # last wrote it, without reading it first (one request, not two); a 409 means
            # it changed since, and the slow path below reads it.
            spec = self.lease.body.get("spec") or {}
            if spec.get("holderIdentity") == self.identity:
                try:
                    await self.lease.update(self._spec(
                        spec.get("acquireTime"), int(spec.get("leaseTransitions") or 0)))
                    self._renewed_at = now
                    return True
                except errors.APIError as e:
                    logger.debug(f"cannot renew the lease {self.lease.name} at once: {e}")
        body = await self.lease.read()
        if body is None:
            try:
                await self.lease.create(self._spec(None, 0))
            except (errors.Conflict, errors.APIError) as e:
                logger.debug(f"cannot create the lease {self.lease.name}: {e}")
                return False
            self._renewed_at = now
            return True
        spec = body.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        record = (holder, spec.get("renewTime"), spec.get("acquireTime"),
                  spec.get("leaseDurationSeconds"), spec.get("leaseTransitions"))
        if record != self._observed:
            self._observed, self._observed_at = record, now
        duration = float(spec.get("leaseDurationSeconds") or self.lease_duration)
        ours = holder == self.identity
        if holder and not ours and self._observed_at + duration > now:
            return False  # held by another, not expired as we observe it
        transitions = int(spec.get("leaseTransitions") or 0)
        acquire_time = spec.get("acquireTime") if ours else None
        try:
            await self.lease.update(self._spec(acquire_time,
                                               transitions if ours else transitions + 1))
        except errors.APIError as e:
            logger.debug(f"cannot write the lease {self.lease.name}: {e}")
            return False
        self._renewed_at = now
        return True

    async def acquire(self) -> None:
        """Return once we hold the lease (try every ``retry_period``, with jitter)."""
        logger.info(f"waiting to become the leader (lease {self.lease.namespace}/"
                    f"{self.lease.name}, identity {self.identity})")
        while True:
            try:
                if await self.try_acquire_or_renew():
                    logger.info(f"became the leader (lease {self.lease.namespace}/"
                                f"{self.lease.name}, identity {self.identity})")
                    return
            except errors.APIError as e:
                logger.warning(f"leader election: {e}")
            await asyncio.sleep(self.retry_period * (1 + 0.2 * random.random()))

    async def keep(self) -> None:
        """Renew every ``retry_period``; raise :class:`LostLeadership` when renewal fails
        for ``renew_deadline`` (the caller stops writing at once)."""
        while True:
            await asyncio.sleep(self.retry_period)
            # An attempt may not outlast the deadline: past it, a standby may take the lease
            # (renew_deadline < lease_duration), so we must have stopped by then.
            left = self.renew_deadline - (self.clock() - (self._renewed_at or self.clock()))
            try:
                renewed = await asyncio.wait_for(self.try_acquire_or_renew(),
                                                 timeout=max(left, 0.01))
            except (errors.APIError, TimeoutError) as e:
                logger.warning(f"cannot renew the lease {self.lease.name}: {e}")
                renewed = False
            if not renewed and not self.leader:
                holder = (self._observed or ("",))[0]
                raise LostLeadership(f"lost the lease {self.lease.namespace}/{self.lease.name}"
                                     f" (holder now: {holder or 'none'})")

    async def release(self) -> None:
        """Give the lease up (clean stop): a standby takes it at its next try.

        Also when the last renewal is older than the renew deadline (a renewal still in
        flight when the stop cancelled it): the update carries the record's resourceVersion,
        so it never overwrites another holder's, and after a conflict the record is read
        again and released only if it still names us."""
        if self._renewed_at is None or self.lease.body is None:
            return
        spec = {"holderIdentity": None, "leaseDurationSeconds": 1,
                "acquireTime": micro_time(), "renewTime": micro_time(),
                "leaseTransitions": int((self.lease.body.get("spec") or {})
                                        .get("leaseTransitions") or 0)}
        try:
            try:
                await self.lease.update(spec)
            except errors.Conflict:
                # A renewal cancelled by the stop after the server applied it: still ours?
                body = await self.lease.read()
                if body is None or (body.get("spec") or {}).get("holderIdentity") \
                        != self.identity:
                    raise
                await self.lease.update(spec)
            logger.info(f"released the lease {self.lease.namespace}/{self.lease.name}")
        except errors.APIError as e:
            logger.warning(f"cannot release the lease {self.lease.name}: {e}")
        self._renewed_at = None


class Heartbeat:
    """A node's heartbeat Lease, renewed by its agent (as the kubelet's node lease).

    Owned by the node's NodeImageSet once its uid is known (``owner_uid``), so the garbage
    collector removes the Lease with it when the node goes."""

    def __init__(self, client: kube_client.Client, namespace: str, node: str, holder: str, *,
                 duration: float, owner_uid: Callable[[], str] = lambda: "") -> None:
        self.node = node
        self.lease = LeaseObject(client, namespace, heartbeat_name(node),
                                 labels=heartbeat_labels(),
                                 annotations={NODE_ANNOTATION: node})
        self.holder = holder
        self.duration = duration
        self.owner_uid = owner_uid
        #: Renewals written (tests, metrics).
        self.renewals = 0

    def _owner(self) -> None:
        """Put the NodeImageSet's ownerReference on the Lease (to be written) when known."""
        uid = self.owner_uid()
        if not uid:
            return
        ref = {"apiVersion": resources.API_VERSION, "kind": resources.NODE_SET_KIND,
               "name": self.node, "uid": uid}
        meta = self.lease.body.setdefault("metadata", {}) if self.lease.body is not None \
            else None
        if meta is not None and meta.get("ownerReferences") != [ref]:
            meta["ownerReferences"] = [ref]

    def _spec(self) -> JSON:
        return {"holderIdentity": self.holder,
                "leaseDurationSeconds": max(1, round(self.duration)),
                "renewTime": micro_time()}

    async def renew(self) -> None:
        """Write a fresh ``renewTime`` (creating the Lease if needed); raises APIError."""
        if self.lease.body is None and await self.lease.read() is None:
            try:
                await self.lease.create(self._spec())
                self.renewals += 1
                return
            except errors.Conflict:
                await self.lease.read()  # created meanwhile (a previous agent pod)
        self._owner()
        try:
            await self.lease.update(self._spec())
        except errors.NotFound:
            await self.lease.create(self._spec())
        except errors.Conflict:
            await self.lease.read()
            self._owner()
            await self.lease.update(self._spec())
        self.renewals += 1


class ElectorThread:
    """A :class:`LeaderElector` on a thread of its own, with its own event loop and its own
    client (``make_client``, called on that thread), as client-go's elector runs in its own
    goroutine: the renewals keep their ``retry_period`` however long the caller's event
    loop is busy (a reconcile of thousands of nodes, a burst of watch events), so a leader
    does not lose its Lease because its own work delayed the renewal.

    :meth:`acquire` (from the caller's loop) starts the thread and returns once the lease
    is held; the thread then renews it. When renewal fails for ``renew_deadline``,
    ``on_lost`` is called ON THE ELECTOR'S THREAD at once, whatever the caller's loop is
    doing (the operator exits from there, as controller-runtime's ``OnStoppedLeading``
    does). :meth:`stop` stops renewing and releases the lease (a clean stop)."""

    def __init__(self, make_client: Callable[[], kube_client.Client], namespace: str,
                 name: str, identity: str, *, on_lost: Callable[[LostLeadership], None],
                 lease_duration: float = 15.0, renew_deadline: float = 10.0,
                 retry_period: float = 2.0) -> None:
        self.make_client = make_client
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timing = (lease_duration, renew_deadline, retry_period)
        self.on_lost = on_lost
        #: The elector (set on the thread once it runs; tests read its state).
        self.elector: LeaderElector | None = None
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()  # set on the elector's loop (call_soon_threadsafe)
        self._release = True
        self._thread = threading.Thread(target=self._main, name=f"lease-{name}", daemon=True)
        self._caller: asyncio.AbstractEventLoop | None = None
        self._acquired: asyncio.Future[None] | None = None

    async def acquire(self) -> None:
        """Start the thread; return once it holds the lease (cancelled: stop the thread)."""
        self._caller = asyncio.get_running_loop()
        self._acquired = self._caller.create_future()
        self._thread.start()
        try:
            await self._acquired
        except asyncio.CancelledError:
            await asyncio.to_thread(self.stop, release=False)
            raise

    def stop(self, *, release: bool = True, timeout: float = 10.0) -> None:
        """Stop renewing (and release the lease when held and ``release``); blocks until the
        thread ended (at most ``timeout`` seconds)."""
        self._release = release
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _tell_caller(self, error: BaseException | None) -> None:
        def tell() -> None:
            if self._acquired is not None and not self._acquired.done():
                if error is None:
                    self._acquired.set_result(None)
                else:
                    self._acquired.set_exception(error)
        if self._caller is not None:
            with contextlib.suppress(RuntimeError):  # the caller's loop ended
                self._caller.call_soon_threadsafe(tell)

    def _main(self) -> None:
        try:
            self._loop.run_until_complete(self._run())
        except BaseException as e:  # tell a caller still waiting, then end the thread
            logger.error(f"leader election failed: {e!r}")
            self._tell_caller(e)
        finally:
            self._loop.close()

    async def _run(self) -> None:
        client = self.make_client()
        elector = self.elector = LeaderElector(client, self.namespace, self.name,
                                               self.identity, lease_duration=self.timing[0],
                                               renew_deadline=self.timing[1],
                                               retry_period=self.timing[2])
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            acquiring = asyncio.create_task(elector.acquire())
            await asyncio.wait({acquiring, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not acquiring.done():
                acquiring.cancel()
                await asyncio.gather(acquiring, return_exceptions=True)
                return
            acquiring.result()
            self._tell_caller(None)
            keeping = asyncio.create_task(elector.keep())
            await asyncio.wait({keeping, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if keeping.done():
                error = keeping.exception()
                if not isinstance(error, LostLeadership):  # renewing broke: as good as lost
                    error = LostLeadership(f"cannot renew the lease {self.name}: {error!r}")
                self.on_lost(error)
                return
            keeping.cancel()
            await asyncio.gather(keeping, return_exceptions=True)
            if self._release:
                await elector.release()
        finally:
            stopping.cancel()
            await asyncio.gather(stopping, return_exceptions=True)
            await client.aclose()
