"""Which nodes an ImagePrefetch selects."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agent.operator import prefetches


@dataclasses.dataclass(frozen=True)
class Node:
    """What the operator needs to know of a Node."""

    name: str
    labels: Mapping[str, str]
    ready: bool
    unschedulable: bool
    taints: tuple[Mapping[str, str], ...] = ()
    uid: str = ""

    @classmethod
    def from_body(cls, body: Mapping[str, Any]) -> Node:
        meta = body.get("metadata") or {}
        conditions = (body.get("status") or {}).get("conditions") or []
        ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
        return cls(
            name=str(meta.get("name", "")),
            labels=dict(meta.get("labels") or {}),
            ready=ready,
            unschedulable=bool((body.get("spec") or {}).get("unschedulable", False)),
            taints=tuple({str(k): str(v) for k, v in t.items()}
                         for t in (body.get("spec") or {}).get("taints") or []
                         if isinstance(t, Mapping)),
            uid=str(meta.get("uid", "")),
        )


def matches_labels(prefetch: prefetches.Prefetch, labels: Mapping[str, str]) -> bool:
    """Whether ``labels`` satisfy the prefetch's nodeSelector (LabelSelector semantics)."""
    for key, value in prefetch.match_labels.items():
        if labels.get(key) != value:
            return False
    for req in prefetch.match_expressions:
        present = req.key in labels
        if req.operator == "In" and (not present or labels[req.key] not in req.values):
            return False
        if req.operator == "NotIn" and present and labels[req.key] in req.values:
            return False
        if req.operator == "Exists" and not present:
            return False
        if req.operator == "DoesNotExist" and present:
            return False
    return True


def matches(prefetch: prefetches.Prefetch, node: Node) -> bool:
    """Whether ``node`` is one the prefetch is about (nodeNames and nodeSelector only)."""
    if prefetch.node_names is not None and node.name not in prefetch.node_names:
        return False
    return matches_labels(prefetch, node.labels)


def eligible(prefetch: prefetches.Prefetch, node: Node) -> bool:
    """Whether the prefetch may dispatch to ``node`` now (selector, names, readiness,
    cordon)."""
    if not matches(prefetch, node):
        return False
    if not node.ready and not prefetch.include_not_ready:
        return False
    if node.unschedulable and not prefetch.include_unschedulable:
        return False
    return True


def select(prefetch: prefetches.Prefetch, all_nodes: Iterable[Node],
           dispatched: Iterable[str] = (),
           runnable: Callable[[Node], bool] = lambda node: True) -> list[str]:
    """Names of the nodes the prefetch targets, sorted: the eligible ones, and those it was
    dispatched to that still match (readiness and cordons gate only new dispatches: a
    cordoned or briefly NotReady node keeps its entries, hence its images); only nodes
    the agent can run on (``runnable``)."""
    sent = set(dispatched)
    return sorted(node.name for node in all_nodes
                  if (eligible(prefetch, node) or (node.name in sent and matches(prefetch, node)))
                  and runnable(node))
