"""A Kubernetes API emulator good enough for real ``kubectl`` and the real kopf operator.

It extends ``kmock``'s :class:`kmock.KubernetesEmulator` (its HTTP server, request parsing,
request log and DSL reactions stay: a test can still inject faults with
``api['patch', kmock.resource('prefetcher.dev/v1alpha1/nodeimagesets')] << 409``), and
replaces its object store, which kmock 0.8 keeps deliberately simple. What a real API server
does and this emulator does too (everything below is what kmock 0.8 lacks or gets wrong):

- discovery: ``/api`` → ``/api/v1`` with ``groupVersion: "v1"`` (kmock serves ``"/v1"``,
  which makes kubectl and Helm lose every core kind); ``/apis``, ``/apis/<g>``,
  ``/apis/<g>/<v>`` with kinds, verbs, short names, categories and ``<plural>/status``;
- built-in resources (namespaces, nodes, pods, secrets, configmaps, events, service
  accounts, services, daemonsets, deployments, leases, CRDs) and **CRD registration**: a
  created ``CustomResourceDefinition`` becomes Established and its resources are served and
  discoverable; deleting it removes them;
- ``metadata``: uid, creationTimestamp, a cluster-wide increasing ``resourceVersion``,
  ``generation`` bumped on spec changes (not on metadata/status), ``generateName``;
- ``PUT`` and ``PATCH`` (merge, JSON patch with ``test``, strategic merge approximated as
  merge, server-side apply approximated as a merge that creates) with **409 Conflict** on a
  stale ``metadata.resourceVersion``; 409 AlreadyExists on create;
- the **status subresource**: writes to the object ignore ``status``, writes to
  ``/status`` change only ``status``;
- finalizers and ``deletionTimestamp``; owner-reference garbage collection (background);
- **label and field selectors** (any dotted field, incl. ``metadata.name=``) on list and
  watch; a watched object leaving the selector is reported DELETED, entering it ADDED;
- **watch** with ``resourceVersion`` (history replay; 410 Gone when too old),
  ``allowWatchBookmarks`` (periodic BOOKMARK events), ``sendInitialEvents`` (the initial
  events end with the ``k8s.io/initial-events-end`` bookmark) and ``timeoutSeconds``;
- ``Accept: …;as=Table`` for custom resources, with ``additionalPrinterColumns``
  (simple JSONPaths), so ``kubectl get ipf`` prints the columns a real cluster prints;
- CRD schema **defaulting** and (when ``validate=True``) openAPIV3Schema validation with
  422 Invalid responses naming the field (CEL ``x-kubernetes-validations`` are not evaluated).
- **pagination**: ``limit`` and ``continue`` on lists (the continue token holds the last key;
  later pages see the store as it is then, not a snapshot as etcd serves);
- **bearer tokens** (opt-in): with :attr:`KubeAPI.tokens` set, a request without one of them
  gets 401 Unauthorized (except kubectl's: it sends no token to a plain-HTTP server);
  :meth:`KubeAPI.rotate_token` replaces them (as a kubelet rotating a bound service-account
  token and the old one expiring);
- **faults** (:meth:`KubeAPI.fail`): the next N matching requests get a status (409, 429 with
  ``Retry-After``, 500…); a watch can be answered with 410 Gone; :meth:`KubeAPI.drop_watches`
  cuts every open watch connection;
- **races** (:meth:`KubeAPI.before`): a function run on the store just before the next
  matching request is served (an object deleted and re-created under the same name between
  a client's read and its write, deterministically).

Not emulated: authorization/RBAC (every request is allowed, but every request is recorded
in :attr:`KubeAPI.calls` so RBAC can be compared with what was used), admission, controllers
(no pods are created for a DaemonSet; tests create them), pruning of unknown fields, field
managers, protobuf.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import dataclasses
import datetime
import itertools
import json
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import attrs
import kmock
from kmock._internal import apps, rendering

from . import jsonpaths, schemas, selectors

JSON = dict[str, Any]


@dataclasses.dataclass
class ResourceType:
    """One served resource (group/version/plural) and what discovery says about it."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    has_generation: bool = True
    printer_columns: list[JSON] = dataclasses.field(default_factory=list)
    schema: JSON | None = None
    crd: str = ""  # name of the CRD that registered it, "" for built-ins

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.group, self.version, self.plural)

    @property
    def qualified(self) -> str:
        return f"{self.plural}.{self.group}" if self.group else self.plural


VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


def _builtins() -> list[ResourceType]:
    r = ResourceType
    return [
        r("", "v1", "namespaces", "Namespace", False, "namespace", ("ns",),
          status_subresource=True, has_generation=False),
        r("", "v1", "nodes", "Node", False, "node", ("no",),
          status_subresource=True, has_generation=False),
        r("", "v1", "pods", "Pod", True, "pod", ("po",), ("all",),
          status_subresource=True, has_generation=False),
        r("", "v1", "secrets", "Secret", True, "secret", has_generation=False),
        r("", "v1", "configmaps", "ConfigMap", True, "configmap", ("cm",), has_generation=False),
        r("", "v1", "events", "Event", True, "event", ("ev",), has_generation=False),
        r("", "v1", "serviceaccounts", "ServiceAccount", True, "serviceaccount", ("sa",),
          has_generation=False),
        r("", "v1", "services", "Service", True, "service", ("svc",), ("all",),
          status_subresource=True, has_generation=False),
        r("apps", "v1", "daemonsets", "DaemonSet", True, "daemonset", ("ds",), ("all",),
          status_subresource=True),
        r("apps", "v1", "deployments", "Deployment", True, "deployment", ("deploy",), ("all",),
          status_subresource=True),
        r("coordination.k8s.io", "v1", "leases", "Lease", True, "lease", has_generation=False),
        r("events.k8s.io", "v1", "events", "Event", True, "event", ("ev",),
          has_generation=False),
        r("apiextensions.k8s.io", "v1", "customresourcedefinitions", "CustomResourceDefinition",
          False, "customresourcedefinition", ("crd", "crds"), status_subresource=True),
    ]


