"""Where the Kubernetes API server is and how to authenticate: one loader for the operator
and the node agent (in-cluster service account, or a kubeconfig and context)."""

from __future__ import annotations

import base64
import dataclasses
import os
import tempfile

import kopf


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
