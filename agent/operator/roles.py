"""The agents' access to pull-secret copies: a Role whose ``resourceNames`` are the copies.

RBAC cannot say "Secrets with this label", and a Role the chart rendered would be reset by
every ``helm upgrade`` (and show as drift in GitOps) if the operator edited its rules. So the
operator owns this one Role (``operator.agent_secrets_role``; the chart renders only the
RoleBinding to it): one rule, ``get`` on ``secrets`` named after the copies that exist, and no
rule at all while there is none (an empty ``resourceNames`` would mean every Secret). It
carries an ownerReference to the chart's ConfigMap (``operator.agent_daemonset_owner``), so
``helm uninstall`` takes it along.

:meth:`PullSecretReaders.grant` is called with the copies a reconcile made, before they are
dispatched to nodes; it writes only when a name is new. :meth:`PullSecretReaders.verify`
(one GET, from the DaemonSet keeper's loop) puts the Role back when it was deleted or edited.
Copies deleted since are dropped from the Role at its next write.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from agent.kube import resources
from agent.operator import daemonsets, errors, kubeapi

logger = logging.getLogger("agent.operator")

JSON = dict[str, Any]


def role_path(namespace: str, name: str = "") -> str:
    base = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles"
    return f"{base}/{name}" if name else base


def rules(names: Iterable[str]) -> list[JSON]:
    """The Role's rules: ``get`` on exactly ``names`` (none at all when there is no name)."""
    wanted = sorted(set(names))
    if not wanted:
        return []
    return [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
             "resourceNames": wanted}]


def granted(role: Mapping[str, Any] | None) -> frozenset[str] | None:
    """The Secret names ``role`` grants ``get`` on, if its rules are exactly ours (else None:
    it was edited and must be rewritten)."""
    if role is None:
        return None
    found = role.get("rules") or []
    if not found:
        return frozenset()
    names = frozenset(found[0].get("resourceNames") or ())
    return names if names and found == rules(names) else None


@dataclasses.dataclass
class PullSecretReaders:
    """Keeps the agents' pull-secret Role in ``namespace`` (no-op when ``role`` is "")."""

    client: kubeapi.Client
    namespace: str
    role: str
    owner_name: str = ""
    #: The names the live Role grants, as last written or read (None = not known yet).
    names: frozenset[str] | None = None

    async def grant(self, names: Iterable[str]) -> None:
        """Make sure the agents may get the Secrets ``names`` (the copies just made)."""
        wanted = frozenset(names)
        if not self.role or (self.names is not None and wanted <= self.names):
            return
        await self.write(wanted)

    async def verify(self) -> None:
        """Put the Role back if it was deleted or edited since we wrote it."""
        if not self.role or self.names is None:
            return
        live = await self.client.get(role_path(self.namespace, self.role))
        if granted(live) != self.names:
            logger.warning(f"Role {self.namespace}/{self.role} (the agents' access to pull-"
                           "secret copies) was changed or deleted; restoring it")
            await self.write(frozenset())

    async def write(self, extra: frozenset[str]) -> None:
        """Set the Role to the copies that exist plus ``extra``."""
        copies = await self.client.list(
            kubeapi.secret_path(self.namespace),
            labelSelector=f"{resources.LABEL_COMPONENT}={resources.COMPONENT_PULL_SECRET}")
        wanted = frozenset(c["metadata"]["name"] for c in copies) | extra
        body: JSON = {
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": self.role, "namespace": self.namespace, "labels": {
                resources.LABEL_MANAGED_BY: resources.MANAGED_BY,
                resources.LABEL_COMPONENT: resources.COMPONENT_AGENT,
                resources.LABEL_NAME: resources.NAME}},
            "rules": rules(wanted),
        }
        path = role_path(self.namespace, self.role)
        for _ in range(kubeapi.CONFLICT_RETRIES):
            live = await self.client.get(path)
            try:
                if live is None:
                    owner = await self.owner()
                    if owner is not None:
                        body["metadata"]["ownerReferences"] = [owner]
                    await self.client.create(role_path(self.namespace), body)
                elif granted(live) != wanted:
                    live = dict(live)
                    live["rules"] = body["rules"]
                    await self.client.replace(path, live)
                self.names = wanted
                return
            except errors.Conflict:
                continue
        raise errors.Conflict(409, "Conflict",
                              f"Role {self.namespace}/{self.role} kept changing while written")

    async def owner(self) -> JSON | None:
        """An ownerReference to the chart's ConfigMap (helm uninstall deletes the Role)."""
        if not self.owner_name:
            return None
        cm = await self.client.get(kubeapi.configmap_path(self.namespace, self.owner_name))
        return None if cm is None else daemonsets.owner_reference(cm)
