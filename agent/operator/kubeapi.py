"""The few Kubernetes API calls the operator makes itself (kopf does the watching).

One choke point (:meth:`Client.request`) turns HTTP failures into :mod:`.errors` (and
counts them for the metrics); NodeImageSet spec writes go through :mod:`.writing`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import httpx

from agent.kube import connections, resources
from agent.operator import errors

JSON = dict[str, Any]
CONFLICT_RETRIES = 10


#: Re-exported from :mod:`agent.kube.connections` (shared with the node agent).
Connection = connections.Connection
load_connection = connections.load_connection


class Client:
    """A small async JSON client for the Kubernetes API."""

    def __init__(self, connection: Connection, *, timeout: float = 30.0,
                 on_error: Callable[[str, int | str], None] | None = None) -> None:
        verify: Any = False if connection.insecure else (connection.ca_path or True)
        cert: str | tuple[str, str] | None = None
        if connection.cert_path:
            cert = (connection.cert_path, connection.key_path) if connection.key_path \
                else connection.cert_path
        headers = {"User-Agent": "image-prefetcher-operator", "Accept": "application/json"}
        if connection.token:
            headers["Authorization"] = f"Bearer {connection.token}"
        self._http = httpx.AsyncClient(base_url=connection.server, verify=verify, cert=cert,
                                       headers=headers, timeout=timeout)
        self.requests = 0
        #: Called with (verb, HTTP status or "network") for every failed request.
        self.on_error = on_error

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, *, body: Any = None,
                      params: Mapping[str, str] | None = None,
                      content_type: str = "application/json", verb: str = "") -> JSON:
        self.requests += 1
        verb = verb or {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch",
                        "DELETE": "delete"}.get(method, method.lower())
        try:
            response = await self._http.request(
                method, path, json=body, params=params,
                headers={"Content-Type": content_type} if body is not None else None,
            )
        except httpx.HTTPError as e:
            if self.on_error is not None:
                self.on_error(verb, "network")
            raise errors.APIError(503, "Unavailable", f"{method} {path}: {e}") from e
        if response.status_code >= 400:
            if self.on_error is not None:
                self.on_error(verb, response.status_code)
            try:
                status = response.json()
            except ValueError:
                status = {}
            message = status.get("message") or response.text[:200]
            reason = status.get("reason") or response.reason_phrase
            cls = {409: errors.Conflict, 404: errors.NotFound}.get(response.status_code,
                                                                    errors.APIError)
            raise cls(response.status_code, reason, f"{method} {path}: {message}")
        result: JSON = response.json() if response.content else {}
        return result

    async def get(self, path: str) -> JSON | None:
        try:
            return await self.request("GET", path)
        except errors.NotFound:
            return None

    async def list(self, path: str, **params: str) -> list[JSON]:
        result = await self.request("GET", path, params={k: v for k, v in params.items() if v},
                                    verb="list")
        items: list[JSON] = result.get("items") or []
        return items

    async def create(self, path: str, body: JSON) -> JSON:
        return await self.request("POST", path, body=body)

    async def replace(self, path: str, body: JSON) -> JSON:
        return await self.request("PUT", path, body=body)

    async def merge_patch(self, path: str, body: JSON) -> JSON:
        return await self.request("PATCH", path, body=body,
                                  content_type="application/merge-patch+json")

    async def delete(self, path: str, *, resource_version: str = "") -> None:
        """DELETE (gone already is fine); with ``resource_version``, only that version
        (``preconditions``: 409 Conflict if the object changed since it was read)."""
        body = None
        if resource_version:
            body = {"apiVersion": "v1", "kind": "DeleteOptions",
                    "preconditions": {"resourceVersion": resource_version}}
        try:
            await self.request("DELETE", path, body=body)
        except errors.NotFound:
            pass


# Paths.

def node_set_path(name: str = "") -> str:
    base = f"/apis/{resources.API_VERSION}/{resources.NODE_SETS}"
    return f"{base}/{name}" if name else base


def prefetch_path(namespace: str, name: str, subresource: str = "") -> str:
    path = f"/apis/{resources.API_VERSION}/namespaces/{namespace}/{resources.PREFETCHES}/{name}"
    return f"{path}/{subresource}" if subresource else path


def secret_path(namespace: str, name: str = "") -> str:
    base = f"/api/v1/namespaces/{namespace}/secrets"
    return f"{base}/{name}" if name else base


def daemonset_path(namespace: str, name: str = "") -> str:
    base = f"/apis/apps/v1/namespaces/{namespace}/daemonsets"
    return f"{base}/{name}" if name else base


def pods_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/pods"


def configmap_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps/{name}"
