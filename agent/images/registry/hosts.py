"""Registry hosts: which endpoints serve a registry domain, and how to talk to each.

The configuration is containerd's ``hosts.toml`` directory (``config_path``, ``ctr
--hosts-dir``)::

    <config_path>/
      docker.io/hosts.toml            settings for references on docker.io
      registry.example.com:5000/...   a domain with a port (also spelled ``…_5000_``)
      _default/hosts.toml             used when no directory matches the domain

A ``hosts.toml``::

    server = "https://registry-1.docker.io"   # the upstream; default: the domain itself
    capabilities = ["pull", "resolve"]        # top-level keys configure the server

    [host."https://mirror.internal"]          # mirrors, tried first, in file order
      capabilities = ["pull", "resolve"]      # default: pull, resolve, push
      ca = "mirror.crt"                       # path(s), relative to the hosts.toml
      client = [["client.cert", "client.key"]]
      skip_verify = false
      override_path = false                   # true: the URL path is the API root
      [host."https://mirror.internal".header]
        x-custom = "value"

A directory without ``hosts.toml`` is read the way Docker reads ``/etc/docker/certs.d``:
``*.crt`` are CA files, ``x.cert`` with ``x.key`` are client pairs.

Resolving a tag to a digest is a trusted operation: callers use only hosts with the
``resolve`` capability for it, and may fetch by digest from hosts with ``pull``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

from agent.images import durations, errors

logger = logging.getLogger(__name__)

#: Every capability a host can have.
ALL_CAPABILITIES = frozenset({"pull", "resolve", "push"})
#: The directory used when no directory names the domain.
DEFAULT_DIR = "_default"
#: The host that serves the Docker Hub registry API for ``docker.io``.
DOCKER_HUB_HOST = "registry-1.docker.io"

_HOST_KEYS = frozenset(
    {
        "capabilities",
        "ca",
        "client",
        "skip_verify",
        "header",
        "override_path",
        "dial_timeout",
        "proxy",
    }
)
_ROOT_KEYS = _HOST_KEYS | {"server", "host"}


#: A ``hosts.toml`` that cannot be used (the one error tree's class, by its local name).
HostsConfigError = errors.InvalidConfiguration


@dataclass(frozen=True)
class RegistryHost:
    """One endpoint serving a registry domain (a mirror or the upstream server).

    Attributes:
        scheme: ``https`` or ``http``.
        host: ``host[:port]`` to connect to (``registry-1.docker.io``, ``[::1]:5000``).
        path: the API root (``/v2``, or ``/mirror/v2``, or with ``override_path`` exactly the
            configured path).
        capabilities: a subset of ``pull``, ``resolve``, ``push``.
        ca_files: extra CA bundles to trust (absolute paths), on top of the system ones.
        client_certs: ``(cert, key)`` pairs; ``key`` is ``""`` when the cert file holds both.
        skip_verify: do not verify the server's certificate (explicit opt-in only, or an
            implicit loopback registry, as Docker and containerd do).
        headers: extra headers for every request to this host.
        override_path: ``path`` is the API root as configured (no ``/v2`` is added).
        fallback_plain_http: try ``https`` first, and on a TLS or connection error retry the
            same request over ``http`` (loopback registries only).
        namespace: the reference's domain when this host is a mirror of it, else ``""``;
            sent as the ``ns`` query parameter, as containerd does.
        dial_timeout: seconds to wait for a connection, or ``None`` for the client's default.
        proxy: a proxy URL for this host, or ``""`` for the environment's.
    """

    scheme: str
    host: str
    path: str = "/v2"
    capabilities: frozenset[str] = ALL_CAPABILITIES
    ca_files: tuple[str, ...] = ()
    client_certs: tuple[tuple[str, str], ...] = ()
    skip_verify: bool = False
    headers: dict[str, str] = field(default_factory=dict, hash=False)
    override_path: bool = False
    fallback_plain_http: bool = False
    namespace: str = ""
    dial_timeout: float | None = None
    proxy: str = ""

    @property
    def base_url(self) -> str:
        """``scheme://host/path`` without a trailing slash."""
        return f"{self.scheme}://{self.host}{self.path.rstrip('/')}"

    def can(self, capability: str) -> bool:
        """Whether this host may be used for ``capability`` (``pull``, ``resolve``, ``push``)."""
        return capability in self.capabilities

    def url(self, repo_path: str, *parts: str) -> str:
        """The URL of ``<api root>/<repo_path>/<parts…>`` on this host.

        ``url("library/alpine", "manifests", "3.20")`` is
        ``https://registry-1.docker.io/v2/library/alpine/manifests/3.20``; with no
        ``repo_path`` it is the API root (``url("")`` → ``…/v2/``, the ping endpoint).
        A mirror's URL carries ``?ns=<domain>``.
        """
        segments = [s.strip("/") for s in (repo_path, *parts) if s and s.strip("/")]
        tail = "/".join(quote(s, safe="/:@") for s in segments)
        url = f"{self.base_url}/{tail}"
        if self.namespace:
            url += f"?ns={quote(self.namespace, safe=':[]')}"
        return url

    def as_plain_http(self) -> RegistryHost:
        """This host over ``http``, as used after a loopback fallback."""
        return replace(self, scheme="http", fallback_plain_http=False)


