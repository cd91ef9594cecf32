"""The node agents' DaemonSet, built from the file the chart renders (operator.agent_daemonset).

The file holds a complete DaemonSet manifest (YAML or JSON). The operator stamps it with its
labels, the namespace, and ``prefetcher.dev/template-hash`` (a hash of the file's content);
a DaemonSet whose hash differs (edited by hand, or the file changed) is replaced, which makes
the DaemonSet controller roll the agents. With ``operator.agent_daemonset_owner`` it also
carries an ownerReference to the chart's ConfigMap, so ``helm uninstall`` (which deletes the
ConfigMap) lets the garbage collector delete the agents too.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from agent.kube import resources


class InvalidTemplate(ValueError):
    """The DaemonSet file cannot be used; the message names the file and the problem."""


def load(path: str | Path) -> dict[str, Any]:
    """Read and check the DaemonSet manifest file."""
    p = Path(path)
    try:
        body = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise InvalidTemplate(f"{p}: cannot read the agent DaemonSet: {e}") from e
    if not isinstance(body, dict) or body.get("kind") != "DaemonSet":
        raise InvalidTemplate(f"{p}: expected a DaemonSet manifest (kind: DaemonSet)")
    if not (body.get("metadata") or {}).get("name"):
        raise InvalidTemplate(f"{p}: metadata.name is required")
    if not ((body.get("spec") or {}).get("template") or {}).get("spec"):
        raise InvalidTemplate(f"{p}: spec.template.spec is required")
    return body


def template_hash(template: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:16]


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A non-controlling ownerReference to ``owner`` (the chart's ConfigMap): the garbage
    collector deletes the DaemonSet once the owner is gone, and never waits on it."""
    meta = owner.get("metadata") or {}
    return {"apiVersion": owner.get("apiVersion", "v1"), "kind": owner.get("kind", "ConfigMap"),
            "name": meta["name"], "uid": meta["uid"], "controller": False,
            "blockOwnerDeletion": False}


def desired(template: Mapping[str, Any], namespace: str,
            owner: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The DaemonSet to keep in ``namespace``: the template plus our labels and hash, and an
    ownerReference to ``owner`` when given."""
    body = copy.deepcopy(dict(template))
    body.setdefault("apiVersion", "apps/v1")
    meta = body.setdefault("metadata", {})
    meta["namespace"] = namespace
    for key in ("resourceVersion", "uid", "creationTimestamp", "generation"):
        meta.pop(key, None)
    meta.setdefault("labels", {}).update({
        resources.LABEL_MANAGED_BY: resources.MANAGED_BY,
        resources.LABEL_COMPONENT: resources.COMPONENT_AGENT,
    })
    meta.setdefault("annotations", {})[resources.ANNOTATION_TEMPLATE_HASH] = template_hash(template)
    meta.pop("ownerReferences", None)
    if owner is not None:
        meta["ownerReferences"] = [owner_reference(owner)]
    body.pop("status", None)
    return body


def drifted(live: Mapping[str, Any], wanted: Mapping[str, Any]) -> bool:
    """Whether the live DaemonSet differs from what we want (hash, spec, our labels)."""
    live_meta = live.get("metadata") or {}
    want_meta = wanted.get("metadata") or {}
    if (live_meta.get("annotations") or {}).get(resources.ANNOTATION_TEMPLATE_HASH) != \
            want_meta["annotations"][resources.ANNOTATION_TEMPLATE_HASH]:
        return True
    labels = live_meta.get("labels") or {}
    if any(labels.get(k) != v for k, v in want_meta.get("labels", {}).items()):
        return True
    live_owners = {o.get("uid") for o in live_meta.get("ownerReferences") or []}
    if any(o["uid"] not in live_owners for o in want_meta.get("ownerReferences") or []):
        return True
    return _subset(wanted.get("spec"), live.get("spec"))


def _subset(want: Any, have: Any) -> bool:
    """True if ``want`` is NOT contained in ``have`` (server defaults may add fields)."""
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return True
        return any(_subset(v, have.get(k)) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(have, list) or len(want) != len(have):
            return True
        return any(_subset(w, h) for w, h in zip(want, have, strict=True))
    return bool(want != have)


def ready_nodes(pods: Sequence[Mapping[str, Any]]) -> set[str]:
    """Nodes where an agent pod is Running and Ready."""
    out: set[str] = set()
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        status = pod.get("status") or {}
        ready = any(c.get("type") == "Ready" and c.get("status") == "True"
                    for c in status.get("conditions") or [])
        if node and status.get("phase") == "Running" and ready:
            out.add(node)
    return out
