"""The one Kubernetes API client of the operator and the node agent (kopf does the watching).

A small async JSON client on httpx. One choke point, :meth:`Client.request`, sends the
current bearer token (re-read from its file, :mod:`.connections`), retries once after a 401
with the token re-read (a rotated token), and turns every failure into :mod:`.errors` —
the same error for the same failure in both components. :meth:`Client.list` pages with
``limit``/``continue`` as client-go's pager does.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import httpx

import agent
from agent.kube import connections, errors, resources

JSON = dict[str, Any]

#: Items per page of a list (client-go's pager default is 500).
PAGE_SIZE = 500
#: Retries of a request answered with Retry-After (429, or 5xx with the header), as
#: client-go's request retries (its default is 10).
RETRY_AFTER_RETRIES = 10
#: Longest wait honoured from one Retry-After (seconds).
RETRY_AFTER_MAX = 30.0
#: Namespace of Events about cluster-scoped objects (as kubectl and kopf use).
CLUSTER_EVENTS_NAMESPACE = "default"

Connection = connections.Connection
load_connection = connections.load_connection

_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, (when - datetime.datetime.now(datetime.UTC)).total_seconds())


class Client:
    """Async JSON requests to the Kubernetes API as ``user_agent``."""

    def __init__(self, connection: Connection, *, user_agent: str = "image-prefetcher",
                 timeout: float = 30.0, transport: httpx.AsyncBaseTransport | None = None,
                 on_error: Callable[[str, int | str], None] | None = None) -> None:
        self.connection = connection
        verify: Any = False if connection.insecure else (connection.ca_path or True)
        cert: str | tuple[str, str] | None = None
        if connection.cert_path:
            cert = (connection.cert_path, connection.key_path) if connection.key_path \
                else connection.cert_path
        headers = {"User-Agent": f"{user_agent}/{agent.__version__}",
                   "Accept": "application/json"}
        self._http = httpx.AsyncClient(base_url=connection.server, verify=verify, cert=cert,
                                       headers=headers, timeout=timeout, transport=transport)
        #: Requests sent (for the benchmark and tests).
        self.requests = 0
        #: Called with (verb, HTTP status or "network") for every failed request.
        self.on_error = on_error

    async def aclose(self) -> None:
        await self._http.aclose()

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Content-Type": content_type} if content_type else {}
        token = self.connection.current_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return headers

    async def request(self, method: str, path: str, *, body: Any = None,
                      params: Mapping[str, str] | None = None,
                      content_type: str = "application/json", verb: str = "") -> JSON:
        """Send one request; the JSON answer, or an :class:`errors.APIError`.

        Retried here: once after a 401 (the token file is re-read), and up to
        :data:`RETRY_AFTER_RETRIES` times when the server says when to come back
        (``Retry-After`` on a 429 or 5xx), as client-go does."""
        verb = verb or _VERBS.get(method, method.lower())
        relogged = False
        retries = 0
        while True:
            self.requests += 1
            try:
                response = await self._http.request(
                    method, path, json=body, params=params,
                    headers=self._headers(content_type if body is not None else None))
            except httpx.HTTPError as e:
                if self.on_error is not None:
                    self.on_error(verb, "network")
                raise errors.Unavailable(0, "Unavailable", f"{method} {path}: {e}") from e
            if response.status_code == 401 and not relogged \
                    and self.connection.token_rejected():
                relogged = True
                continue  # the token file may hold a rotated token by now
            wait = _retry_after(response)
            if wait is not None and (response.status_code == 429
                                     or response.status_code >= 500) \
                    and retries < RETRY_AFTER_RETRIES:
                retries += 1
                if self.on_error is not None:
                    self.on_error(verb, response.status_code)
                await asyncio.sleep(min(wait, RETRY_AFTER_MAX))
                continue
            break
        if response.status_code >= 400:
            if self.on_error is not None:
                self.on_error(verb, response.status_code)
            try:
                status = response.json()
            except ValueError:
                status = {}
            if not isinstance(status, dict):
                status = {}
            message = status.get("message") or response.text[:200]
            reason = status.get("reason") or response.reason_phrase
            raise errors.from_status(response.status_code, reason, f"{method} {path}: {message}",
                                     retry_after=_retry_after(response))
        result: JSON = response.json() if response.content else {}
        return result

    async def get(self, path: str) -> JSON | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except errors.NotFound:
            return None

    def pages(self, path: str, *, limit: int = PAGE_SIZE,
              **params: str) -> AsyncIterator[list[JSON]]:
        """The list at ``path`` page by page (``limit``/``continue``); see :meth:`_pages`."""
        return self._pages(path, limit, params)

    async def _pages(self, path: str, limit: int,
                     params: Mapping[str, str]) -> AsyncIterator[list[JSON]]:
        """The list at ``path`` page by page (``limit``/``continue``); a ``continue`` token
        that expired (410) restarts the list, as client-go's pager falls back to a full list."""
        query = {k: v for k, v in params.items() if v}
        token = ""
        while True:
            page_params = {**query, "limit": str(limit), **({"continue": token} if token else {})}
            try:
                result = await self.request("GET", path, params=page_params, verb="list")
            except errors.Gone:
                if not token:
                    raise
                token = ""
                continue
            yield list(result.get("items") or [])
            token = (result.get("metadata") or {}).get("continue") or ""
            if not token:
                return

    async def list(self, path: str, **params: str) -> list[JSON]:
        """Every item of the list at ``path`` (paginated)."""
        items: list[JSON] = []
        async for page in self._pages(path, PAGE_SIZE, params):
            items.extend(page)
        return items

    async def watch(self, path: str, resource_version: str, *, timeout: int = 300,
                    **params: str) -> AsyncIterator[JSON]:
        """The events of a watch from ``resource_version`` until the server ends it
        (``timeoutSeconds``) or the connection drops. An ``ERROR`` event raises its status
        (410 :class:`errors.Gone`: relist); bookmarks are passed on (type ``BOOKMARK``)."""
        query = {**{k: v for k, v in params.items() if v}, "watch": "true",
                 "resourceVersion": resource_version, "allowWatchBookmarks": "true",
                 "timeoutSeconds": str(timeout)}
        self.requests += 1
        try:
            async with self._http.stream("GET", path, params=query, headers=self._headers(None),
                                         timeout=httpx.Timeout(30.0, read=timeout + 30.0)) \
                    as response:
                if response.status_code >= 400:
                    await response.aread()
                    if response.status_code == 401:
                        self.connection.token_rejected()
                    status = response.json() if response.content else {}
                    raise errors.from_status(response.status_code,
                                             status.get("reason") or response.reason_phrase,
                                             f"watch {path}: {status.get('message', '')}")
                async for line in response.aiter_lines():
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    if event.get("type") == "ERROR":
                        status = event.get("object") or {}
                        raise errors.from_status(int(status.get("code") or 500),
                                                 status.get("reason") or "Error",
                                                 f"watch {path}: {status.get('message', '')}")
                    yield event
        except httpx.HTTPError as e:
            if self.on_error is not None:
                self.on_error("watch", "network")
            raise errors.Unavailable(0, "Unavailable", f"watch {path}: {e}") from e

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: JSON) -> JSON:
        """PUT: with ``metadata.resourceVersion`` in ``body``, 409 Conflict if it changed."""
        return await self.request("PUT", path, body=body)

    async def merge_patch(self, path: str, body: JSON) -> JSON:
        return await self.request("PATCH", path, body=body,
                                  content_type="application/merge-patch+json")

    async def json_patch(self, path: str, operations: Sequence[JSON]) -> JSON:
        """A JSON patch (RFC 6902): a failed ``test`` operation is a 422, nothing written."""
        return await self.request("PATCH", path, body=list(operations),
                                  content_type="application/json-patch+json")

    async def delete(self, path: str, *, resource_version: str = "", uid: str = "") -> None:
        """DELETE (gone already is fine); with ``resource_version``, only that version,
        with ``uid``, only that object, not one re-created under the same name since it was
        read (``preconditions``: 409 Conflict otherwise)."""
        body = None
        preconditions = {k: v for k, v in (("resourceVersion", resource_version),
                                            ("uid", uid)) if v}
        if preconditions:
            body = {"apiVersion": "v1", "kind": "DeleteOptions",
                    "preconditions": preconditions}
        try:
            await self.request("DELETE", path, body=body)
        except errors.NotFound:
            pass

    async def post_event(self, involved: Mapping[str, Any], *, type: str, reason: str,
                         message: str, component: str, host: str) -> None:
        """Create a core/v1 Event about ``involved`` (``apiVersion``/``kind``/``name``/``uid``,
        and ``namespace`` unless cluster-scoped)."""
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = involved.get("namespace") or CLUSTER_EVENTS_NAMESPACE
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{involved['name']}.{uuid.uuid4().hex[:16]}",
                         "namespace": namespace},
            "involvedObject": dict(involved),
            "type": type, "reason": reason, "message": message[:1024],
            "source": {"component": component, "host": host},
            "reportingComponent": component, "reportingInstance": host,
            "firstTimestamp": now, "lastTimestamp": now, "count": 1,
        }
        await self.request("POST", f"/api/v1/namespaces/{namespace}/events", body=body)


# Paths.

def node_set_path(name: str = "", subresource: str = "") -> str:
    base = f"/apis/{resources.API_VERSION}/{resources.NODE_SETS}"
    path = f"{base}/{name}" if name else base
    return f"{path}/{subresource}" if subresource else path


def prefetch_path(namespace: str, name: str, subresource: str = "") -> str:
    path = f"/apis/{resources.API_VERSION}/namespaces/{namespace}/{resources.PREFETCHES}/{name}"
    return f"{path}/{subresource}" if subresource else path


def secret_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/secrets"
    return f"{base}/{name}" if name else base


def lease_path(namespace: str, name: str = "") -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return f"{base}/{name}" if name else base


def daemonset_path(namespace: str, name: str = "") -> str:
    base = f"/apis/apps/v1/namespaces/{namespace}/daemonsets"
    return f"{base}/{name}" if name else base


def pods_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods"


def configmap_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps/{name}"