class RegistryHosts:
    """Answers "which endpoints, in order, serve this domain?" from a hosts directory.

    Files are read on every :meth:`for_domain` call, so edits under ``config_path`` apply
    without a restart (as in containerd).

    Args:
        config_path: the hosts directory, or ``None`` for none (upstream only).
        plain_http: use ``http`` for every host (``ctr --plain-http``).
        skip_verify: do not verify any host's certificate (``ctr --skip-verify``).
        headers: headers sent to every host (a host's own headers win).
    """

    def __init__(
        self,
        config_path: str | Path | None = None,
        *,
        plain_http: bool = False,
        skip_verify: bool = False,
        headers: Mapping[str, str] | None = None,
        mirrors: Mapping[str, Sequence[str]] | None = None,
    ):
        self.config_path = Path(config_path) if config_path else None
        self.plain_http = plain_http
        self.skip_verify = skip_verify
        self.headers = dict(headers or {})
        #: domain → mirror URLs, tried in order before the upstream, for domains that have
        #: no hosts.toml (a hosts.toml for the same domain wins).
        self.mirrors = {k: list(v) for k, v in (mirrors or {}).items()}

    def for_domain(self, domain: str) -> list[RegistryHost]:
        """The endpoints for ``domain`` (a reference's domain), to be tried in order:
        the mirrors in file order, then the ``server`` (a file without one means the
        domain's own upstream: ``docker.io`` → ``https://registry-1.docker.io``, else
        ``https://<domain>``, loopback domains with the plain-HTTP fallback).

        Raises:
            HostsConfigError: for an unreadable or invalid ``hosts.toml``, naming the file
                and the key.
        """
        directory = self.directory_for(domain)
        hosts = _load_directory(directory) if directory else None
        if hosts is None and self.mirrors.get(domain):
            hosts = parse_hosts_toml(
                "".join(
                    f'[host."{url}"]\ncapabilities = ["pull", "resolve"]\n'
                    for url in self.mirrors[domain]
                ),
                f"images.registry.mirrors[{domain!r}]",
            )
        upstream = _upstream(domain)
        if hosts is None:
            hosts = [upstream]
        else:
            last = hosts[-1]
            if not last.host:  # no `server`: the upstream with the file's root settings
                hosts[-1] = replace(
                    last,
                    scheme=upstream.scheme,
                    host=upstream.host,
                    path="/v2",
                    fallback_plain_http=upstream.fallback_plain_http,
                    skip_verify=last.skip_verify or upstream.skip_verify,
                )
        return [self._finish(h, domain) for h in hosts]

    def directory_for(self, domain: str) -> Path | None:
        """The host directory that configures ``domain``: ``host_port_``, ``host:port``,
        then ``_default``; ``None`` when there is none."""
        if self.config_path is None:
            return None
        candidates = []
        host, port = split_host_port(domain)
        if port:
            candidates.append(f"{host}_{port}_")
        candidates += [domain, DEFAULT_DIR]
        for name in candidates:
            path = self.config_path / name
            if path.is_dir():
                return path
        return None

    def _finish(self, host: RegistryHost, domain: str) -> RegistryHost:
        headers = {**self.headers, **host.headers}
        namespace = "" if _same_host(host.host, domain) else domain
        if self.plain_http:
            return replace(
                host, scheme="http", fallback_plain_http=False, headers=headers, namespace=namespace
            )
        return replace(
            host,
            skip_verify=host.skip_verify or self.skip_verify,
            headers=headers,
            namespace=namespace,
        )


