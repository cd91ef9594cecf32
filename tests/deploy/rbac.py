"""An RBAC authorizer over rendered Roles/ClusterRoles and their bindings, as the API server
decides: a request is allowed if any rule bound to the subject matches its verb, API group,
resource (``resource/subresource``), name (``resourceNames``) and namespace."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

JSON = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Request:
    verb: str
    group: str
    resource: str
    subresource: str = ""
    namespace: str = ""
    name: str = ""
    field_selector: str = ""

    @property
    def full_resource(self) -> str:
        return f"{self.resource}/{self.subresource}" if self.subresource else self.resource

    def __str__(self) -> str:
        where = f" in {self.namespace}" if self.namespace else ""
        name = f" {self.name}" if self.name else ""
        return f"{self.verb} {self.group or 'core'}/{self.full_resource}{name}{where}"


@dataclasses.dataclass(frozen=True)
class Grant:
    """One rule as bound: a namespace (RoleBinding) or "" (ClusterRoleBinding)."""

    role: str
    index: int
    rule: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...], tuple[str, ...]]
    namespace: str

    def allows(self, req: Request) -> bool:
        groups, resources, verbs, names = self.rule
        if self.namespace and req.namespace != self.namespace:
            return False
        if "*" not in verbs and req.verb not in verbs:
            return False
        if "*" not in groups and req.group not in groups:
            return False
        if "*" not in resources and req.full_resource not in resources:
            return False
        if names:
            # RBAC matches resourceNames on the request's name; list/watch carry it only as
            # a metadata.name field selector, and create never has one.
            name = req.name
            if not name and req.verb in ("list", "watch") and \
                    req.field_selector.startswith("metadata.name="):
                name = req.field_selector.split("=", 1)[1]
            if name not in names:
                return False
        return True

    def __str__(self) -> str:
        groups, resources, verbs, names = self.rule
        scope = f"Role in {self.namespace}" if self.namespace else "cluster-wide"
        named = f" names={list(names)}" if names else ""
        return f"{self.role}#{self.index} ({scope}): {list(verbs)} {list(groups)}/" \
               f"{list(resources)}{named}"


def grants(objects: Iterable[JSON], namespace: str, service_account: str) -> list[Grant]:
    """Every rule bound to ``system:serviceaccount:<namespace>:<service_account>``."""
    objs = list(objects)
    roles = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o
             for o in objs if o["kind"] in ("Role", "ClusterRole")}
    out: list[Grant] = []
    for binding in objs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(s.get("kind") == "ServiceAccount" and s.get("name") == service_account
                   and s.get("namespace") == namespace for s in binding.get("subjects") or []):
            continue
        ref = binding["roleRef"]
        bound_ns = binding["metadata"].get("namespace", "") \
            if binding["kind"] == "RoleBinding" else ""
        role_ns = bound_ns if ref["kind"] == "Role" else ""
        role = roles.get((ref["kind"], role_ns, ref["name"]))
        assert role is not None, f"{binding['kind']} {binding['metadata']['name']}: no {ref}"
        for i, rule in enumerate(role.get("rules") or []):
            out.append(Grant(
                role=f"{ref['kind']}/{ref['name']}", index=i, namespace=bound_ns,
                rule=(tuple(rule.get("apiGroups") or ()), tuple(rule.get("resources") or ()),
                      tuple(rule.get("verbs") or ()), tuple(rule.get("resourceNames") or ())),
            ))
    return out


def denied(requests: Iterable[Request], granted: list[Grant]) -> list[Request]:
    return sorted({r for r in requests if not any(g.allows(r) for g in granted)}, key=str)


def unused(requests: Iterable[Request], granted: list[Grant]) -> list[str]:
    """(rule, verb, resource) combinations no request needed: what RBAC grants beyond use."""
    reqs = list(requests)
    out: list[str] = []
    for g in granted:
        groups, resources, verbs, names = g.rule
        for verb in verbs:
            for resource in resources:
                res, _, sub = resource.partition("/")
                hit = any(
                    r.verb == verb and r.group in groups and r.resource == res
                    and r.subresource == sub and g.allows(r) for r in reqs
                )
                if not hit:
                    out.append(f"{g}: {verb} {resource} never used")
    return out
