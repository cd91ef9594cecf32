"""One reconcile of one ImagePrefetch, and the operator's in-memory view of the cluster.

:class:`State` is the index the kopf event handlers keep (nodes, NodeImageSets, agent pods)
plus per-prefetch memory (resolved digests, traceparents, status throttle, events sent).
:func:`reconcile` is level-triggered: from the prefetch body and the index it decides the
writes (pure functions in :mod:`.dispatching`, :mod:`.entries`, :mod:`.status`), performs
them, and returns when it wants to run again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, cast

import kopf
from opentelemetry import trace

from agent import config, telemetry
from agent.images import errors as image_errors
from agent.images.registry import credentials
from agent.kube import resources, specs
from agent.metrics import OperatorMetrics
from agent.operator import (
    dispatching,
    entries,
    errors,
    heartbeats,
    kubeapi,
    nodes,
    prefetches,
    resolving,
    secretcache,
    secrets,
    status,
    throttling,
    traceparents,
    writing,
)

_tracer = trace.get_tracer("agent.operator")

JSON = dict[str, Any]


def utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def timestamp(when: datetime.datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def _newer(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether ``new`` is not older than ``old`` (resourceVersions compared as numbers when
    they are numbers, which etcd's are; otherwise the latest seen wins)."""
    if old is None:
        return True
    a = str((old.get("metadata") or {}).get("resourceVersion", ""))
    b = str((new.get("metadata") or {}).get("resourceVersion", ""))
    if a.isdigit() and b.isdigit():
        return int(b) >= int(a)
    return True