def split_host_port(domain: str) -> tuple[str, str]:
    """``"[::1]:5000"`` → ``("::1", "5000")``; ``"example.com"`` → ``("example.com", "")``."""
    if domain.startswith("["):
        end = domain.find("]")
        if end != -1:
            rest = domain[end + 1 :]
            return domain[1:end], rest[1:] if rest.startswith(":") else ""
    host, colon, port = domain.rpartition(":")
    if colon and port.isdigit() and ":" not in host:
        return host, port
    return domain, ""


def is_loopback(domain: str) -> bool:
    """Whether ``domain`` (``host[:port]``) is ``localhost``, in ``127.0.0.0/8`` or ``::1``."""
    host, _ = split_host_port(domain)
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _upstream(domain: str) -> RegistryHost:
    """The host a domain means with no configuration, as containerd defaults it."""
    if domain in ("docker.io", "index.docker.io"):
        return RegistryHost(scheme="https", host=DOCKER_HUB_HOST)
    if is_loopback(domain):
        _, port = split_host_port(domain)
        if port == "80":
            return RegistryHost(scheme="http", host=domain)
        if port == "443":
            return RegistryHost(scheme="https", host=domain)
        # As Docker treats 127.0.0.0/8 as an insecure registry and containerd a localhost
        # one: TLS first without verification, then plain HTTP.
        return RegistryHost(scheme="https", host=domain, skip_verify=True, fallback_plain_http=True)
    return RegistryHost(scheme="https", host=domain)


def _same_host(host: str, domain: str) -> bool:
    if host == domain:
        return True
    return domain in ("docker.io", "index.docker.io") and host == DOCKER_HUB_HOST


def _load_directory(directory: Path) -> list[RegistryHost]:
    file = directory / "hosts.toml"
    try:
        data = file.read_bytes()
    except FileNotFoundError:
        return [_from_cert_files(directory)]
    except OSError as e:
        raise HostsConfigError(f"cannot read {file}: {e.strerror or e}") from e
    if not data.strip():
        return [_from_cert_files(directory)]
    return parse_hosts_toml(data, file)


def parse_hosts_toml(data: bytes | str, file: str | Path = "hosts.toml") -> list[RegistryHost]:
    """The hosts a ``hosts.toml`` lists: mirrors in file order, then the server.

    The server entry has ``host == ""`` when the file names no ``server`` (the caller puts
    the upstream there). Relative paths (``ca``, ``client``) are taken relative to ``file``.

    Raises:
        HostsConfigError: naming ``file`` and the offending key.
    """
    file = Path(file)
    text = data.decode("utf-8", errors="replace") if isinstance(data, bytes) else data
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise HostsConfigError(f"{file}: invalid TOML: {e}") from e
    _warn_unknown(doc, _ROOT_KEYS, file, "")
    mirrors = doc.get("host", {})
    if not isinstance(mirrors, dict):
        raise HostsConfigError(f'{file}: "host" must be a table of [host."<url>"] sections')
    hosts: list[RegistryHost] = []
    for url, table in mirrors.items():  # tomllib keeps file order
        where = f'host."{url}"'
        if not isinstance(table, dict):
            raise HostsConfigError(f"{file}: {where} must be a table")
        _warn_unknown(table, _HOST_KEYS, file, where + ".")
        if not url:
            raise HostsConfigError(f'{file}: host."" needs a URL, e.g. host."https://mirror"')
        hosts.append(_host_from_table(url, table, file, where))
    server = doc.get("server", "")
    if not isinstance(server, str):
        raise HostsConfigError(f'{file}: "server" must be a string URL, e.g. "https://host"')
    hosts.append(_host_from_table(server, doc, file, ""))
    return hosts


