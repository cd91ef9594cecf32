"""The operator's in-memory view of the cluster, shared by every handler (kopf's memo).

:class:`State` is the index the kopf event handlers keep (nodes, NodeImageSets, agent pods)
plus per-prefetch memory (resolved digests, traceparents, status throttle, events sent).

It is changed on the event loop only (every kopf handler is ``async``: kopf would run a
plain ``def`` in a thread, changing the index while a reconcile iterates it;
tests/operator/test_index_races.py checks it), and the loops that wake prefetches iterate
snapshots, so a callback that changes it cannot break them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
from collections.abc import Mapping
from typing import Any

from agent import config
from agent.kube import specs
from agent.metrics import OperatorMetrics
from agent.operator import (
    dispatching,
    event_series,
    kubeapi,
    nodes,
    roles,
    secretcache,
    throttling,
    writing,
)
from agent.operator import heartbeats as heartbeats_mod
from agent.operator.digests import Memo
from agent.operator.nodes import Node
from agent.operator.placement import Placement

JSON = dict[str, Any]


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


class Shared:
    """One object for equal dicts of the same ``name``: the NodeImageSets of a rollout carry
    the same entries (and, once done, the same statuses) on every node, and each watch
    event decodes new copies of all of them (~150 KiB per NodeImageSet of 100 entries:
    750 MiB at 5,000 nodes). Kept bodies share one dict per distinct entry instead. The
    shared dicts are never changed in place (the operator builds new entries, see
    :mod:`.entries`); equality is checked, so a differing entry is never replaced."""

    LIMIT = 100_000  # distinct names remembered (then forgotten all at once)

    def __init__(self) -> None:
        self._by_name: dict[str, Any] = {}

    def items(self, items: list[Any]) -> list[Any]:
        out = []
        for item in items:
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str):
                out.append(item)
                continue
            known = self._by_name.get(name)
            if known is not None and known == item:
                out.append(known)
                continue
            if len(self._by_name) >= self.LIMIT:
                self._by_name.clear()
            self._by_name[name] = item
            out.append(item)
        return out


def _compact(body: JSON, entries_: Shared, statuses: Shared) -> JSON:
    """``body`` (shallow copies, the original untouched) with its spec and status entries
    shared (:class:`Shared`) and without ``managedFields`` (never read)."""
    body = dict(body)
    meta = body.get("metadata")
    if isinstance(meta, dict) and "managedFields" in meta:
        body["metadata"] = {k: v for k, v in meta.items() if k != "managedFields"}
    for key, shared in (("spec", entries_), ("status", statuses)):
        part = body.get(key)
        if isinstance(part, dict) and isinstance(part.get("images"), list):
            body[key] = {**part, "images": shared.items(part["images"])}
    return body


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
    #: Seconds of the event loop each prefetch's last reconcile held (no await between).
    loop_costs: dict[str, float] = dataclasses.field(default_factory=dict)
    contributions: dict[tuple[str, str], specs.ImageEntry] = dataclasses.field(
        default_factory=dict)
    digests: dict[tuple[str, int], Memo] = dataclasses.field(default_factory=dict)
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
    #: Where the agent DaemonSet can run (from the manifest the DaemonSet keeper keeps).
    placement: Placement = dataclasses.field(default_factory=Placement)
    #: node → monotonic time its agent was first seen not live (cleared when live again).
    dead_since: dict[str, float] = dataclasses.field(default_factory=dict)
    #: The one writer of NodeImageSet specs (coalesced per node; see :mod:`.writing`).
    writer: writing.NodeWriter = dataclasses.field(init=False)
    #: The agents' Role over the pull-secret copies (see :mod:`.roles`).
    secret_readers: roles.PullSecretReaders = dataclasses.field(init=False)
    #: The agents' heartbeat Leases as this process observed them (:mod:`.heartbeats`).
    heartbeats: heartbeats_mod.Heartbeats = dataclasses.field(init=False)
    #: Pull secrets (sources and copies) as last read (:mod:`.secretcache`).
    secrets: secretcache.SecretCache = dataclasses.field(init=False)
    #: Events about prefetches, repeats patched into one Event (:mod:`.event_series`).
    recorder: event_series.EventRecorder = dataclasses.field(init=False)
    #: Equal NodeImageSet entries and statuses kept once (see :class:`Shared`).
    shared_entries: Shared = dataclasses.field(default_factory=Shared)
    shared_statuses: Shared = dataclasses.field(default_factory=Shared)

    def __post_init__(self) -> None:
        self.recorder = event_series.EventRecorder(self.client)
        self.secrets = secretcache.SecretCache(self.client,
                                               self.settings.secret_refresh_interval)
        self.heartbeats = heartbeats_mod.Heartbeats(self.settings.agent_heartbeat_timeout,
                                                    on_change=self.wake_node)
        self.writer = writing.NodeWriter(
            self.client, self.node_sets.get, self.remember_node_set, self.forget_node_set,
            self.contributions, node_uid=self.node_uid,
            node_exists=lambda name: name in self.nodes)
        self.secret_readers = roles.PullSecretReaders(
            self.client, self.namespace, self.settings.agent_secrets_role,
            self.settings.agent_daemonset_owner)

    def node_uid(self, name: str) -> str:
        node = self.nodes.get(name)
        return node.uid if node is not None else ""

    # Index maintenance (called by the kopf event handlers).

    def wake(self, uid: str | None = None) -> None:
        """Wake one prefetch's reconcile loop, or all of them."""
        if uid is not None:
            event = self.wakers.get(uid)
            if event is not None:
                event.set()
            return
        for event in list(self.wakers.values()):
            event.set()

    def wake_node(self, node: str) -> None:
        """Wake the prefetches with entries on ``node`` (its agent came or went)."""
        for uid, per_node in list(self.by_owner.items()):
            if node in per_node:
                self.wake(uid)

    def owners_of(self, body: Mapping[str, Any] | None) -> set[str]:
        images = ((body or {}).get("spec") or {}).get("images") or []
        return {o["uid"] for e in images for o in e.get("owners", []) if "uid" in o}

    def node_event(self, kind: str, body: Mapping[str, Any]) -> None:
        name = (body.get("metadata") or {}).get("name", "")
        if kind == "DELETED":
            self.nodes.pop(name, None)
            self.dead_since.pop(name, None)
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
            body = _compact(body, self.shared_entries, self.shared_statuses)
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
        live = self.heartbeats.alive_nodes()  # kept by the heartbeat watch: no node scan
        if self.agent_pods_ready:
            live |= self.heartbeats.unknown(self.agent_pods_ready)
        return live

    def agent_down_for(self, node: str, live: set[str], clock: float) -> float:
        """Seconds the node's agent has been seen not live (0 when it is live): a dead
        agent's node frees its parallelism slot after a grace period."""
        if node in live:
            self.dead_since.pop(node, None)
            return 0.0
        return clock - self.dead_since.setdefault(node, clock)

    def runnable(self, node: Node) -> bool:
        """Whether the agent DaemonSet can run on ``node`` (see :mod:`.placement`)."""
        return not self.placement.why_not(node)

    def dispatched_generation(self, uid: str, node: str) -> int:
        """The NodeImageSet generation that carries ``uid``'s entries on ``node`` as they
        are: recorded by the writer; for entries written before this process started, the
        generation when first looked at (the agent must have seen at least that)."""
        key = (uid, node)
        known = self.writer.generations.get(key)
        if known is None:
            body = self.node_sets.get(node) or {}
            known = int((body.get("metadata") or {}).get("generation") or 0)
            self.writer.generations[key] = known
        return known

    def forget(self, uid: str) -> None:
        for key in [k for k in self.writer.generations if k[0] == uid]:
            del self.writer.generations[key]
        for key in [k for k in self.writer.refused if k[0] == uid]:
            del self.writer.refused[key]
        for key in [k for k in self.contributions if k[0] == uid]:
            del self.contributions[key]
        for generation_key in [k for k in self.digests if k[0] == uid]:
            del self.digests[generation_key]
        for generation_key in [k for k in self.traceparents if k[0] == uid]:
            del self.traceparents[generation_key]
        self.statuses.pop(uid, None)
        self.events_sent.pop(uid, None)
        self.recorder.forget(uid)
        self.wakers.pop(uid, None)
        self.loop_costs.pop(uid, None)
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
