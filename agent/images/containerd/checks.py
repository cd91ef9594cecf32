"""Start-up checks of the node's containerd: is prefetching into it useful and safe?

:func:`run` asks containerd (version, plugins) and its CRI plugin (verbose runtime status,
whose ``info["config"]`` is the CRI configuration) and returns a :class:`Report` of
findings, each with a message that says what is wrong and what to change:

* **error** — prefetching cannot work: the socket is unreachable, the snapshotter plugin is
  missing or failed, or the CRI plugin unpacks into another snapshotter (kubelet would not
  find the layers and containerd would unpack again);
* **warning** — it works but does not help pods: another namespace than ``k8s.io``, no CRI
  plugin, containerd older than 1.6;
* **info** — things to know: ``discard_unpacked_layers`` (the agent then does not copy layer
  blobs either), containerd ≥ 2.1 pulling CRI images through its transfer service.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from google.protobuf import empty_pb2

from agent.images import errors
from agent.images.containerd import client as client_mod
from agent.images.containerd.protos import cri_pb2, introspection_pb2, version_pb2

CRI_NAMESPACE: Final = "k8s.io"
#: The first containerd whose CRI reports images labelled io.cri-containerd.pinned as pinned.
PINNING_VERSION: Final = (1, 7)
Level = Literal["error", "warning", "info"]


@dataclass(frozen=True)
class Finding:
    """One thing the checks found."""

    level: Level
    message: str


@dataclass(frozen=True)
class Report:
    """What :func:`run` found.

    Attributes:
        version: containerd's version (``"1.6.20~ds1"``), or ``""`` when unreachable.
        cri: whether the CRI plugin answered.
        cri_snapshotter: the CRI plugin's snapshotter, or ``""`` when unknown.
        discard_unpacked_layers: the CRI plugin's setting (``False`` when unknown).
        registry_config_path: the CRI plugin's hosts directory (``registry.config_path``,
            the ``certs.d`` its own pulls read), or ``""`` when unset or unknown.
    """

    version: str = ""
    cri: bool = False
    cri_snapshotter: str = ""
    discard_unpacked_layers: bool = False
    registry_config_path: str = ""
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not any(f.level == "error" for f in self.findings)

    def messages(self, level: Level) -> list[str]:
        return [f.message for f in self.findings if f.level == level]

    def raise_for_errors(self) -> None:
        """Raise :class:`~errors.InvalidConfiguration` listing every error, if any."""
        if not self.ok:
            raise errors.InvalidConfiguration(
                "containerd cannot take prefetched images: " + "; ".join(self.messages("error"))
            )


def version_of(client: client_mod.Client) -> str:
    """containerd's version at ``client.address``, or ``""`` when it does not answer."""
    try:
        return client.unary(
            "/containerd.services.version.v1.Version/Version",
            empty_pb2.Empty(),
            version_pb2.VersionResponse,
            timeout=5,
            what="version",
        ).version
    except errors.ImageError:
        return ""


