"""Copies of users' pull secrets in the operator namespace (the only secrets agents read)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from agent.kube import resources

#: The Secret types that hold registry credentials; only these are copied for the agents.
PULL_SECRET_TYPES = frozenset({"kubernetes.io/dockerconfigjson", "kubernetes.io/dockercfg"})


def copy_name(namespace: str, name: str) -> str:
    """``ipf-<hash>-<name>``: unique per source namespace/name, at most 253 characters."""
    digest = hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:10]
    return f"ipf-{digest}-{name}"[:253].rstrip("-.")


def users(copy: Mapping[str, Any]) -> list[str]:
    """UIDs of the ImagePrefetches using a copy."""
    raw = ((copy.get("metadata") or {}).get("annotations") or {}).get(resources.ANNOTATION_USERS)
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [str(u) for u in value] if isinstance(value, list) else []


def build_copy(source: Mapping[str, Any], operator_namespace: str,
               user_uids: Iterable[str]) -> dict[str, Any]:
    """The copy of ``source`` (a Secret body) for the operator namespace."""
    meta = source.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": copy_name(meta.get("namespace", ""), meta.get("name", "")),
            "namespace": operator_namespace,
            "labels": {
                resources.LABEL_MANAGED_BY: resources.MANAGED_BY,
                resources.LABEL_COMPONENT: resources.COMPONENT_PULL_SECRET,
                resources.LABEL_NAME: resources.NAME,
            },
            "annotations": {
                resources.ANNOTATION_SOURCE: f"{meta.get('namespace', '')}/{meta.get('name', '')}",
                resources.ANNOTATION_SOURCE_VERSION: str(meta.get("resourceVersion", "")),
                resources.ANNOTATION_USERS: json.dumps(sorted(set(user_uids))),
            },
        },
        "type": source.get("type", "kubernetes.io/dockerconfigjson"),
        "data": dict(source.get("data") or {}),
    }


def up_to_date(copy: Mapping[str, Any], source: Mapping[str, Any], uid: str) -> bool:
    """Whether ``copy`` already mirrors ``source`` and lists ``uid`` as a user."""
    annotations = (copy.get("metadata") or {}).get("annotations") or {}
    version = str((source.get("metadata") or {}).get("resourceVersion", ""))
    return (
        annotations.get(resources.ANNOTATION_SOURCE_VERSION) == version
        and uid in users(copy)
        and copy.get("data") == source.get("data")
    )
