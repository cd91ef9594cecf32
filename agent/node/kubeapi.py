"""The few Kubernetes API calls the agent makes itself (kopf does the watching).

Everything the agent does to the API: ``GET`` its own NodeImageSet, ``PATCH`` its
``/status``, ``GET`` pull-secret copies in the operator namespace, ``POST`` Events. One
choke point (:meth:`Client.request`) turns HTTP failures into :class:`APIError`.

"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Mapping
from typing import Any

import httpx

import agent
from agent.kube import connections, resources

JSON = dict[str, Any]

#: Namespace of Events about cluster-scoped objects (as kubectl and kopf use).
CLUSTER_EVENTS_NAMESPACE = "default"


class APIError(Exception):
    """A failed API call: ``status`` (0 for a network error), ``reason``, message."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


#: Re-exported from :mod:`agent.kube.connections` (shared with the operator).
Connection = connections.Connection
load_connection = connections.load_connection


def node_set_path(name: str, subresource: str = "") -> str:
    path = f"/apis/{resources.API_VERSION}/{resources.NODE_SETS}/{name}"
    return f"{path}/{subresource}" if subresource else path


def secret_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets/{name}"


class Client:
    """A small async JSON client for the calls above."""

    def __init__(self, connection: Connection, *, timeout: float = 30.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        verify: Any = False if connection.insecure else (connection.ca_path or True)
        cert: str | tuple[str, str] | None = None
        if connection.cert_path:
            cert = (connection.cert_path, connection.key_path) if connection.key_path \
                else connection.cert_path
        headers = {"User-Agent": f"image-prefetcher-agent/{agent.__version__}",
                   "Accept": "application/json"}
        if connection.token:
            headers["Authorization"] = f"Bearer {connection.token}"
        self._http = httpx.AsyncClient(base_url=connection.server, verify=verify, cert=cert,
                                       headers=headers, timeout=timeout, transport=transport)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, *, body: Any = None,
                      content_type: str = "application/json") -> JSON:
        try:
            response = await self._http.request(
                method, path, json=body,
                headers={"Content-Type": content_type} if body is not None else None,
            )
        except httpx.HTTPError as e:
            raise APIError(0, "Unavailable", f"{method} {path}: {e}") from e
        if response.status_code >= 400:
            try:
                status = response.json()
            except ValueError:
                status = {}
            message = status.get("message") or response.text[:200]
            raise APIError(response.status_code, status.get("reason") or response.reason_phrase,
                           f"{method} {path}: {message}")
        result: JSON = response.json() if response.content else {}
        return result

    async def get(self, path: str) -> JSON | None:
        """The object, or None when it does not exist."""
        try:
            return await self.request("GET", path)
        except APIError as e:
            if e.status == 404:
                return None
            raise

    async def patch_status(self, node: str, status: Mapping[str, Any]) -> JSON:
        """Merge-patch ``status`` into the node's NodeImageSet (the status subresource)."""
        return await self.request("PATCH", node_set_path(node, "status"),
                                  body={"status": dict(status)},
                                  content_type="application/merge-patch+json")

    async def post_event(self, involved: Mapping[str, Any], *, type: str, reason: str,
                         message: str, component: str, host: str) -> None:
        """Create a core/v1 Event about ``involved`` (``apiVersion``/``kind``/``name``/``uid``)."""
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