@dataclasses.dataclass
class State:
    """The operator's memory, shared by all handlers (kopf's memo)."""

    settings: config.OperatorSettings
    namespace: str
    client: kubeapi.Client
    registry_config_path: str = ""
    nodes: dict[str, nodes.Node] = dataclasses.field(default_factory=dict)
    node_sets: dict[str, JSON] = dataclasses.field(default_factory=dict)
    agent_pods_ready: set[str] = dataclasses.field(default_factory=set)
    wakers: dict[str, asyncio.Event] = dataclasses.field(default_factory=dict)
    contributions: dict[tuple[str, str], specs.ImageEntry] = dataclasses.field(
        default_factory=dict)
    digests: dict[tuple[str, int], dict[str, str]] = dataclasses.field(default_factory=dict)
    traceparents: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)
    statuses: dict[str, JSON] = dataclasses.field(default_factory=dict)
    events_sent: dict[str, set[str]] = dataclasses.field(default_factory=dict)
    throttle: throttling.Throttle = dataclasses.field(
        default_factory=lambda: throttling.Throttle(1.0))
    metrics: OperatorMetrics | None = None
    #: uid → node → the entries that prefetch owns there: kept from the watched bodies, so a
    #: reconcile surveys only its own nodes and entries (not every node's every entry).
    by_owner: dict[str, dict[str, dict[str, specs.ImageEntry]]] = dataclasses.field(
        default_factory=dict)
    #: node → its status.images by entry name (kept with the bodies, for the surveys).
    node_statuses: dict[str, dict[str, specs.ImageStatus]] = dataclasses.field(
        default_factory=dict)
    #: uid → (phase, node counts) of the last status computed, for the gauges.
    summaries: dict[str, tuple[str, Mapping[str, int]]] = dataclasses.field(
        default_factory=dict)
    #: The agent DaemonSet's owner ConfigMap was missing at the last check (logged once).
    owner_missing: bool = False
    #: The one writer of NodeImageSet specs (coalesced per node; see :mod:`.writing`).
    writer: writing.NodeWriter = dataclasses.field(init=False)
    #: The agents' heartbeat Leases as this process observed them (:mod:`.heartbeats`).
    heartbeats: heartbeats.Heartbeats = dataclasses.field(init=False)
    #: Pull secrets (sources and copies) as last read (:mod:`.secretcache`).
    secrets: secretcache.SecretCache = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.secrets = secretcache.SecretCache(self.client,
                                               self.settings.secret_refresh_interval)
        self.heartbeats = heartbeats.Heartbeats(self.settings.agent_heartbeat_timeout,
                                                on_change=self.wake_node)
        self.writer = writing.NodeWriter(
            self.client, self.node_sets.get, self.remember_node_set, self.forget_node_set,
            self.contributions)

    # Index maintenance (called by the kopf event handlers).

    def wake(self, uid: str | None = None) -> None:
        """Wake one prefetch's reconcile loop, or all of them."""
        for key, event in self.wakers.items():
            if uid is None or key == uid:
                event.set()

    def wake_node(self, node: str) -> None:
        """Wake the prefetches with entries on ``node`` (its agent came or went)."""
        for uid, per_node in self.by_owner.items():
            if node in per_node:
                self.wake(uid)

    def owners_of(self, body: Mapping[str, Any] | None) -> set[str]:
        images = ((body or {}).get("spec") or {}).get("images") or []
        return {o["uid"] for e in images for o in e.get("owners", []) if "uid" in o}

    def node_event(self, kind: str, body: Mapping[str, Any]) -> None:
        name = (body.get("metadata") or {}).get("name", "")
        if kind == "DELETED":
            self.nodes.pop(name, None)
        else:
            new = nodes.Node.from_body(body)
            if self.nodes.get(name) == new:
                return
            self.nodes[name] = new
        self.wake()

    def node_set_event(self, kind: str, body: Mapping[str, Any]) -> None:
        name = (body.get("metadata") or {}).get("name", "")
        old = self.node_sets.get(name)
        if kind == "DELETED":
            self._store(name, None)
        elif _newer(old, body):
            self._store(name, dict(body))
        else:
            return
        for uid in self.owners_of(old) | self.owners_of(body):
            self.wake(uid)

    def remember_node_set(self, body: JSON | None) -> None:
        if body is not None:
            name = body["metadata"]["name"]
            if _newer(self.node_sets.get(name), body):
                self._store(name, body)

    def forget_node_set(self, name: str) -> None:
        self._store(name, None)

    def _store(self, name: str, body: JSON | None) -> None:
        """Keep the body and the per-owner index of its entries."""
        old = self.node_sets.get(name)
        old_images = ((old or {}).get("spec") or {}).get("images") or []
        if body is None:
            self.node_sets.pop(name, None)
            self.node_statuses.pop(name, None)
        else:
            self.node_sets[name] = body
            self.node_statuses[name] = dispatching.statuses_by_name(body.get("status"))
        new_images = ((body or {}).get("spec") or {}).get("images") or []
        if old is not None and body is not None and new_images == old_images:
            return
        for uid in self.owners_of(old):
            per_node = self.by_owner.get(uid)
            if per_node is not None:
                per_node.pop(name, None)
                if not per_node:
                    del self.by_owner[uid]
        owned: dict[str, dict[str, specs.ImageEntry]] = {}
        for entry in new_images:
            for owner in entry.get("owners") or []:
                if "uid" in owner:
                    owned.setdefault(owner["uid"], {})[entry["name"]] = entry
        for uid, ours in owned.items():
            self.by_owner.setdefault(uid, {})[name] = ours

    def live_agents(self, now: datetime.datetime) -> set[str]:
        """Nodes with a live agent: a heartbeat Lease renewal observed within
        ``agent_heartbeat_timeout`` (:meth:`.heartbeats.Heartbeats.alive`), or a Ready agent
        pod that has not renewed a heartbeat yet. ``now`` is unused (liveness is judged on
        this process's monotonic clock)."""
        live = self.heartbeats.alive_nodes()
        live |= {n for n in self.agent_pods_ready if not self.heartbeats.known(n)}
        return live

    def forget(self, uid: str) -> None:
        for key in [k for k in self.contributions if k[0] == uid]:
            del self.contributions[key]
        for generation_key in [k for k in self.digests if k[0] == uid]:
            del self.digests[generation_key]
        for generation_key in [k for k in self.traceparents if k[0] == uid]:
            del self.traceparents[generation_key]
        self.statuses.pop(uid, None)
        self.events_sent.pop(uid, None)
        self.wakers.pop(uid, None)
        self.throttle.forget(uid)
        self.summaries.pop(uid, None)
        self.update_gauges()

    def summarise(self, uid: str, new: Mapping[str, Any]) -> None:
        """Remember a prefetch's phase and node counts, and refresh the gauges."""
        counts = {k: int(v) for k, v in (new.get("nodes") or {}).items() if k != "desired"}
        summary = (str(new.get("phase") or "Pending"), counts)
        if self.summaries.get(uid) != summary:
            self.summaries[uid] = summary
            self.update_gauges()

    def update_gauges(self) -> None:
        if self.metrics is None:
            return
        phases: dict[str, int] = {}
        states: dict[str, int] = {}
        for phase, counts in self.summaries.values():
            phases[phase] = phases.get(phase, 0) + 1
            for key, n in counts.items():
                states[key] = states.get(key, 0) + n
        self.metrics.set_prefetches(phases)
        self.metrics.set_nodes(states)


