"""Registry credentials from docker ``config.json`` files and Kubernetes pull secrets.

The format is docker's ``config.json`` (also podman's ``auth.json``, and the body of a
``kubernetes.io/dockerconfigjson`` Secret)::

    {"auths": {
        "https://index.docker.io/v1/": {"auth": "<base64 user:password>"},
        "registry.example.com:5000":   {"username": "u", "password": "p"},
        "quay.io/team":                {"auth": "…"},
        "*.azurecr.io":                {"identitytoken": "<refresh token>"}},
     "credHelpers": {"gcr.io": "gcloud"}, "credsStore": "desktop"}

Keys are normalised as docker does: a scheme and, after one, the path are dropped
(``https://index.docker.io/v1/`` → ``docker.io``); Docker Hub's names (``docker.io``,
``index.docker.io``, ``registry-1.docker.io``) are one registry. A key without a scheme
may carry a repository namespace (``quay.io/team``), as podman and kubelet allow; it
applies to that namespace only and wins over the registry-wide key. A ``*`` label matches
one DNS label (``*.azurecr.io``), as kubelet allows in pull secrets.

Credential helpers (``credHelpers``, ``credsStore``) run programs; they are not
supported, and the hosts they cover are logged once, with a warning, when looked up.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.images import errors

logger = logging.getLogger(__name__)

#: The canonical name under which Docker Hub credentials are kept.
DOCKER_HUB = "docker.io"
_DOCKER_HUB_ALIASES = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


#: A credentials file or pull secret that cannot be read (the one error tree's class).
CredentialsConfigError = errors.InvalidConfiguration


@dataclass(frozen=True, repr=False)
class Credential:
    """What to authenticate to one registry with.

    Attributes:
        username / password: for Basic auth, or for the token server's Basic auth.
        identity_token: an OAuth2 refresh token (``docker login`` with an identity
            provider); exchanged for a bearer token at the registry's token server.
        registry_token: a bearer token to send to the registry as it is.
    """

    username: str = ""
    password: str = ""
    identity_token: str = ""
    registry_token: str = ""

    def __repr__(self) -> str:
        shown = [f"username={self.username!r}"]
        for name in ("password", "identity_token", "registry_token"):
            if getattr(self, name):
                shown.append(f"{name}='***'")
        return f"Credential({', '.join(shown)})"

    def __str__(self) -> str:
        return repr(self)

    @property
    def is_empty(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)


class Keychain:
    """Credentials by registry host (and optionally repository namespace).

    Build one with :meth:`from_docker_config`, :meth:`from_docker_config_json`,
    :meth:`from_dockerconfigjson_secret`, :meth:`merged` or :meth:`empty`.
    """

    def __init__(
        self,
        entries: Mapping[str, Credential] | None = None,
        *,
        helpers: Mapping[str, str] | None = None,
        default_helper: str = "",
        source: str = "",
        parents: tuple[Keychain, ...] = (),
    ):
        self._entries: dict[str, Credential] = {}
        for key, cred in (entries or {}).items():
            self._entries.setdefault(normalize_key(key), cred)
        self._helpers = {normalize_key(k): v for k, v in (helpers or {}).items()}
        self._default_helper = default_helper
        self._parents = parents
        self.source = source
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        keys = sorted(self._entries)
        return f"Keychain(source={self.source!r}, keys={keys!r}, parents={len(self._parents)})"

    def __bool__(self) -> bool:
        return bool(self._entries or self._helpers or self._default_helper) or any(self._parents)

    @property
    def keys(self) -> list[str]:
        """The normalised keys this keychain holds credentials for (never the secrets)."""
        own = list(self._entries)
        for parent in self._parents:
            own += [k for k in parent.keys if k not in own]
        return own

    def lookup(self, host: str, repository: str = "") -> Credential | None:
        """The credential for ``host`` (a reference domain or a registry host, with port),
        or ``None`` to go anonymous.

        Order: a key for the repository's namespace (longest first, when ``repository``
        is given), then the exact host, then ``*`` wildcard keys. Merged keychains are
        asked in order; the first that knows the host wins.
        """
        for parent in self._parents:
            found = parent.lookup(host, repository)
            if found is not None:
                return found
        if self._parents and not self._entries:
            return None
        host = normalize_host(host)
        path = repository.strip("/")
        while path:
            cred = self._entries.get(f"{host}/{path}")
            if cred is not None:
                return cred
            path = path.rpartition("/")[0]
        cred = self._entries.get(host)
        if cred is not None:
            return cred
        for key, cred in self._entries.items():
            if "*" in key and "/" not in key and _glob_matches(key, host):
                return cred
        self._warn_helper(host)
        return None

    def _warn_helper(self, host: str) -> None:
        helper = self._helpers.get(host) or self._default_helper
        if helper and host not in self._warned:
            self._warned.add(host)
            kind = "credHelpers" if host in self._helpers else "credsStore"
            logger.warning(
                "%s: credentials for %s are in the %s %r (docker-credential-%s), which is not "
                'supported; pulling from %s anonymously (use a config with "auths" or an '
                "imagePullSecret)",
                self.source or "docker config",
                host,
                kind,
                helper,
                helper,
                host,
            )

    @classmethod
    def empty(cls) -> Keychain:
        """A keychain that knows no credentials (every lookup is anonymous)."""
        return cls(source="(none)")

    @classmethod
    def merged(cls, *keychains: Keychain) -> Keychain:
        """One keychain asking ``keychains`` in order (e.g. pull secrets, then the node's)."""
        return cls(parents=tuple(keychains), source=", ".join(k.source for k in keychains))

    @classmethod
    def from_docker_config(cls, path: str | Path) -> Keychain:
        """Read a docker ``config.json`` (or podman ``auth.json``).

        Raises:
            CredentialsConfigError: if it cannot be read or is malformed (naming the file).
            FileNotFoundError: if it does not exist.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise CredentialsConfigError(f"cannot read {path}: {e.strerror or e}") from e
        return cls.from_docker_config_json(data, source=str(path))

    @classmethod
    def from_docker_config_json(
        cls, data: bytes | str | Mapping[str, Any], source: str
    ) -> Keychain:
        """Parse a docker ``config.json`` body; ``source`` names it in errors and warnings.

        A body without ``auths`` whose top-level keys look like registries is read as the
        legacy ``.dockercfg`` form (``kubernetes.io/dockercfg`` Secrets).

        Raises:
            CredentialsConfigError: naming ``source`` and, where it applies, the entry.
        """
        if isinstance(data, bytes | str):
            try:
                doc = json.loads(data)
            except (ValueError, UnicodeDecodeError) as e:
                raise CredentialsConfigError(f"{source}: not valid JSON: {e}") from e
        else:
            doc = data
        if not isinstance(doc, Mapping):
            raise CredentialsConfigError(f"{source}: expected a JSON object")

        if "auths" in doc:
            auths = doc["auths"]
        elif (
            doc
            and not ({"credHelpers", "credsStore"} & set(doc))
            and all(isinstance(v, Mapping) for v in doc.values())
        ):
            auths = doc  # legacy .dockercfg: the registries are the top level
        else:
            auths = {}
        if auths is None:
            auths = {}
        if not isinstance(auths, Mapping):
            raise CredentialsConfigError(f'{source}: "auths" must be an object')

        entries: dict[str, Credential] = {}
        for key, entry in auths.items():
            cred = _parse_entry(entry, source, str(key))
            if cred is not None:
                entries[str(key)] = cred

        helpers = doc.get("credHelpers")
        if helpers is None:
            helpers = {}
        if not isinstance(helpers, Mapping):
            raise CredentialsConfigError(f'{source}: "credHelpers" must be an object')
        store = doc.get("credsStore")
        if store is None:
            store = ""
        if not isinstance(store, str):
            raise CredentialsConfigError(f'{source}: "credsStore" must be a string')
        return cls(
            entries,
            helpers={str(k): str(v) for k, v in helpers.items()},
            default_helper=store,
            source=source,
        )

    @classmethod
    def from_dockerconfigjson_secret(
        cls, secret_body: Mapping[str, Any] | bytes | str, source: str = "secret"
    ) -> Keychain:
        """Read a ``kubernetes.io/dockerconfigjson`` (or legacy ``dockercfg``) Secret.

        ``secret_body`` is the Secret's ``data`` (base64 values under ``.dockerconfigjson``
        or ``.dockercfg``), the whole Secret object (``data`` / ``stringData`` inside), or
        the decoded ``.dockerconfigjson`` bytes.

        Raises:
            CredentialsConfigError: naming ``source`` (e.g. ``secret ns/name``).
        """
        if isinstance(secret_body, bytes | str):
            return cls.from_docker_config_json(secret_body, source)
        if not isinstance(secret_body, Mapping):
            raise CredentialsConfigError(f"{source}: expected a Secret body")
        if isinstance(secret_body.get("stringData"), Mapping):
            for key in (".dockerconfigjson", ".dockercfg"):
                value = secret_body["stringData"].get(key)
                if isinstance(value, str):
                    return cls.from_docker_config_json(value, f"{source} stringData[{key}]")
        data = secret_body.get("data", secret_body)
        if not isinstance(data, Mapping):
            raise CredentialsConfigError(f"{source}: data must be an object")
        for key in (".dockerconfigjson", ".dockercfg"):
            if key not in data:
                continue
            value = data[key]
            where = f"{source} data[{key}]"
            if isinstance(value, bytes):
                return cls.from_docker_config_json(value, where)
            try:
                decoded = base64.b64decode(str(value), validate=True)
            except (binascii.Error, ValueError) as e:
                raise CredentialsConfigError(f"{where}: not valid base64: {e}") from e
            return cls.from_docker_config_json(decoded, where)
        raise CredentialsConfigError(
            f"{source}: has no .dockerconfigjson (is it of type kubernetes.io/dockerconfigjson?)"
        )


def default_keychain(
    auth_file: str | Path | None = None, env: Mapping[str, str] = os.environ
) -> Keychain:
    """The keychain a CLI pull uses: ``auth_file`` (``--auth-file``), else
    ``$REGISTRY_AUTH_FILE``, else ``$DOCKER_CONFIG/config.json``, else
    ``~/.docker/config.json``.

    A missing default file means no credentials. A file named by ``auth_file`` that does
    not exist is an error (a mistyped ``--auth-file`` should not pull anonymously).

    Raises:
        CredentialsConfigError: naming the file.
    """
    if auth_file:
        path = Path(auth_file)
        try:
            return Keychain.from_docker_config(path)
        except FileNotFoundError as e:
            raise CredentialsConfigError(f"auth file {path} does not exist") from e
    path = default_config_path(env)
    try:
        return Keychain.from_docker_config(path)
    except FileNotFoundError:
        logger.debug("no registry credentials file at %s", path)
        return Keychain.empty()


def default_config_path(env: Mapping[str, str] = os.environ) -> Path:
    """The credentials file :func:`default_keychain` reads when not told one."""
    if env.get("REGISTRY_AUTH_FILE"):
        return Path(env["REGISTRY_AUTH_FILE"])
    if env.get("DOCKER_CONFIG"):
        return Path(env["DOCKER_CONFIG"]) / "config.json"
    home = env.get("HOME")
    return (Path(home) if home else Path.home()) / ".docker" / "config.json"


def normalize_host(host: str) -> str:
    """``registry-1.docker.io`` / ``index.docker.io`` → ``docker.io``; lowercase."""
    host = host.strip().lower()
    return DOCKER_HUB if host in _DOCKER_HUB_ALIASES else host


def normalize_key(key: str) -> str:
    """A config key as a lookup key: ``https://index.docker.io/v1/`` → ``docker.io``;
    ``quay.io/team/`` → ``quay.io/team``; ``http://r.example:5000/v2`` → ``r.example:5000``."""
    key = key.strip()
    if "://" in key:
        key = key.split("://", 1)[1].split("/", 1)[0]
    host, _, path = key.strip("/").partition("/")
    host = normalize_host(host)
    return f"{host}/{path.strip('/')}" if path.strip("/") else host


