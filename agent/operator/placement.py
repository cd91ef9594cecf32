"""Where the agent DaemonSet can run, judged as the scheduler and the DaemonSet controller
do: the pod template's ``nodeSelector`` and required node affinity, the NoSchedule /
NoExecute taints it does not tolerate; and never on nodes no DaemonSet pod runs on
(virtual-kubelet nodes, EKS Fargate) or on another OS than Linux. A node the agent cannot
run on is not targeted: it would otherwise count as ``AgentUnavailable`` forever.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from agent.operator import nodes

#: Labels and taints of nodes no DaemonSet pod runs on, whatever it tolerates.
VIRTUAL_KUBELET_LABEL = ("type", "virtual-kubelet")
VIRTUAL_KUBELET_TAINT = "virtual-kubelet.io/provider"
FARGATE_LABEL = ("eks.amazonaws.com/compute-type", "fargate")
OS_LABEL = "kubernetes.io/os"
#: Taint effects that keep a pod off a node (PreferNoSchedule does not).
BLOCKING_EFFECTS = frozenset({"NoSchedule", "NoExecute"})


@dataclasses.dataclass(frozen=True)
class Placement:
    """The agent pod template's placement rules (empty: the built-in exclusions only)."""

    node_selector: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: required nodeSelectorTerms (OR of terms; each an AND of requirements)
    terms: tuple[tuple[Mapping[str, Any], ...], ...] = ()
    tolerations: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_daemonset(cls, body: Mapping[str, Any] | None) -> Placement:
        pod = ((((body or {}).get("spec") or {}).get("template") or {}).get("spec") or {})
        affinity = ((pod.get("affinity") or {}).get("nodeAffinity") or {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution") or {}
        terms = tuple(
            tuple([*(t.get("matchExpressions") or []),
                   *({**f, "field": True} for f in t.get("matchFields") or [])])
            for t in affinity.get("nodeSelectorTerms") or [])
        return cls(node_selector={str(k): str(v) for k, v in
                                  (pod.get("nodeSelector") or {}).items()},
                   terms=terms, tolerations=tuple(pod.get("tolerations") or ()))

    def why_not(self, node: nodes.Node) -> str:
        """Why the agent cannot run on ``node`` ("" when it can)."""
        labels = node.labels
        if labels.get(VIRTUAL_KUBELET_LABEL[0]) == VIRTUAL_KUBELET_LABEL[1] or any(
                t.get("key") == VIRTUAL_KUBELET_TAINT for t in node.taints):
            return "a virtual-kubelet node (no DaemonSet pods)"
        if labels.get(FARGATE_LABEL[0]) == FARGATE_LABEL[1]:
            return "an EKS Fargate node (no DaemonSet pods)"
        if labels.get(OS_LABEL, "linux") != "linux":
            return f"{OS_LABEL}={labels[OS_LABEL]} (the agent runs on Linux)"
        for key, value in self.node_selector.items():
            if labels.get(key) != value:
                return f"the agent DaemonSet's nodeSelector {key}={value} does not match"
        if self.terms and not any(_term_matches(term, node) for term in self.terms):
            return "the agent DaemonSet's required node affinity does not match"
        for taint in node.taints:
            if taint.get("effect") in BLOCKING_EFFECTS and not any(
                    _tolerates(t, taint) for t in self.tolerations):
                return (f"taint {taint.get('key')}={taint.get('value', '')}:"
                        f"{taint.get('effect')} is not tolerated by the agent DaemonSet")
        return ""


def _term_matches(term: Sequence[Mapping[str, Any]], node: nodes.Node) -> bool:
    for req in term:
        key = str(req.get("key", ""))
        if req.get("field"):
            value: str | None = node.name if key == "metadata.name" else None
        else:
            value = node.labels.get(key)
        values = [str(v) for v in req.get("values") or []]
        op = req.get("operator")
        if op == "In" and value not in values:
            return False
        if op == "NotIn" and value in values:
            return False
        if op == "Exists" and value is None:
            return False
        if op == "DoesNotExist" and value is not None:
            return False
        if op in ("Gt", "Lt"):
            try:
                have, bound = int(value or ""), int(values[0])
            except (ValueError, IndexError):
                return False
            if (op == "Gt" and not have > bound) or (op == "Lt" and not have < bound):
                return False
    return True


def _tolerates(toleration: Mapping[str, Any], taint: Mapping[str, Any]) -> bool:
    """Kubernetes' ToleratesTaint."""
    effect = toleration.get("effect")
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key")
    if key and key != taint.get("key"):
        return False
    if toleration.get("operator", "Equal") == "Exists":
        return not key or key == taint.get("key")
    return bool(key) and str(toleration.get("value", "")) == str(taint.get("value", ""))