# ------------------------------------------------------------------------------ secrets


async def ensure_secret_copies(state: State, prefetch: prefetches.Prefetch,
                               logger: logging.Logger | Any) -> tuple[list[str], JSON]:
    """Copy the prefetch's pull secrets into the operator namespace; return the copies'
    names and the decoded sources (for resolving digests with the same credentials)."""
    names: list[str] = []
    sources: JSON = {}
    for index, name in enumerate(prefetch.pull_secrets):
        source = await state.secrets.get(kubeapi.secret_path(prefetch.namespace, name))
        if source is None:
            logger.warning(f"pull secret {prefetch.namespace}/{name} does not exist; skipped")
            continue
        kind = str(source.get("type") or "Opaque")
        if kind not in secrets.PULL_SECRET_TYPES:
            raise errors.InvalidSpec(
                f"spec.imagePullSecrets[{index}]",
                f"secret {prefetch.namespace}/{name} has type {kind}, not one of"
                f" {', '.join(sorted(secrets.PULL_SECRET_TYPES))}; not copied")
        sources[name] = source
        copy_name = secrets.copy_name(prefetch.namespace, name)
        path = kubeapi.secret_path(state.namespace, copy_name)
        for _ in range(kubeapi.CONFLICT_RETRIES):
            existing = await state.secrets.get(path)
            if existing is not None and secrets.up_to_date(existing, source, prefetch.uid):
                break
            users = (secrets.users(existing) if existing else []) + [prefetch.uid]
            body = secrets.build_copy(source, state.namespace, users)
            try:
                if existing is None:
                    written = await state.client.create(kubeapi.secret_path(state.namespace),
                                                        body)
                else:
                    body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
                    written = await state.client.replace(path, body)
                state.secrets.wrote(path, written)
                break
            except (errors.Conflict, errors.NotFound):  # changed or deleted meanwhile
                state.secrets.forget(path)
                continue
        names.append(copy_name)
    return names, sources


async def release_secret_copies(state: State, uid: str, keep: set[str] | None = None) -> None:
    """Remove ``uid`` from the users of every copy not in ``keep``; delete unused copies.

    Every write carries the resourceVersion read (a delete, as a precondition); on a conflict
    (another prefetch sharing the copy released or took it meanwhile) the copy is read again
    and the release retried, a bounded number of times; then :class:`errors.Conflict` is
    raised (on delete no later reconcile would release it: the copy, credentials included,
    would leak)."""
    copies = await state.client.list(
        kubeapi.secret_path(state.namespace),
        labelSelector=f"{resources.LABEL_COMPONENT}={resources.COMPONENT_PULL_SECRET}",
    )
    for listed in copies:
        name = listed["metadata"]["name"]
        if keep is not None and name in keep:
            continue
        path = kubeapi.secret_path(state.namespace, name)
        copy: JSON | None = listed
        for attempt in range(kubeapi.CONFLICT_RETRIES + 1):
            if attempt:
                copy = await state.client.get(path)
            if copy is None:
                break
            users = secrets.users(copy)
            if uid not in users:
                break
            remaining = [u for u in users if u != uid]
            version = str(copy["metadata"].get("resourceVersion", ""))
            try:
                if not remaining:
                    await state.client.delete(path, resource_version=version)
                    state.secrets.wrote(path, None)
                else:
                    state.secrets.wrote(path, await state.client.merge_patch(path, {"metadata": {
                        "resourceVersion": version,
                        "annotations": {resources.ANNOTATION_USERS:
                                        json.dumps(sorted(remaining))}}}))
                break
            except errors.Conflict:
                state.secrets.forget(path)
                if attempt == kubeapi.CONFLICT_RETRIES:
                    raise
                await asyncio.sleep(0.05 * (attempt + 1))