@dataclasses.dataclass(frozen=True)
class Call:
    """One API request as RBAC sees it."""

    verb: str  # get, list, watch, create, update, patch, delete
    group: str
    version: str
    resource: str
    subresource: str
    namespace: str
    name: str
    label_selector: str = ""
    field_selector: str = ""
    user_agent: str = ""


class APIError(Exception):
    """A Kubernetes ``Status`` failure."""

    def __init__(self, code: int, reason: str, message: str, details: JSON | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> JSON:
        return {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": self.message, "reason": self.reason, "details": self.details,
            "code": self.code,
        }


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (``null`` deletes)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _strategic_to_merge(patch: Any) -> Any:
    """Drop strategic-merge directives so the patch can be applied as a merge patch."""
    if isinstance(patch, dict):
        return {
            k: _strategic_to_merge(v) for k, v in patch.items()
            if not k.startswith("$") and not k.startswith("$setElementOrder")
        }
    if isinstance(patch, list):
        return [_strategic_to_merge(v) for v in patch
                if not (isinstance(v, dict) and "$patch" in v)]
    return patch


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    return [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]


def json_patch(doc: Any, ops: list[JSON]) -> Any:
    """RFC 6902 JSON patch; a failed ``test`` raises 422 Invalid, as the API server answers
    (kopf relies on it: on 422 it re-applies the rest of its patch — a finalizer — at its
    next cycle; any other status drops it)."""
    doc = copy.deepcopy(doc)

    def parent(path: str) -> tuple[Any, str]:
        parts = _pointer(path)
        node = doc
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node, parts[-1]

    def get(path: str) -> Any:
        node = doc
        for part in _pointer(path):
            node = node[int(part)] if isinstance(node, list) else node[part]
        return node

    for op in ops:
        kind, path = op["op"], op["path"]
        try:
            if kind == "test":
                if get(path) != op.get("value"):
                    raise APIError(422, "Invalid", f"the JSON patch test at {path} failed")
                continue
            if kind in ("move", "copy"):
                value = copy.deepcopy(get(op["from"]))
                if kind == "move":
                    node, last = parent(op["from"])
                    del node[int(last) if isinstance(node, list) else last]
                kind, op = "add", {"path": path, "value": value}
            node, last = parent(path)
            if kind == "add":
                if isinstance(node, list):
                    node.insert(len(node) if last == "-" else int(last), op["value"])
                else:
                    node[last] = op["value"]
            elif kind == "replace":
                if isinstance(node, list):
                    node[int(last)] = op["value"]
                else:
                    if last not in node:
                        raise KeyError(last)
                    node[last] = op["value"]
            elif kind == "remove":
                del node[int(last) if isinstance(node, list) else last]
            else:
                raise APIError(400, "BadRequest", f"unknown JSON patch op {kind!r}")
        except (KeyError, IndexError, ValueError, TypeError) as e:
            raise APIError(422, "Invalid", f"the JSON patch op {op} cannot apply: {e}") from e
    return doc


def _human_age(timestamp: str) -> str:
    try:
        then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    if seconds < 120:
        return f"{max(seconds, 0)}s"
    if seconds < 3600 * 3:
        return f"{seconds // 60}m"
    if seconds < 86400 * 2:
        return f"{seconds // 3600}h"
    return f"{seconds // 86400}d"


@attrs.define(kw_only=True)
class KubeAPI(kmock.KubernetesEmulator):
    """The emulator. Serve it with ``kmock.Server(api)``; see :mod:`tests.kube.conftest`.

    Attributes:
        validate: validate custom resources against their CRD schema (422 on failure).
        bookmark_interval: seconds between BOOKMARK events on watches that allow them.
        history: how many past events are kept for watch resumption (older → 410 Gone).
    """

    validate: bool = True
    bookmark_interval: float = 1.0
    history: int = 200_000

    types: dict[tuple[str, str, str], ResourceType] = attrs.field(factory=dict, init=False)
    store: dict[tuple[tuple[str, str, str], str, str], JSON] = attrs.field(factory=dict, init=False)
    calls: list[Call] = attrs.field(factory=list, init=False)
    #: The garbage collector's graph: each live object's uid → its key, each owner's uid →
    #: the keys of objects that named it (checked again when collected; may be stale).
    _uids: dict[str, tuple] = attrs.field(factory=dict, init=False)
    _dependents: dict[str, set[tuple]] = attrs.field(factory=dict, init=False)
    _rv: itertools.count = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _last_rv: int = attrs.field(default=1000, init=False)
    _events: deque = attrs.field(init=False)
    _watchers: set[asyncio.Queue] = attrs.field(factory=set, init=False)
    #: Bearer tokens accepted; empty = no authentication (every request allowed).
    tokens: set[str] = attrs.field(factory=set)
    #: Injected faults, consumed in order: (verb, plural, status, retry_after, remaining).
    faults: list[list[Any]] = attrs.field(factory=list, init=False)
    #: Injected races: (verb, plural, subresource, name, action), each run once.
    races: list[tuple[str, str, str, str, Callable[[], None]]] = attrs.field(
        factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        # Not calling kmock's own post-init: its fallbacks (discovery with "/v1", the simple
        # store) are replaced by the single fallback below. User reactions still take priority.
        self._events = deque(maxlen=self.history)
        for rt in _builtins():
            self.types[rt.key] = rt
        self.fallback << self._serve

    async def _handle(self, request: rendering.Request) -> Any:
        # Skip kmock's own object tracking (KubernetesEmulator._handle): this class keeps the
        # objects itself. Reactions (the DSL, then the fallback below) are matched as usual.
        return await apps.RawHandler._handle(self, request)

    # ---------------------------------------------------------------------------------------
    # Direct (in-process) access for tests and fixtures. Not thread-safe: call from the loop.

    def put_object(self, api_version: str, plural: str, obj: JSON) -> JSON:
        """Create or overwrite an object as a controller or a test would (no validation)."""
        rt = self._type_by_api(api_version, plural)
        meta = obj.setdefault("metadata", {})
        key = (rt.key, meta.get("namespace", "") if rt.namespaced else "", meta["name"])
        old = self.store.get(key)
        obj.setdefault("apiVersion", rt.api_version)
        obj.setdefault("kind", rt.kind)
        if old is None:
            self._init_meta(rt, obj)
        else:
            meta.setdefault("uid", old["metadata"]["uid"])
            meta.setdefault("creationTimestamp", old["metadata"]["creationTimestamp"])
        return self._commit(rt, key, old, obj)

    def get_object(self, api_version: str, plural: str, name: str,
                   namespace: str = "") -> JSON | None:
        rt = self._type_by_api(api_version, plural)
        obj = self.store.get((rt.key, namespace if rt.namespaced else "", name))
        return copy.deepcopy(obj) if obj is not None else None

    def list_objects(self, api_version: str, plural: str,
                     namespace: str | None = None) -> list[JSON]:
        rt = self._type_by_api(api_version, plural)
        return [
            copy.deepcopy(obj) for (k, ns, _), obj in sorted(self.store.items())
            if k == rt.key and (namespace is None or ns == namespace)
        ]

    def delete_object(self, api_version: str, plural: str, name: str, namespace: str = "") -> None:
        rt = self._type_by_api(api_version, plural)
        self._delete(rt, namespace if rt.namespaced else "", name)

    def rotate_token(self, new: str) -> None:
        """Accept only ``new`` from now on (the old token expired)."""
        self.tokens = {new}

    def fail(self, verb: str, plural: str, status: int, *, times: int = 1,
             retry_after: float | None = None) -> None:
        """Answer the next ``times`` requests of ``verb`` (get, list, watch, create, update,
        patch, delete; "*" for any) on ``plural`` ("*" for any) with ``status`` (a watch
        with 410 gets a 410 ERROR event, as an expired resourceVersion does)."""
        self.faults.append([verb, plural, status, retry_after, times])

    def before(self, verb: str, plural: str, action: Callable[[], None], *, name: str = "",
               subresource: str = "") -> None:
        """Run ``action`` (on the emulator's loop, where the store may be used directly)
        just before the next ``verb`` request on ``plural`` (``name`` and ``subresource``,
        when given, must match too) is served: once."""
        self.races.append((verb, plural, subresource, name, action))

    def _race(self, verb: str, plural: str, subresource: str, name: str) -> None:
        for race in self.races:
            if race[0] == verb and race[1] == plural and race[2] == subresource \
                    and race[3] in ("", name):
                self.races.remove(race)
                race[4]()
                return

    def drop_watches(self) -> None:
        """Close every open watch connection (as a restarted API server or a proxy does)."""
        for queue in list(self._watchers):
            queue.put_nowait(None)

    def _fault(self, verb: str, plural: str) -> list[Any] | None:
        for fault in self.faults:
            if fault[0] in (verb, "*") and fault[1] in (plural, "*"):
                fault[4] -= 1
                if fault[4] <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    def _type_by_api(self, api_version: str, plural: str) -> ResourceType:
        group, _, version = api_version.rpartition("/")
        rt = self.types.get((group, version, plural))
        if rt is None:
            raise KeyError(f"{plural} in {api_version} is not served")
        return rt

    # ---------------------------------------------------------------------------------------
    # HTTP

    async def _serve(self, request: rendering.Request) -> Any:
        # Always answer with an explicit status: kmock copies a nested Response's status onto
        # the (shared) fallback reaction, so a bare payload would inherit the previous status.
        # Headers stick to the fallback reaction too: clear the ones a fault may have set.
        clear = {"Retry-After": None}
        try:
            result = await self._dispatch(request)
        except APIError as e:
            return rendering.Response(status=e.code, payload=e.status(), headers=clear)
        if isinstance(result, rendering.Response):
            return rendering.Response(status=result.status, payload=result.payload,
                                      headers={**clear, **(result.headers or {})})
        return rendering.Response(status=200, payload=result, headers=clear)

    async def _dispatch(self, request: rendering.Request) -> Any:
        path = request.url.path.rstrip("/") or "/"
        method = str(request.method.value).upper()
        if path == "/version":
            return {"major": "1", "minor": "32", "gitVersion": "v1.32.0-kmock",
                    "platform": "linux/amd64", "goVersion": "go1.23", "compiler": "gc",
                    "gitCommit": "0" * 40, "gitTreeState": "clean",
                    "buildDate": "2025-01-01T00:00:00Z"}
        if path in ("/healthz", "/readyz", "/livez"):
            return rendering.Response(status=200, payload=b"ok")
        if self.tokens and not request.headers.get("User-Agent", "").startswith("kubectl"):
            # (kubectl, the test's own tool, sends no bearer token to a plain-HTTP server.)
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            if scheme.lower() != "bearer" or token.strip() not in self.tokens:
                raise APIError(401, "Unauthorized", "Unauthorized")
        if path == "/":
            return {"paths": ["/api", "/api/v1", "/apis", "/version"]}
        if path == "/api":
            return {"kind": "APIVersions", "versions": ["v1"],
                    "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0",
                                                    "serverAddress": "127.0.0.1"}]}
        if path == "/apis":
            return self._group_list()
        if path == "/openapi/v3":
            return {"paths": {gv: {"serverRelativeURL": f"/openapi/v3/{gv}?hash={self._last_rv}"}
                              for gv in self._gv_paths()}}
        if path.startswith("/openapi/v3/"):
            return self._openapi_v3(path.removeprefix("/openapi/v3/"))
        if path.startswith("/openapi"):
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        parts = path.strip("/").split("/")
        if parts[0] == "apis" and len(parts) == 2:
            return self._group(parts[1])
        if (parts[0] == "api" and len(parts) == 2) or (parts[0] == "apis" and len(parts) == 3):
            group = "" if parts[0] == "api" else parts[1]
            return self._resource_list(group, parts[-1])
        return await self._resource_request(request, method, parts)

    # Discovery.

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for rt in self.types.values():
            if rt.group and rt.version not in groups.setdefault(rt.group, []):
                groups[rt.group].append(rt.version)
        return groups

    def _group_doc(self, name: str, versions: list[str]) -> JSON:
        gvs = [{"groupVersion": f"{name}/{v}", "version": v} for v in versions]
        return {"name": name, "versions": gvs, "preferredVersion": gvs[0]}

    def _group_list(self) -> JSON:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self._group_doc(g, vs) for g, vs in sorted(self._groups().items())]}

    def _group(self, name: str) -> JSON:
        versions = self._groups().get(name)
        if not versions:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_doc(name, versions)}

    def _resource_list(self, group: str, version: str) -> JSON:
        types = [rt for rt in self.types.values() if rt.group == group and rt.version == version]
        if not types:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        resources: list[JSON] = []
        for rt in sorted(types, key=lambda t: t.plural):
            entry: JSON = {"name": rt.plural, "singularName": rt.singular or rt.kind.lower(),
                           "namespaced": rt.namespaced, "kind": rt.kind, "verbs": VERBS}
            if rt.short_names:
                entry["shortNames"] = list(rt.short_names)
            if rt.categories:
                entry["categories"] = list(rt.categories)
            resources.append(entry)
            if rt.status_subresource:
                resources.append({"name": f"{rt.plural}/status", "singularName": "",
                                  "namespaced": rt.namespaced, "kind": rt.kind,
                                  "verbs": ["get", "patch", "update"]})
        gv = f"{group}/{version}" if group else version
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                "resources": resources}

    # OpenAPI v3: just enough for kubectl to choose server-side field validation (it looks
    # for the fieldValidation parameter) and for `kubectl explain` on custom resources.

    def _gv_paths(self) -> list[str]:
        return sorted({f"apis/{rt.group}/{rt.version}" if rt.group else f"api/{rt.version}"
                       for rt in self.types.values()})

    def _openapi_v3(self, gv_path: str) -> JSON:
        paths: JSON = {}
        components: JSON = {}
        params = [{"name": n, "in": "query", "schema": {"type": "string"}, "uniqueItems": True}
                  for n in ("dryRun", "fieldManager", "fieldValidation")]
        for rt in self.types.values():
            this = f"apis/{rt.group}/{rt.version}" if rt.group else f"api/{rt.version}"
            if this != gv_path:
                continue
            gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
            ref_name = ".".join(reversed(rt.group.split("."))) + f".{rt.version}.{rt.kind}" \
                if rt.group else f"io.k8s.api.core.v1.{rt.kind}"
            schema = copy.deepcopy(rt.schema) if rt.schema else {"type": "object"}
            schema["x-kubernetes-group-version-kind"] = [gvk]
            components[ref_name] = schema
            ns = "/namespaces/{namespace}" if rt.namespaced else ""
            op = {"parameters": params, "x-kubernetes-group-version-kind": gvk,
                  "x-kubernetes-action": "patch",
                  "responses": {"200": {"content": {"application/json": {"schema": {
                      "$ref": f"#/components/schemas/{ref_name}"}}}}}}
            paths[f"/{this}{ns}/{rt.plural}/{{name}}"] = {
                "patch": op, "put": dict(op, **{"x-kubernetes-action": "put"}),
                "get": dict(op, **{"x-kubernetes-action": "get"})}
            paths[f"/{this}{ns}/{rt.plural}"] = {
                "post": dict(op, **{"x-kubernetes-action": "post"})}
        if not paths:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        return {"openapi": "3.0.0", "info": {"title": "Kubernetes", "version": "v1.32.0"},
                "paths": paths, "components": {"schemas": components}}

    # Resources.

    async def _resource_request(self, request: rendering.Request, method: str,
                                parts: list[str]) -> Any:
        if parts[0] == "api" and len(parts) >= 3:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural, name = rest[0], rest[1] if len(rest) > 1 else ""
        sub = "/".join(rest[2:])
        rt = self.types.get((group, version, plural))
        if rt is None:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        params = dict(request.params)
        watch = params.get("watch") in ("true", "1")
        verb = {"GET": "watch" if watch else ("get" if name else "list"), "POST": "create",
                "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
        if method == "DELETE" and not name:
            verb = "deletecollection"
        self.calls.append(Call(
            verb, group, version, plural, sub, namespace, name,
            params.get("labelSelector", ""), params.get("fieldSelector", ""),
            request.headers.get("User-Agent", ""),
        ))
        self._race(verb, plural, sub, name)
        fault = self._fault(verb, plural)
        if fault is not None:
            status, retry_after = fault[2], fault[3]
            if verb == "watch" and status == 410:
                async def gone() -> AsyncIterator[Any]:
                    yield {"type": "ERROR", "object": APIError(
                        410, "Expired", "too old resource version (injected)").status()}
                return rendering.Response(status=200, payload=gone(),
                                          headers={"Content-Type": "application/json"})
            error = APIError(status, {409: "Conflict", 429: "TooManyRequests"}.get(
                status, "InternalError"), f"injected fault: {status}")
            headers = {"Retry-After": str(int(retry_after))} if retry_after is not None else {}
            return rendering.Response(status=status, payload=error.status(), headers=headers)
        if sub and sub != "status":
            raise APIError(404, "NotFound", f"subresource {sub!r} is not served by the emulator")
        if sub == "status" and not rt.status_subresource:
            raise APIError(404, "NotFound", "the server could not find the requested resource")
        ns = namespace if rt.namespaced else ""
        if verb == "watch":
            return rendering.Response(status=200, payload=self._watch(rt, ns, name, params),
                                      headers={"Content-Type": "application/json"})
        if verb == "list":
            return self._list(rt, ns, params, request.headers.get("Accept", ""))
        if verb == "get":
            obj = self._get(rt, ns, name)
            if "as=Table" in request.headers.get("Accept", ""):
                return self._table(rt, [obj], str(self._last_rv))
            return obj
        body = request.data if isinstance(request.data, dict | list) else None
        if body is None and request.text:
            body = self._parse_body(request.text)
        dry_run = "dryRun" in params
        if verb == "create":
            return rendering.Response(status=201, payload=self._create(rt, ns, body, dry_run))
        if verb == "update":
            return self._update(rt, ns, name, sub, body, dry_run)
        if verb == "patch":
            ctype = request.headers.get("Content-Type", "").split(";")[0].strip()
            return self._patch(rt, ns, name, sub, ctype, body, params, dry_run)
        if verb == "delete":
            old = self.store.get((rt.key, ns, name))
            if old is not None:
                self._delete_preconditions(rt, old, body or {})
            return self._delete(rt, ns, name, dry_run=dry_run)
        if verb == "deletecollection":
            for obj in self._select(rt, ns, params):
                self._delete(rt, ns, obj["metadata"]["name"], dry_run=dry_run)
            return {"kind": "Status", "apiVersion": "v1", "status": "Success"}
        raise APIError(405, "MethodNotAllowed", f"{method} is not supported")

    @staticmethod
    def _parse_body(text: str) -> Any:
        try:
            return json.loads(text)
        except ValueError:
            import yaml  # server-side apply bodies may be YAML

            return yaml.safe_load(text)

    def _not_found(self, rt: ResourceType, name: str) -> APIError:
        return APIError(404, "NotFound", f'{rt.qualified} "{name}" not found',
                        {"name": name, "group": rt.group, "kind": rt.plural})

    def _get(self, rt: ResourceType, ns: str, name: str) -> JSON:
        obj = self.store.get((rt.key, ns, name))
        if obj is None:
            raise self._not_found(rt, name)
        return copy.deepcopy(obj)

    def _select(self, rt: ResourceType, ns: str, params: Mapping[str, str]) -> list[JSON]:
        try:
            labels = selectors.label_selector(params.get("labelSelector"))
            fields = selectors.field_selector(params.get("fieldSelector"))
        except selectors.SelectorError as e:
            raise APIError(400, "BadRequest", str(e)) from e
        return [
            obj for (k, ons, _), obj in sorted(self.store.items())
            if k == rt.key and (not ns or ons == ns)
            and labels(obj["metadata"].get("labels") or {}) and fields(obj)
        ]

    def _list(self, rt: ResourceType, ns: str, params: Mapping[str, str], accept: str) -> JSON:
        selected = self._select(rt, ns, params)
        rv = str(self._last_rv)
        meta: JSON = {"resourceVersion": rv}
        if params.get("continue"):
            try:
                after = tuple(json.loads(base64.urlsafe_b64decode(params["continue"])))
            except ValueError as e:
                raise APIError(400, "BadRequest", f"invalid continue token: {e}") from e
            selected = [o for o in selected if self._page_key(o) > after]
        limit = int(params.get("limit") or 0)
        if 0 < limit < len(selected):
            meta["remainingItemCount"] = len(selected) - limit
            selected = selected[:limit]
            last = json.dumps(list(self._page_key(selected[-1]))).encode()
            meta["continue"] = base64.urlsafe_b64encode(last).decode()
        items = [copy.deepcopy(obj) for obj in selected]
        if "as=Table" in accept:
            return self._table(rt, items, rv)
        return {"kind": f"{rt.kind}List", "apiVersion": rt.api_version,
                "metadata": meta, "items": items}

    @staticmethod
    def _page_key(obj: JSON) -> tuple[str, str]:
        return (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])

    def _table(self, rt: ResourceType, items: list[JSON], rv: str) -> JSON:
        columns = [{"name": "Name", "type": "string", "format": "name", "priority": 0,
                    "description": "Name must be unique within a namespace."}]
        printer = rt.printer_columns or [
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}]
        for col in printer:
            columns.append({"name": col["name"], "type": col.get("type", "string"),
                            "format": col.get("format", ""), "priority": col.get("priority", 0),
                            "description": col.get("description", "")})
        rows = []
        for obj in items:
            cells: list[Any] = [obj["metadata"]["name"]]
            for col in printer:
                value = jsonpaths.evaluate(obj, col["jsonPath"])
                if value is not None and col.get("type") == "date":
                    value = _human_age(str(value))
                cells.append(value)
            rows.append({"cells": cells, "object": {
                "kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"]}})
        return {"kind": "Table", "apiVersion": "meta.k8s.io/v1",
                "metadata": {"resourceVersion": rv}, "columnDefinitions": columns, "rows": rows}

    # Writes.

    def _next_rv(self) -> str:
        self._last_rv = next(self._rv)
        return str(self._last_rv)

    def _init_meta(self, rt: ResourceType, obj: JSON) -> None:
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        if rt.has_generation:
            meta["generation"] = 1
        for key in ("resourceVersion", "deletionTimestamp"):
            meta.pop(key, None)

    def _check(self, rt: ResourceType, obj: JSON) -> None:
        if obj.get("apiVersion") not in (None, rt.api_version) or \
                obj.get("kind") not in (None, rt.kind):
            raise APIError(400, "BadRequest",
                           f"the body is a {obj.get('apiVersion')} {obj.get('kind')},"
                           f" not a {rt.api_version} {rt.kind}")
        if rt.schema is not None:
            schemas.apply_defaults(rt.schema, obj)
            if self.validate:
                problems = schemas.problems(rt.schema, obj)
                if problems:
                    name = obj.get("metadata", {}).get("name", "")
                    raise APIError(422, "Invalid",
                                   f'{rt.kind} "{name}" is invalid: ' + ", ".join(problems),
                                   {"name": name, "group": rt.group, "kind": rt.kind,
                                    "causes": [{"reason": "FieldValueInvalid",
                                                "message": p.split(": ", 1)[1],
                                                "field": p.split(":")[0]} for p in problems]})

    def _create(self, rt: ResourceType, ns: str, body: Any, dry_run: bool = False) -> JSON:
        if not isinstance(body, dict):
            raise APIError(400, "BadRequest", "the request body must be an object")
        obj = copy.deepcopy(body)
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        if not meta.get("name"):
            raise APIError(422, "Invalid", f"{rt.kind}: metadata.name: Required value")
        if rt.namespaced:
            if meta.get("namespace") and ns and meta["namespace"] != ns:
                raise APIError(400, "BadRequest", "the namespace of the object does not match"
                                                  " the namespace of the request")
            meta["namespace"] = ns or meta.get("namespace") or "default"
        else:
            meta.pop("namespace", None)
        key = (rt.key, meta.get("namespace", ""), meta["name"])
        if key in self.store:
            raise APIError(409, "AlreadyExists", f'{rt.qualified} "{meta["name"]}" already exists',
                           {"name": meta["name"], "group": rt.group, "kind": rt.plural})
        obj.setdefault("apiVersion", rt.api_version)
        obj.setdefault("kind", rt.kind)
        if rt.status_subresource and rt.crd:
            obj.pop("status", None)
        self._init_meta(rt, obj)
        self._check(rt, obj)
        if dry_run:
            return obj
        return copy.deepcopy(self._commit(rt, key, None, obj))

    def _update(self, rt: ResourceType, ns: str, name: str, sub: str, body: Any,
                dry_run: bool = False) -> JSON:
        if not isinstance(body, dict):
            raise APIError(400, "BadRequest", "the request body must be an object")
        key = (rt.key, ns, name)
        old = self.store.get(key)
        if old is None:
            raise self._not_found(rt, name)
        self._precondition(rt, old, body)
        new = self._carry(rt, old, copy.deepcopy(body), sub)
        return self._finish_write(rt, key, old, new, dry_run)

    def _patch(self, rt: ResourceType, ns: str, name: str, sub: str, ctype: str, body: Any,
               params: Mapping[str, str], dry_run: bool = False) -> JSON:
        key = (rt.key, ns, name)
        old = self.store.get(key)
        if ctype == "application/apply-patch+yaml":
            if old is None:
                created = dict(body or {}, metadata=dict((body or {}).get("metadata", {})))
                return self._create(rt, ns, created, dry_run)
            patched = merge_patch(old, body)
        elif old is None:
            raise self._not_found(rt, name)
        elif ctype == "application/json-patch+json":
            if not isinstance(body, list):
                raise APIError(400, "BadRequest", "a JSON patch must be a list of operations")
            patched = json_patch(old, body)
        elif ctype == "application/strategic-merge-patch+json":
            if rt.crd:
                raise APIError(415, "UnsupportedMediaType",
                               "strategic merge patch is not supported for custom resources")
            self._precondition(rt, old, body or {})
            patched = merge_patch(old, _strategic_to_merge(body))
        elif ctype in ("application/merge-patch+json", "application/json", ""):
            self._precondition(rt, old, body or {})
            patched = merge_patch(old, body)
        else:
            raise APIError(415, "UnsupportedMediaType", f"{ctype!r} is not a patch type")
        new = self._carry(rt, old, patched, sub)
        return self._finish_write(rt, key, old, new, dry_run)

    def _delete_preconditions(self, rt: ResourceType, old: JSON, body: Mapping[str, Any]
                              ) -> None:
        """DeleteOptions ``preconditions`` (``uid``, ``resourceVersion``): 409 unless the
        object is still the one named (as the API server does)."""
        wanted = body.get("preconditions") or {} if isinstance(body, Mapping) else {}
        meta = old["metadata"]
        for field in ("uid", "resourceVersion"):
            if wanted.get(field) and wanted[field] != meta.get(field):
                raise APIError(
                    409, "Conflict",
                    f'Operation cannot be fulfilled on {rt.qualified} "{meta["name"]}":'
                    f" Precondition failed: {field} in precondition: {wanted[field]},"
                    f" {field} in object meta: {meta.get(field)}")

    def _precondition(self, rt: ResourceType, old: JSON, body: Mapping[str, Any]) -> None:
        """A body carrying ``metadata.resourceVersion`` must carry the current one (409)."""
        wanted = (body.get("metadata") or {}).get("resourceVersion")
        if wanted and wanted != old["metadata"]["resourceVersion"]:
            name = old["metadata"]["name"]
            raise APIError(
                409, "Conflict",
                f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been'
                " modified; please apply your changes to the latest version and try again",
                {"name": name, "group": rt.group, "kind": rt.plural})

    def _carry(self, rt: ResourceType, old: JSON, new: JSON, sub: str) -> JSON:
        """Keep what a write to this endpoint may not change (identity, status or spec)."""
        meta = new.setdefault("metadata", {})
        for field in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp",
                      "generation"):
            if field in old["metadata"]:
                meta[field] = old["metadata"][field]
            else:
                meta.pop(field, None)
        new["apiVersion"], new["kind"] = old.get("apiVersion", rt.api_version), rt.kind
        if rt.status_subresource:
            if sub == "status":
                kept = {k: v for k, v in old.items() if k != "status"}
                kept["metadata"] = old["metadata"]
                if "status" in new:
                    kept["status"] = new["status"]
                return copy.deepcopy(kept)
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        return new

    def _finish_write(self, rt: ResourceType, key: tuple, old: JSON, new: JSON,
                      dry_run: bool) -> JSON:
        self._check(rt, new)
        if rt.has_generation:
            def essence(o: JSON) -> JSON:
                return {k: v for k, v in o.items() if k not in ("metadata", "status")}
            if essence(old) != essence(new):
                new["metadata"]["generation"] = old["metadata"].get("generation", 1) + 1
        if dry_run:
            return new
        if new == old or (
            {k: v for k, v in new.items() if k != "metadata"}
            == {k: v for k, v in old.items() if k != "metadata"}
            and {k: v for k, v in new["metadata"].items() if k != "resourceVersion"}
            == {k: v for k, v in old["metadata"].items() if k != "resourceVersion"}
        ):
            return copy.deepcopy(old)  # no-op writes do not bump resourceVersion (as etcd3)
        committed = self._commit(rt, key, old, new)
        meta = committed["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers"):
            self._remove(rt, key)
        return copy.deepcopy(committed)

    def _commit(self, rt: ResourceType, key: tuple, old: JSON | None, new: JSON) -> JSON:
        new["metadata"]["resourceVersion"] = self._next_rv()
        self.store[key] = new
        if old is not None and old["metadata"].get("uid") != new["metadata"]["uid"]:
            self._uids.pop(old["metadata"].get("uid", ""), None)
        self._uids[new["metadata"]["uid"]] = key
        for ref in new["metadata"].get("ownerReferences") or []:
            self._dependents.setdefault(ref.get("uid", ""), set()).add(key)
        self._emit(rt, "ADDED" if old is None else "MODIFIED", new, old)
        if rt.plural == "customresourcedefinitions":
            self._register_crd(new)
        if new["metadata"].get("ownerReferences"):
            self._orphan_check(key)
        return new

    def _orphan_check(self, key: tuple) -> None:
        """The garbage collector also deletes an object written with owners that are all
        gone already (it verifies owners of new dependents), soon after the write."""
        def present(ref: JSON) -> bool:
            for rt in self.types.values():
                if rt.api_version == ref.get("apiVersion") and rt.kind == ref.get("kind"):
                    owner = self.store.get((rt.key, key[1] if rt.namespaced else "",
                                            ref.get("name", "")))
                    return owner is not None and owner["metadata"]["uid"] == ref.get("uid")
            return True  # a kind not served here: assume it exists

        def check() -> None:
            obj = self.store.get(key)
            owners = (obj or {}).get("metadata", {}).get("ownerReferences") or []
            if owners and not any(present(ref) for ref in owners):
                self._delete(self.types[key[0]], key[1], key[2])

        try:
            asyncio.get_running_loop().call_later(0.05, check)
        except RuntimeError:  # pragma: no cover - not on the loop (no background GC)
            pass

    def _delete(self, rt: ResourceType, ns: str, name: str, dry_run: bool = False) -> JSON:
        key = (rt.key, ns, name)
        old = self.store.get(key)
        if old is None:
            raise self._not_found(rt, name)
        if dry_run:
            return copy.deepcopy(old)
        if old["metadata"].get("finalizers"):
            if not old["metadata"].get("deletionTimestamp"):
                new = copy.deepcopy(old)
                new["metadata"]["deletionTimestamp"] = _now()
                new["metadata"]["deletionGracePeriodSeconds"] = 0
                self._commit(rt, key, old, new)
            return copy.deepcopy(self.store[key])
        return self._remove(rt, key)

    def _remove(self, rt: ResourceType, key: tuple) -> JSON:
        obj = self.store.pop(key)
        self._uids.pop(obj["metadata"]["uid"], None)
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = self._next_rv()
        self._emit(rt, "DELETED", obj, None)
        if rt.plural == "customresourcedefinitions":
            self._unregister_crd(obj)
        self._collect_garbage(obj["metadata"]["uid"])
        return obj

    def _collect_garbage(self, uid: str) -> None:
        """Background cascading deletion: dependents whose every owner is gone are deleted."""
        # Only the objects that named this owner (an index, as the real collector's graph:
        # a scan of the whole store per delete stalled the emulator at 5,000 nodes).
        for tkey, ns, name in sorted(self._dependents.pop(uid, ())):
            obj = self.store.get((tkey, ns, name))
            if obj is None:
                continue
            owners = obj["metadata"].get("ownerReferences") or []
            if owners and any(o.get("uid") == uid for o in owners) and \
                    not any(o.get("uid") in self._uids for o in owners):
                self._delete(self.types[tkey], ns, name)

    # CRDs.

    def _register_crd(self, crd: JSON) -> None:
        spec, names = crd.get("spec", {}), crd.get("spec", {}).get("names", {})
        if crd["metadata"].get("deletionTimestamp"):
            return
        for version in spec.get("versions", []):
            if not version.get("served", True):
                continue
            rt = ResourceType(
                group=spec["group"], version=version["name"], plural=names["plural"],
                kind=names["kind"], namespaced=spec.get("scope") == "Namespaced",
                singular=names.get("singular", ""), short_names=tuple(names.get("shortNames", [])),
                categories=tuple(names.get("categories", [])),
                status_subresource="status" in (version.get("subresources") or {}),
                printer_columns=list(version.get("additionalPrinterColumns") or []),
                schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                crd=crd["metadata"]["name"],
            )
            self.types[rt.key] = rt
        if not (crd.get("status") or {}).get("conditions"):
            status = {
                "acceptedNames": names,
                "storedVersions": [v["name"] for v in spec.get("versions", []) if v.get("storage")],
                "conditions": [
                    {"type": t, "status": "True", "reason": r, "message": m,
                     "lastTransitionTime": _now()}
                    for t, r, m in (("NamesAccepted", "NoConflicts", "no conflicts found"),
                                    ("Established", "InitialNamesAccepted",
                                     "the initial names have been accepted"))
                ],
            }
            old = crd
            new = copy.deepcopy(crd)
            new["status"] = status
            crd_type = self.types[("apiextensions.k8s.io", "v1", "customresourcedefinitions")]
            key = (crd_type.key, "", crd["metadata"]["name"])
            new["metadata"]["resourceVersion"] = self._next_rv()
            self.store[key] = new
            self._emit(crd_type, "MODIFIED", new, old)

    def _unregister_crd(self, crd: JSON) -> None:
        for key, rt in list(self.types.items()):
            if rt.crd == crd["metadata"]["name"]:
                del self.types[key]
                for skey in [k for k in self.store if k[0] == key]:
                    self._remove(rt, skey)

    # Watching.

    def _emit(self, rt: ResourceType, kind: str, obj: JSON, old: JSON | None) -> None:
        event = (int(obj["metadata"]["resourceVersion"]), rt.key, kind, copy.deepcopy(obj),
                 copy.deepcopy(old) if old is not None else None)
        self._events.append(event)
        for queue in list(self._watchers):
            queue.put_nowait(event)

    async def _watch(self, rt: ResourceType, ns: str, name: str,
                     params: Mapping[str, str]) -> AsyncIterator[Any]:
        try:
            labels = selectors.label_selector(params.get("labelSelector"))
            fields = selectors.field_selector(params.get("fieldSelector"))
        except selectors.SelectorError as e:
            raise APIError(400, "BadRequest", str(e)) from e

        def matches(obj: JSON | None) -> bool:
            return obj is not None and (not ns or obj["metadata"].get("namespace") == ns) and \
                (not name or obj["metadata"]["name"] == name) and \
                labels(obj["metadata"].get("labels") or {}) and fields(obj)

        bookmarks = params.get("allowWatchBookmarks") == "true"
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        since = params.get("resourceVersion", "")
        initial = params.get("sendInitialEvents") == "true"
        queue: asyncio.Queue = asyncio.Queue()
        self._watchers.add(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout if timeout else None
        try:
            yield b""  # send the headers now: a watch that sees nothing is still established
            last = self._last_rv
            if initial or since in ("", "0"):
                for obj in self._select(rt, ns, params):
                    if matches(obj):
                        yield {"type": "ADDED", "object": copy.deepcopy(obj)}
                if initial:
                    yield {"type": "BOOKMARK", "object": {
                        "kind": rt.kind, "apiVersion": rt.api_version,
                        "metadata": {"resourceVersion": str(last),
                                     "annotations": {"k8s.io/initial-events-end": "true"}}}}
            else:
                start = int(since) if since.isdigit() else 0
                oldest = self._events[0][0] if self._events else last
                if start < oldest - 1 and start < last:
                    yield {"type": "ERROR", "object": APIError(
                        410, "Expired", f"too old resource version: {start} ({oldest})").status()}
                    return
                for event in list(self._events):
                    if event[0] > start and event[0] <= last:
                        out = self._translate(event, rt, matches)
                        if out is not None:
                            yield out
            # Events already replayed above are also in the queue only if they came after
            # `last`; the queue was registered first, so skip what is not newer than `last`.
            sent = loop.time()
            while True:
                wait = self.bookmark_interval if bookmarks else None
                if deadline is not None:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        return
                    wait = remaining if wait is None else min(wait, remaining)
                try:
                    event = await asyncio.wait_for(queue.get(), wait)
                    if event is None:  # drop_watches()
                        return
                except TimeoutError:
                    if bookmarks:
                        yield {"type": "BOOKMARK", "object": {
                            "kind": rt.kind, "apiVersion": rt.api_version,
                            "metadata": {"resourceVersion": str(self._last_rv)}}}
                    continue
                if event[0] <= last:
                    continue
                out = self._translate(event, rt, matches)
                if out is not None:
                    yield out
                    sent = loop.time()
                elif bookmarks and loop.time() - sent >= self.bookmark_interval:
                    # Other kinds' events keep coming (heartbeat Leases, many a second): a
                    # quiet watch still gets its bookmark every interval, as from an API
                    # server, or it resumes from a version long out of the history (410).
                    yield {"type": "BOOKMARK", "object": {
                        "kind": rt.kind, "apiVersion": rt.api_version,
                        "metadata": {"resourceVersion": str(event[0])}}}
                    sent = loop.time()
        finally:
            self._watchers.discard(queue)

    @staticmethod
    def _translate(event: tuple, rt: ResourceType, matches: Any) -> JSON | None:
        _, key, kind, obj, old = event
        if key != rt.key:
            return None
        now, before = matches(obj), matches(old)
        if kind == "MODIFIED" and now and not before:
            kind = "ADDED"
        elif kind == "MODIFIED" and before and not now:
            kind = "DELETED"
        elif not now:
            return None
        return {"type": kind, "object": obj}


def kubeconfig(server: str, context: str = "emulator", token_file: str = "") -> str:
    """A kubeconfig text pointing at ``server`` with a dummy token (the emulator allows all
    unless :attr:`KubeAPI.tokens` is set), or with ``token_file`` (a projected token)."""
    user = {"tokenFile": token_file} if token_file else {"token": "emulator"}
    return json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": context,
        "clusters": [{"name": context, "cluster": {"server": server}}],
        "users": [{"name": context, "user": user}],
        "contexts": [{"name": context, "context": {"cluster": context, "user": context,
                                                    "namespace": "default"}}],
    }, indent=2)

