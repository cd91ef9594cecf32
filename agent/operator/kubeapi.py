"""The few Kubernetes API calls the operator makes itself (kopf does the watching).

One choke point (:meth:`Client.request`) turns HTTP failures into :mod:`.errors` (and
counts them for the metrics); NodeImageSet spec writes go through :mod:`.writing`.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import httpx
import kopf

from agent.kube import resources
from agent.operator import errors

JSON = dict[str, Any]
CONFLICT_RETRIES = 10


@dataclasses.dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate (from a kubeconfig or in-cluster)."""

    server: str
    token: str | None = None
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False
    namespace: str | None = None

    def to_kopf(self) -> kopf.ConnectionInfo:
        return kopf.ConnectionInfo(
            server=self.server, token=self.token, scheme="Bearer" if self.token else None,
            ca_path=self.ca_path, certificate_path=self.cert_path,
            private_key_path=self.key_path, insecure=self.insecure,
            default_namespace=self.namespace,
        )


def _materialise(value: str | None, suffix: str) -> str | None:
    """kubernetes' loader gives file paths (it writes inline data to temp files itself)."""
    if not value:
        return None
    if os.path.exists(value):
        return value
    fd, path = tempfile.mkstemp(suffix=suffix)  # pragma: no cover - inline data only
    os.write(fd, base64.b64decode(value))
    os.close(fd)
    return path


def load_connection(kubeconfig: str = "", context: str = "") -> Connection:
    """In-cluster service account when no kubeconfig is given and we run in a pod; else
    ``kubeconfig`` (or $KUBECONFIG, ~/.kube/config) at ``context`` (or its current one)."""
    import kubernetes

    cfg = kubernetes.client.Configuration()
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    else:
        kubernetes.config.load_kube_config(
            config_file=kubeconfig or None, context=context or None, client_configuration=cfg,
        )
    auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    token = auth.split(" ", 1)[1] if auth and " " in auth else auth
    return Connection(
        server=cfg.host, token=token, ca_path=_materialise(cfg.ssl_ca_cert, ".crt"),
        cert_path=cfg.cert_file, key_path=cfg.key_file, insecure=not cfg.verify_ssl,
    )


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

    async def delete(self, path: str) -> None:
        try:
            await self.request("DELETE", path)
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