# ------------------------------------------------------------------------------ digests


async def resolved_digests(state: State, prefetch: prefetches.Prefetch, previous: Mapping[str, Any],
                           sources: Mapping[str, Any]) -> dict[str, str]:
    """Digests per normalised reference: resolved once per generation (and per operator
    process under pullPolicy Always); under IfNotPresent, digests already in the status of
    this generation are reused after a restart."""
    key = (prefetch.uid, prefetch.generation)
    if key in state.digests:
        return state.digests[key]
    known: dict[str, str] = {}
    if prefetch.pull_policy == "IfNotPresent":
        for img in previous.get("images") or []:
            if img.get("digest") and img.get("resolved"):
                known[img["resolved"].split("@")[0]] = img["digest"]
    refs = [ref for _, ref in prefetch.images]
    missing = [r for r in refs if str(r) not in known]
    if missing and state.settings.resolve_digests:
        keychains = []
        for name, source in sources.items():
            try:
                keychains.append(credentials.Keychain.from_dockerconfigjson_secret(
                    source, f"secret {prefetch.namespace}/{name}"))
            except image_errors.ImageError:
                continue
        keychain = credentials.Keychain.merged(*keychains) if keychains else None
        known.update(await resolving.resolve(
            missing, keychain or credentials.Keychain.empty(),
            state.settings.resolve_timeout, state.registry_config_path))
    for ref in refs:
        if ref.digest is not None:
            known[str(ref)] = str(ref.digest)
    state.digests[key] = {str(r): known.get(str(r), "") for r in refs}
    return state.digests[key]


# ------------------------------------------------------------------------------ reconcile