def run(client: client_mod.Client, *, snapshotter: str = "overlayfs") -> Report:
    """Check containerd at ``client.address`` for ``client.namespace`` and ``snapshotter``."""
    findings: list[Finding] = []
    try:
        version = client.unary(
            "/containerd.services.version.v1.Version/Version",
            empty_pb2.Empty(),
            version_pb2.VersionResponse,
            timeout=10,
            what="version",
        ).version
    except errors.ImageError as e:
        findings.append(
            Finding("error", f"containerd is not reachable at {client.address}: {e}")
        )
        return Report(findings=tuple(findings))

    findings.extend(_version_findings(version))
    if client.namespace != CRI_NAMESPACE:
        findings.append(
            Finding(
                "warning",
                f"images go into containerd namespace {client.namespace!r}, but the CRI "
                f"plugin (and so kubelet) only sees {CRI_NAMESPACE!r}: pods will pull again."
                f" Set [images.containerd] namespace = {CRI_NAMESPACE!r}",
            )
        )

    plugins = client.unary(
        "/containerd.services.introspection.v1.Introspection/Plugins",
        introspection_pb2.PluginsRequest(),
        introspection_pb2.PluginsResponse,
        what="introspection.Plugins",
    ).plugins
    findings.extend(_snapshotter_findings(plugins, snapshotter))

    cri_config = _cri_config(client)
    cri = cri_config is not None
    cri_snapshotter = ""
    discard = False
    config_path = ""
    if cri_config is None:
        findings.append(
            Finding(
                "warning",
                "containerd's CRI plugin did not answer (disabled, or not built in): kubelet "
                "cannot use the prefetched images through this containerd",
            )
        )
    else:
        cri_snapshotter = _first(cri_config, ("snapshotter", "Snapshotter"), str) or ""
        registry = _first(cri_config, ("registry", "Registry"), dict) or {}
        config_path = _first(registry, ("configPath", "config_path", "ConfigPath"), str) or ""
        discard = bool(
            _first(
                cri_config,
                ("discardUnpackedLayers", "discard_unpacked_layers", "DiscardUnpackedLayers"),
                bool,
            )
        )
        if cri_snapshotter and cri_snapshotter != snapshotter:
            findings.append(
                Finding(
                    "error",
                    f"the CRI plugin unpacks into the {cri_snapshotter!r} snapshotter but the "
                    f"agent is configured for {snapshotter!r}: kubelet would not find the "
                    f"layers and containerd would unpack them again. Set [images.containerd] "
                    f"snapshotter = {cri_snapshotter!r}",
                )
            )
        if discard:
            findings.append(
                Finding(
                    "info",
                    "the CRI plugin discards layer blobs once unpacked "
                    "(discard_unpacked_layers = true); the agent does the same and copies "
                    "only manifests and configs into containerd",
                )
            )
    return Report(
        version=version,
        cri=cri,
        cri_snapshotter=cri_snapshotter,
        discard_unpacked_layers=discard,
        registry_config_path=config_path,
        findings=tuple(findings),
    )


def version_tuple(version: str) -> tuple[int, int]:
    """``"1.6.20~ds1"`` → ``(1, 6)``; ``(0, 0)`` when it cannot be read."""
    parts = version.lstrip("v").split(".")
    try:
        return int(parts[0]), int("".join(c for c in parts[1] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return 0, 0


def _version_findings(version: str) -> Iterator[Finding]:
    major_minor = version_tuple(version)
    if major_minor < (1, 6):
        yield Finding(
            "warning",
            f"containerd {version} is older than 1.6, the oldest version this agent is tested "
            "with; the CRI may not list the prefetched images",
        )
    if major_minor >= (2, 1):
        yield Finding(
            "info",
            f"containerd {version} pulls CRI images through its transfer service: an image "
            "the agent prefetched is used as it is only when the CRI image snapshotter "
            "([plugins.'io.containerd.cri.v1.images'] snapshotter, and the snapshotter of "
            "the pod's runtime handler) is the one the agent unpacks into, and the transfer "
            "service's unpack_config lists that snapshotter for this platform",
        )


def _snapshotter_findings(
    plugins: Any, snapshotter: str
) -> Iterator[Finding]:
    available = []
    for plugin in plugins:
        if plugin.type != "io.containerd.snapshotter.v1":
            continue
        if plugin.id == snapshotter:
            if plugin.HasField("init_err") and plugin.init_err.code:
                yield Finding(
                    "error",
                    f"containerd's {snapshotter!r} snapshotter failed to start: "
                    f"{plugin.init_err.message}",
                )
            return
        if not (plugin.HasField("init_err") and plugin.init_err.code):
            available.append(plugin.id)
    yield Finding(
        "error",
        f"containerd has no {snapshotter!r} snapshotter (it has: "
        f"{', '.join(sorted(available)) or 'none'}); set [images.containerd] snapshotter",
    )


def _cri_config(client: client_mod.Client) -> dict[str, Any] | None:
    """The CRI plugin's configuration, merged from every JSON value of its verbose status."""
    try:
        response = client.unary(
            "/runtime.v1.RuntimeService/Status",
            cri_pb2.StatusRequest(verbose=True),
            cri_pb2.StatusResponse,
            timeout=10,
            what="CRI RuntimeService.Status",
        )
    except errors.ImageError:
        return None
    merged: dict[str, Any] = {}
    for key, value in response.info.items():
        try:
            merged[key] = json.loads(value)
        except ValueError:
            continue
    return merged


def _first(obj: Any, keys: tuple[str, ...], kind: type) -> Any:
    """The first value under any of ``keys`` of type ``kind``, searched depth first."""
    if isinstance(obj, dict):
        for key in keys:
            value = obj.get(key)
            if isinstance(value, kind) and (kind is not str or value):
                return value
        for value in obj.values():
            found = _first(value, keys, kind)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for value in obj:
            found = _first(value, keys, kind)
            if found is not None:
                return found
    return None