def _host_from_table(url: str, table: Mapping[str, Any], file: Path, where: str) -> RegistryHost:
    def key(name: str) -> str:
        return f"{where}.{name}" if where else name

    override_path = table.get("override_path", False)
    if not isinstance(override_path, bool):
        raise HostsConfigError(f"{file}: {key('override_path')} must be true or false")
    scheme, host, path = "https", "", "/v2"
    if url:
        scheme, host, path = _parse_url(url, override_path, file, where or "server")

    skip_verify = table.get("skip_verify", False)
    if not isinstance(skip_verify, bool):
        raise HostsConfigError(f"{file}: {key('skip_verify')} must be true or false")

    capabilities: frozenset[str] = ALL_CAPABILITIES
    if "capabilities" in table:
        caps = table["capabilities"]
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise HostsConfigError(f"{file}: {key('capabilities')} must be a list of strings")
        lowered = {c.lower() for c in caps}
        unknown = sorted(lowered - ALL_CAPABILITIES)
        if unknown:
            raise HostsConfigError(
                f"{file}: {key('capabilities')}: unknown capability {unknown[0]!r} "
                "(expected pull, resolve, push)"
            )
        if lowered:
            capabilities = frozenset(lowered)

    ca = table.get("ca")
    ca_files: tuple[str, ...] = ()
    if isinstance(ca, str):
        ca_files = (_abs(ca, file),)
    elif isinstance(ca, list) and all(isinstance(c, str) for c in ca):
        ca_files = tuple(_abs(c, file) for c in ca)
    elif ca is not None:
        raise HostsConfigError(f"{file}: {key('ca')} must be a path or a list of paths")

    client_certs = _client_pairs(table.get("client"), file, key("client"))

    headers: dict[str, str] = {}
    raw_headers = table.get("header", {})
    if not isinstance(raw_headers, dict):
        raise HostsConfigError(f"{file}: {key('header')} must be a table")
    for name, value in raw_headers.items():
        if isinstance(value, str):
            headers[name] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            headers[name] = ", ".join(value)
        else:
            raise HostsConfigError(
                f"{file}: {key('header')}.{name} must be a string or a list of strings"
            )

    dial_timeout = None
    if "dial_timeout" in table:
        try:
            dial_timeout = durations.parse(table["dial_timeout"])
        except (ValueError, TypeError) as e:
            raise HostsConfigError(f"{file}: {key('dial_timeout')}: {e}") from e

    proxy = table.get("proxy", "")
    if not isinstance(proxy, str):
        raise HostsConfigError(f"{file}: {key('proxy')} must be a URL string")

    return RegistryHost(
        scheme=scheme,
        host=host,
        path=path,
        capabilities=capabilities,
        ca_files=ca_files,
        client_certs=client_certs,
        skip_verify=skip_verify,
        headers=headers,
        override_path=override_path,
        dial_timeout=dial_timeout,
        proxy=proxy,
    )


def _parse_url(url: str, override_path: bool, file: Path, key: str) -> tuple[str, str, str]:
    if "://" not in url:
        url = "https://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HostsConfigError(
            f"{file}: {key}: {url!r} is not an http(s) URL, e.g. https://mirror.example.com"
        )
    host = parts.netloc
    if host in ("docker.io", "index.docker.io"):
        host = DOCKER_HUB_HOST  # docker.io serves no registry API itself
    path = os.path.normpath(parts.path) if parts.path not in ("", "/") else ""
    if override_path:
        return parts.scheme, host, path or "/"
    if not path.endswith("/v2"):
        path += "/v2"
    return parts.scheme, host, path


def _client_pairs(value: Any, file: Path, key: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return ((_abs(value, file), ""),)
    if not isinstance(value, list):
        raise HostsConfigError(f"{file}: {key} must be a path, a list of paths or of pairs")
    pairs: list[tuple[str, str]] = []
    for item in value:
        if isinstance(item, str):
            pairs.append((_abs(item, file), ""))
        elif isinstance(item, list) and len(item) == 2 and all(isinstance(p, str) for p in item):
            pairs.append((_abs(item[0], file), _abs(item[1], file) if item[1] else ""))
        else:
            raise HostsConfigError(
                f"{file}: {key}: {item!r} must be a path or a [cert, key] pair of paths"
            )
    return tuple(pairs)


def _abs(path: str, file: Path) -> str:
    return path if os.path.isabs(path) else str(file.parent / path)


def _warn_unknown(table: Mapping[str, Any], known: frozenset[str], file: Path, prefix: str) -> None:
    for name in table:
        if name not in known:
            logger.warning("%s: ignoring unknown key %s%s", file, prefix, name)


def _from_cert_files(directory: Path) -> RegistryHost:
    """Docker's ``certs.d`` layout: ``*.crt`` CA files, ``x.cert`` + ``x.key`` pairs."""
    ca_files: list[str] = []
    pairs: list[tuple[str, str]] = []
    for entry in sorted(directory.iterdir()):
        if entry.suffix == ".crt":
            ca_files.append(str(entry))
        elif entry.suffix == ".cert":
            key = entry.with_suffix(".key")
            if not key.exists():
                raise HostsConfigError(f"{entry}: client certificate without {key.name}")
            pairs.append((str(entry), str(key)))
        elif entry.suffix == ".key" and not entry.with_suffix(".cert").exists():
            raise HostsConfigError(f"{entry}: client key without {entry.stem}.cert")
    return RegistryHost(
        scheme="https", host="", ca_files=tuple(ca_files), client_certs=tuple(pairs)
    )