def _glob_matches(pattern: str, host: str) -> bool:
    p_labels, h_labels = pattern.split("."), host.split(".")
    if len(p_labels) != len(h_labels):
        return False
    return all(fnmatch.fnmatchcase(h, p) for p, h in zip(p_labels, h_labels, strict=True))


def _parse_entry(entry: Any, source: str, key: str) -> Credential | None:
    where = f"{source}: auths[{key!r}]"
    if not isinstance(entry, Mapping):
        raise CredentialsConfigError(f"{where} must be an object")
    for name in ("auth", "username", "password", "identitytoken", "registrytoken"):
        if entry.get(name) is not None and not isinstance(entry[name], str):
            raise CredentialsConfigError(f"{where}.{name} must be a string")
    username = entry.get("username") or ""
    password = entry.get("password") or ""
    auth = entry.get("auth") or ""
    if auth:
        try:
            decoded = base64.b64decode(auth + "=" * (-len(auth) % 4), validate=True).decode()
        except (binascii.Error, ValueError) as e:
            raise CredentialsConfigError(
                f'{where}.auth is not base64 of "user:password": {e}'
            ) from e
        user, colon, secret = decoded.partition(":")
        if not colon:
            raise CredentialsConfigError(f'{where}.auth does not decode to "user:password"')
        username, password = user, secret
    cred = Credential(
        username=username,
        password=password,
        identity_token=entry.get("identitytoken") or "",
        registry_token=entry.get("registrytoken") or "",
    )
    return None if cred.is_empty else cred