async def reconcile(state: State, body: Mapping[str, Any], logger: Any) -> float | None:
    """Bring one ImagePrefetch's NodeImageSet entries and status up to date.

    Returns the seconds after which it wants to run again (a throttled status write or a
    TTL), or None to wait for events / the resync interval.
    """
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid", ""))
    if meta.get("deletionTimestamp") or uid in state.writer.retired:
        return None  # being deleted: the delete handler withdraws; dispatch nothing more
    generation = int(meta.get("generation") or 0)
    now = utcnow()
    now_text = timestamp(now)
    previous: JSON = dict(state.statuses.get(uid) or body.get("status") or {})
    if previous.get("observedGeneration") not in (None, generation):
        previous.pop("completionTime", None)  # a changed spec runs again
    sent = state.events_sent.setdefault(uid, set())

    try:
        prefetch = prefetches.parse(body)
        copies, sources = await ensure_secret_copies(state, prefetch, logger)
    except errors.InvalidSpec as e:
        new = status.invalid(generation, str(e), previous, now_text)
        if f"invalid/{generation}" not in sent:
            sent.add(f"invalid/{generation}")
            kopf.warn(cast(kopf.Body, body), reason="InvalidSpec", message=str(e))
        state.summarise(uid, new)
        await write_status(state, body, previous, dict(new), now, urgent=True)
        return None

    if f"secrets/{generation}" not in sent:
        await release_secret_copies(state, uid, keep=set(copies))
        sent.add(f"secrets/{generation}")
    digests = await resolved_digests(state, prefetch, previous, sources)
    traceparent = state.traceparents.get((uid, generation))
    if traceparent is None:
        # The trace of this prefetch generation: a root reconcile span and its first
        # dispatch span, whose context every NodeImageSet entry carries, so each node's
        # pull span is a child of it (one trace from kubectl apply to the last layer).
        attributes: dict[str, str | int] = {
            "prefetch.namespace": prefetch.namespace,
            "prefetch.name": prefetch.name,
            "prefetch.generation": generation,
            "prefetch.images": len(prefetch.images),
        }
        with _tracer.start_as_current_span("agent.operator.reconcile", attributes=attributes):
            with _tracer.start_as_current_span("agent.operator.dispatch"):
                traceparent = traceparents.current()
        state.traceparents[(uid, generation)] = traceparent

    desired: dict[str, specs.ImageEntry] = {}
    resolved: list[status.ResolvedImage] = []
    for text, ref in prefetch.images:
        digest = digests.get(str(ref), "")
        mine = entries.contribution(prefetch, ref, digest, copies, traceparent)
        desired[mine["name"]] = mine
        sent_ref = f"{ref.name}@{digest}" if digest else str(ref)
        resolved.append(status.ResolvedImage(text, mine["name"], sent_ref, digest))
    for key in [k for k in state.contributions if k[0] == uid and k[1] not in desired]:
        del state.contributions[key]
    for name, mine in desired.items():
        state.contributions[(uid, name)] = mine

    live = state.live_agents(now)

    def survey() -> tuple[dict[str, dict[str, specs.ImageEntry]],
                          dict[str, dispatching.NodeReport]]:
        dispatched = dict(state.by_owner.get(uid) or {})
        reports = {
            node: dispatching.report(node, ours, state.node_sets[node].get("status"),
                                     node in live, state.node_statuses.get(node))
            for node, ours in dispatched.items()
        }
        return dispatched, reports

    dispatched, reports = survey()
    targets = nodes.select(prefetch, state.nodes.values(), dispatched)
    frozen = prefetch.completion_policy == "Always" and bool(previous.get("completionTime"))
    if frozen:
        targets = [t for t in targets if t in dispatched]
    plan = dispatching.plan(targets, dispatched, desired, reports, prefetch.parallelism, frozen)

    put_ours = writing.Change(uid, desired)
    drop_ours = writing.Change(uid, None)
    writes: dict[str, writing.Change] = {}
    for node in (*plan.dispatch, *plan.refresh):
        writes[node] = put_ours
    for node in plan.withdraw:
        writes[node] = drop_ours
    retry_soon = False
    if writes:
        with telemetry.remote_parent(traceparent), _tracer.start_as_current_span(
            "agent.operator.write_nodes",
            attributes={"nodes.dispatched": len(plan.dispatch), "nodes.refreshed":
                        len(plan.refresh), "nodes.withdrawn": len(plan.withdraw)},
        ):
            failed = await state.writer.write(writes, logger)
        retry_soon = bool(failed)
        if state.metrics is not None:
            done = len(set(plan.dispatch) - set(failed))
            state.metrics.dispatches.inc(done * len(desired))
        dispatched, reports = survey()
    if plan.dispatch:
        logger.info(f"dispatched to {len(plan.dispatch)} node(s): {', '.join(plan.dispatch[:10])}")
    if plan.withdraw:
        logger.info(f"withdrew from {len(plan.withdraw)} node(s) that stopped matching")

    new = status.aggregate(
        generation=generation, completion_policy=prefetch.completion_policy,
        desired_nodes=targets, dispatched=dispatched, reports=reports, images=resolved,
        previous=previous, now=now_text,
    )
    state.summarise(uid, new)
    emit_events(body, previous, dict(new), sent)
    urgent = status.conditions_changed(previous, dict(new))
    wait = await write_status(state, body, previous, dict(new), now, urgent=urgent)

    if retry_soon:
        wait = 1.0 if wait is None else min(wait, 1.0)
    ttl = prefetch.ttl_seconds_after_finished
    finished_at = parse_time(new.get("completionTime"))
    if ttl is not None and finished_at is not None:
        remaining = (finished_at + datetime.timedelta(seconds=ttl) - now).total_seconds()
        if remaining <= 0:
            logger.info(f"finished {ttl}s ago (ttlSecondsAfterFinished); deleting")
            await state.client.delete(kubeapi.prefetch_path(prefetch.namespace, prefetch.name))
            return None
        wait = remaining if wait is None else min(wait, remaining)
    return wait


