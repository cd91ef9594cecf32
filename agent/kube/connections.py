"""Where the Kubernetes API server is and how to authenticate: one loader for the operator
and the node agent (in-cluster service account, or a kubeconfig and context).

A bearer token that comes from a file (the projected service-account token in a pod, or a
kubeconfig user's ``tokenFile``) is re-read from that file, as client-go does: the kubelet
rotates bound tokens (they expire after an hour without the API server's extension), so a
token read once at start is rejected with 401 later. :meth:`Connection.current_token` gives
the file's content, re-read at most every :data:`TOKEN_REFRESH` seconds and at once after a
401 (:meth:`Connection.token_rejected`).
"""

from __future__ import annotations

import base64
import dataclasses
import os
import tempfile
import time

import kopf
import yaml

#: Seconds a token read from a file is reused before the file is read again (client-go: 1m).
TOKEN_REFRESH = 60.0


@dataclasses.dataclass
class Connection:
    """Where the API server is and how to authenticate (from a kubeconfig or in-cluster)."""

    server: str
    token: str | None = None
    ca_path: str | None = None
    cert_path: str | None = None
    key_path: str | None = None
    insecure: bool = False
    namespace: str | None = None
    #: The file the token comes from (re-read), or None for a fixed token.
    token_path: str | None = None
    _read_at: float = dataclasses.field(default=-1e18, repr=False, compare=False)

    def current_token(self) -> str | None:
        """The bearer token to send now: the token file's content, re-read when the last
        read is older than :data:`TOKEN_REFRESH` (or after :meth:`token_rejected`)."""
        if self.token_path and time.monotonic() - self._read_at >= TOKEN_REFRESH:
            try:
                with open(self.token_path, encoding="utf-8") as f:
                    self.token = f.read().strip() or self.token
            except OSError:
                pass  # keep the last token; the file is being replaced (atomic rename)
            self._read_at = time.monotonic()
        return self.token

    def token_rejected(self) -> bool:
        """A request got 401: read the token file again at the next request. True if there
        is a file to re-read (so retrying may help)."""
        self._read_at = -1e18
        return self.token_path is not None

    def to_kopf(self) -> kopf.ConnectionInfo:
        """For kopf's ``@kopf.on.login`` handler: kopf calls it again after a 401, and this
        re-reads the token file then."""
        self.token_rejected()
        token = self.current_token()
        return kopf.ConnectionInfo(
            server=self.server, token=token, scheme="Bearer" if token else None,
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
    token_path: str | None = None
    if not kubeconfig and os.environ.get("KUBERNETES_SERVICE_HOST"):
        kubernetes.config.load_incluster_config(client_configuration=cfg)
        token_path = kubernetes.config.incluster_config.SERVICE_TOKEN_FILENAME
    else:
        kubernetes.config.load_kube_config(
            config_file=kubeconfig or None, context=context or None, client_configuration=cfg,
        )
        token_path = _token_file(kubeconfig, context)
    auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    token = auth.split(" ", 1)[1] if auth and " " in auth else auth
    return Connection(
        server=cfg.host, token=token, ca_path=_materialise(cfg.ssl_ca_cert, ".crt"),
        cert_path=cfg.cert_file, key_path=cfg.key_file, insecure=not cfg.verify_ssl,
        token_path=token_path,
    )


def _token_file(kubeconfig: str, context: str) -> str | None:
    """The ``tokenFile`` of the kubeconfig user at ``context`` (its current one by default),
    relative to the kubeconfig's directory, or None."""
    path = kubeconfig or os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or \
        os.path.expanduser("~/.kube/config")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return None
    name = context or doc.get("current-context") or ""
    ctx = next((c.get("context") or {} for c in doc.get("contexts") or []
                if c.get("name") == name), {})
    user = next((u.get("user") or {} for u in doc.get("users") or []
                 if u.get("name") == ctx.get("user")), {})
    token_file = user.get("tokenFile")
    if not token_file or user.get("token"):
        return None  # client-go: an inline token wins over tokenFile
    return str(os.path.join(os.path.dirname(os.path.abspath(path)), token_file))