def emit_events(body: Mapping[str, Any], old: Mapping[str, Any], new: Mapping[str, Any],
                sent: set[str]) -> None:
    """Kubernetes Events for starts, node failures, stalls and completion (each once)."""
    target = cast(kopf.Body, body)  # a kopf.Body in practice; events need only its ref
    if new.get("startTime") and not old.get("startTime") and "started" not in sent:
        sent.add("started")
        kopf.event(target, type="Normal", reason="Started",
                  message=f"dispatching to {new['nodes']['desired']} node(s)")
    for failure in new.get("failures") or []:
        key = f"failed/{failure['node']}/{failure['image']}/{failure['reason']}"
        if key not in sent:
            sent.add(key)
            kopf.warn(target, reason="PullFailed" if failure["reason"] != "PullStalled"
                      else "PullStalled",
                      message=f"{failure['image']} on {failure['node']}: {failure['reason']}:"
                              f" {failure['message']}")
    stalled = int(new.get("stalledCancellations") or 0)
    if stalled > int(old.get("stalledCancellations") or 0):
        kopf.warn(target, reason="PullStalled",
                  message=f"{stalled} pull(s) cancelled for lack of progress so far")
    if new.get("completionTime") and not old.get("completionTime") \
            and f"done/{new.get('observedGeneration')}" not in sent:
        sent.add(f"done/{new.get('observedGeneration')}")
        if new.get("phase") == "Failed":
            kopf.warn(target, reason="Failed",
                      message=f"finished: {new['nodes']['failed']} node(s) failed")
        else:
            kopf.event(target, type="Normal", reason="Completed",
                      message=f"every image is ready on {new['nodes']['ready']} node(s)")


async def write_status(state: State, body: Mapping[str, Any], previous: Mapping[str, Any],
                       new: JSON, now: datetime.datetime, *, urgent: bool) -> float | None:
    """Write ``new`` unless nothing changed; throttled unless ``urgent``.

    Returns the seconds to wait before a throttled write may go, or None.
    """
    meta = body.get("metadata") or {}
    uid = str(meta.get("uid", ""))
    if not status.differs(previous, new):
        return None
    clock = time.monotonic()
    delay = state.throttle.delay(uid, clock, urgent=urgent)
    if delay > 0:
        return delay
    patch: JSON = dict(new)
    # Null what the server holds (``body.status``, which may be older or newer than
    # ``previous``) and what we last wrote, but not in ``new``: a merge patch leaves
    # absent keys as they are (a stale completionTime would survive a spec change).
    server = body.get("status") or {}
    for key in {*previous, *server, "completionTime"}:
        if key not in new and key != "kopf":
            patch[key] = None
    try:
        await state.client.merge_patch(
            kubeapi.prefetch_path(meta["namespace"], meta["name"], "status"), {"status": patch})
    except errors.NotFound:
        return None
    state.throttle.written(uid, clock)
    state.statuses[uid] = new
    return None


async def withdraw_everywhere(state: State, uid: str) -> None:
    """Remove ``uid`` from every NodeImageSet and every secret copy (on delete)."""
    state.writer.retired.add(uid)  # from now on, any put of this prefetch is a withdrawal
    # The index may lag; read every NodeImageSet that may hold our entries, fresh (page by
    # page: all of them at once is ~100 MiB of JSON at 5,000 nodes).
    async for page in state.client.pages(kubeapi.node_set_path()):
        for body in page:
            state.remember_node_set(body)
    nodes_with_ours = sorted(state.by_owner.get(uid) or {})
    drop = writing.Change(uid, None)
    failed = await state.writer.write({node: drop for node in nodes_with_ours})
    if failed:
        raise errors.Conflict(409, "Conflict", f"could not withdraw from {', '.join(failed)}")
    await release_secret_copies(state, uid)
    state.forget(uid)
