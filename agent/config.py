"""Typed settings for every entry point: one model, read in this module only.

The image service owns its own section, ``[images]``, apart from the process's ``[runtime]``
section, as containerd split ``io.containerd.cri.v1.images`` out of its CRI runtime config.
Entry points call :func:`load` once and hand plain values (seconds, paths, ints) to the
code they build; nothing below the entry points imports this module.

Sources, lowest to highest precedence::

    defaults                the field defaults below
    Downward API variables  NODE_NAME → runtime.node_name, POD_NAMESPACE → runtime.namespace
    TOML file               load(path), else $PREFETCHER_CONFIG, else /etc/prefetcher/config.toml
    PREFETCHER_* variables  PREFETCHER_IMAGES__MAX_CONCURRENT_DOWNLOADS=5 ("__" nests)
    overrides               command-line flags: {"images": {"image_pull_progress_timeout": 30}}

A file with ``version = 1`` (or no version and an ``[agent]`` table) is the old layout that
mixed image and runtime keys; it is migrated in memory with one warning on the
``agent.config`` logger (see :func:`migrate`). Anything wrong — a bad value, an unknown key,
a TOML syntax error — raises :class:`ConfigError` whose one-line message names the dotted
field, the value, where it came from and what is allowed.
"""

from __future__ import annotations

import contextvars
import difflib
import json
import logging
import math
import os
import re
import sys
import textwrap
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import pydantic
from pydantic import BaseModel, BeforeValidator, ByteSize, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from agent.images import durations

__all__ = [
    "CONFIG_ENV_VAR",
    "CURRENT_VERSION",
    "DEFAULT_CONFIG_PATH",
    "DOWNWARD_ENV",
    "ENV_PREFIX",
    "REDACTED",
    "V1_KEYS",
    "ConfigError",
    "ContainerdSettings",
    "ImagesSettings",
    "NodeSettings",
    "OperatorSettings",
    "Option",
    "RegistrySettings",
    "RuntimeSettings",
    "Settings",
    "TracingSettings",
    "default_toml",
    "dump_toml",
    "env_var_name",
    "file_version",
    "from_toml",
    "iter_options",
    "load",
    "migrate",
    "options_markdown",
    "parse_toml",
    "read_file",
    "render_docs",
    "to_toml",
    "v1_keys_markdown",
    "validate",
]

logger = logging.getLogger("agent.config")

ENV_PREFIX = "PREFETCHER_"
ENV_NESTED_DELIMITER = "__"
#: The variable naming the config file when no path is passed to :func:`load`.
CONFIG_ENV_VAR = "PREFETCHER_CONFIG"
#: Read when neither a path nor ``$PREFETCHER_CONFIG`` is given, and only if it exists.
DEFAULT_CONFIG_PATH = Path("/etc/prefetcher/config.toml")
#: The layout this module writes and the model describes.
CURRENT_VERSION = 2
#: Variables set by the Kubernetes Downward API in the chart; lowest-precedence fallbacks.
DOWNWARD_ENV: Mapping[str, tuple[str, str]] = {
    "NODE_NAME": ("runtime", "node_name"),
    "POD_NAMESPACE": ("runtime", "namespace"),
}
REDACTED = "<redacted>"

GiB = 1024**3


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line fit for a user.

    ``problems`` holds one line per problem (a file may have several); ``str()`` joins them.
    """

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems: list[str] = problems if problems is not None else [message]


# --------------------------------------------------------------------------------------------
# Field types


class _Marker:
    """Annotation metadata that tells the TOML writer and the docs how to show a field."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __repr__(self) -> str:
        return f"_Marker({self.kind!r})"


_DURATION = _Marker("duration")
_BYTES = _Marker("bytes")
_ADDRESS = _Marker("address")


def _parse_duration(value: Any) -> Any:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return durations.parse(value)  # ValueError carries the accepted form
    return value


def _check_address(value: str) -> str:
    if value == "":
        return value
    host, sep, port = value.rpartition(":")
    ok = bool(sep) and port.isdigit() and 0 <= int(port) <= 65535
    if ok and host.startswith("["):
        ok = host.endswith("]") and len(host) > 2
    elif ok:
        ok = ":" not in host and " " not in host
    if not ok:
        raise ValueError(
            f"invalid address {value!r}: expected HOST:PORT such as ':9090', '127.0.0.1:9090' "
            "or '[::1]:9090', or '' to disable"
        )
    return value


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


def _split_list(value: Any) -> Any:
    """Accept a list, a JSON array, or a comma-separated string (the env-var form)."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"invalid JSON array {value!r}: {e.msg}") from e
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


#: Seconds; TOML/env form is Go's duration text ("5m", "1m30s", "0"), a number means seconds.
Duration = Annotated[float, BeforeValidator(_parse_duration), Field(ge=0), _DURATION]
#: Bytes; an integer, or text with a unit ("32GiB", "500MB").
Bytes = Annotated[ByteSize, Field(ge=0), _BYTES]
#: HOST:PORT to listen on; "" disables the listener.
Address = Annotated[str, pydantic.AfterValidator(_check_address), _ADDRESS]
StringList = Annotated[list[str], NoDecode, BeforeValidator(_split_list)]


def _default_root() -> Path:
    if os.geteuid() == 0:
        return Path("/var/lib/prefetcher")
    return Path.home() / ".local" / "share" / "prefetcher"


def _default_state() -> Path:
    if os.geteuid() == 0:
        return Path("/run/prefetcher")
    runtime_dir = os.environ.get("XDG_RUNTIME_DIR")
    if runtime_dir:
        return Path(runtime_dir) / "prefetcher"
    return Path("/tmp") / f"prefetcher-{os.geteuid()}"


# --------------------------------------------------------------------------------------------
# The model

_STRICT = ConfigDict(extra="forbid", validate_default=True)


class RegistrySettings(BaseModel):
    """How registries are reached: per-host files, extra headers, simple mirrors."""

    model_config = _STRICT

    config_path: str = Field(
        default="",
        description=(
            "Directory of containerd-style per-host files (<dir>/<host>/hosts.toml: server, "
            "mirrors, ca, skip_verify, plain HTTP), e.g. '/etc/prefetcher/certs.d'. "
            "Default '' = no host files; registries are reached directly over TLS."
        ),
    )
    headers: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "Extra HTTP headers sent with every registry request, e.g. "
            '{ "User-Agent" = "acme-prefetcher" }. Default: none. Values of headers that '
            "look like credentials (Authorization, tokens, keys) are redacted when printed."
        ),
    )
    mirrors: dict[str, list[str]] = Field(
        default_factory=dict,
        description=(
            "Registry host → mirror endpoints tried in order before the host itself, e.g. "
            '{ "docker.io" = ["https://mirror.gcr.io"] }. Default: none. Kept for files '
            'migrated from version 1 (agent.registry_mirrors); equivalent to [host."<mirror>"] '
            "entries with capabilities pull and resolve. A hosts.toml under config_path for "
            "the same host wins. Prefer config_path for new setups."
        ),
    )


class ContainerdSettings(BaseModel):
    """The node's containerd, used when images.snapshotter = "containerd" (and tried first by
    "auto" when address is set)."""

    model_config = _STRICT

    address: str = Field(
        default="/run/containerd/containerd.sock",
        min_length=1,
        description=(
            "Path of containerd's gRPC socket (mounted from the host). "
            "Default '/run/containerd/containerd.sock', containerd's own default."
        ),
    )
    namespace: str = Field(
        default="k8s.io",
        pattern=r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$",
        description=(
            "containerd namespace the images are written into. Default 'k8s.io', the one the "
            "CRI plugin (and so kubelet) reads; any other makes prefetching useless for pods."
        ),
    )
    snapshotter: str = Field(
        default="overlayfs",
        min_length=1,
        description=(
            "containerd snapshotter to unpack into; must equal the CRI plugin's snapshotter or "
            "kubelet will unpack again. Default 'overlayfs', containerd's default."
        ),
    )


class CriSettings(BaseModel):
    """A CRI runtime (CRI-O, …) the agent asks to pull, used when images.snapshotter = "cri"
    (and tried by "auto" when no containerd answers)."""

    model_config = _STRICT

    address: str = Field(
        default="",
        description=(
            "Path of the runtime's CRI socket (mounted from the host). Default '' : with "
            "snapshotter 'auto' the usual places are tried (/var/run/crio/crio.sock, "
            "/run/crio/crio.sock, /var/run/cri-dockerd.sock); with 'cri' it must be set."
        ),
    )


class ImagesSettings(BaseModel):
    """The image service, with containerd's io.containerd.cri.v1.images names where they exist."""

    model_config = _STRICT

    snapshotter: Literal["auto", "overlayfs", "naive", "containerd", "cri"] = Field(
        default="overlayfs",
        description=(
            "Where unpacked layers go: 'auto' (the node's runtime, found at start: its "
            "containerd, else any CRI runtime), 'containerd' (the node's containerd, see "
            "[images.containerd]), 'cri' (a CRI runtime pulls, see [images.cri]), "
            "'overlayfs' (the prefetcher's own store under runtime.root, which kubelet never "
            "reads) or 'naive' (copying snapshots; slow, for tests). Default: 'auto' for the "
            "agent; for the CLI, 'overlayfs' for pull, and for images ls/rm/gc/mount the "
            "runtime the store records (the agent's), else 'overlayfs'."
        ),
    )
    max_concurrent_downloads: int = Field(
        default=3,
        ge=1,
        description=(
            "Blobs downloaded at once by one pull. Default 3, containerd's default: enough to "
            "fill a link without starving other pulls."
        ),
    )
    node_max_concurrent_downloads: int = Field(
        default=8,
        ge=1,
        description=(
            "Blobs downloaded at once by all pulls on the node together (containerd has no "
            "such limit). Default 8, so parallel prefetches cannot saturate the node's network."
        ),
    )
    max_concurrent_unpacks: int = Field(
        default=1,
        ge=1,
        le=64,
        description=(
            "Layers whose files are written at once by the agent (or one CLI pull), across "
            "all its pulls. A layer waiting for its download's next bytes lets another layer "
            "write meanwhile. Default 1, as containerd applies an image's layers one at a "
            "time: the tar is parsed under one Python interpreter lock, so a second layer at "
            "once only adds lock hand-offs (and, on ext4 without a journal, inode-allocation "
            "contention): measured slower, see bench/README.md."
        ),
    )
    image_pull_progress_timeout: Duration = Field(
        default=300.0,
        description=(
            "Cancel a pull when no byte arrived for this long while a request is active "
            "(a stall). Go duration. Default '5m0s', containerd's default; '0' disables."
        ),
    )
    image_pull_min_bytes_per_second: int = Field(
        default=0,
        ge=0,
        description=(
            "Treat a transfer slower than this many bytes per second over a whole progress "
            "timeout window as a stall, since a drip never trips the no-byte check. "
            "Default 0 = off."
        ),
    )
    image_pull_with_sync_fs: bool = Field(
        default=False,
        description=(
            "syncfs the snapshot's filesystem before committing it, so a committed snapshot "
            "survives power loss. Costs about 10-15% of pull time. Default false, as containerd."
        ),
    )
    discard_unpacked_layers: bool = Field(
        default=False,
        description=(
            "Delete compressed layer blobs once unpacked, to save disk; they are then "
            "downloaded again if needed. Default false, as containerd."
        ),
    )
    pinned_images: StringList = Field(
        default_factory=list,
        description=(
            "Image references garbage collection never removes (e.g. the pause image). "
            "Env form: comma-separated or a JSON array. Default: none."
        ),
    )
    max_layer_uncompressed_bytes: Bytes = Field(
        default=ByteSize(32 * GiB),
        description=(
            "Refuse a layer that unpacks to more than this (decompression-bomb guard). "
            "Bytes, or text such as '32GiB'. Default 32 GiB."
        ),
    )
    max_image_uncompressed_bytes: Bytes = Field(
        default=ByteSize(64 * GiB),
        description=(
            "Refuse an image once the layers one pull unpacks add up to more than this "
            "uncompressed (decompression-bomb guard across layers: many small layers that "
            "each pass max_layer_uncompressed_bytes cannot fill the disk together). The pull "
            "fails with reason UnsafeLayer, and the blobs and snapshots it committed are "
            "removed unless another image uses them. 0 = no cap. Bytes, or text such as "
            "'64GiB'. Default 64 GiB."
        ),
    )
    stats_collect_period: Duration = Field(
        default=10.0,
        gt=0,
        description=(
            "How often store usage (size, free space, counts) is measured for metrics and the "
            "node's status.agent. Go duration. Default '10s', containerd's default."
        ),
    )
    registry: RegistrySettings = Field(
        default_factory=RegistrySettings,
        description="Registry access: per-host config directory, headers, mirrors.",
    )
    containerd: ContainerdSettings = Field(
        default_factory=ContainerdSettings,
        description="The node's containerd, used by snapshotter = 'containerd' or 'auto'.",
    )
    cri: CriSettings = Field(
        default_factory=CriSettings,
        description="A CRI runtime's socket, used by snapshotter = 'cri' or 'auto'.",
    )


LogLevel = Literal["debug", "info", "warning", "error"]


class RuntimeSettings(BaseModel):
    """The process around the image service: identity, directories, API, listeners, logs, GC."""

    model_config = _STRICT

    node_name: str = Field(
        default="",
        description=(
            "Name of the node this agent serves. Default '': taken from $NODE_NAME (the "
            "Downward API variable the chart sets); the agent refuses to start without one."
        ),
    )
    root: Path = Field(
        default_factory=_default_root,
        json_schema_extra={
            "doc_default": "/var/lib/prefetcher as root, else ~/.local/share/prefetcher"
        },
        description=(
            "Persistent directory for content and snapshots. Default '/var/lib/prefetcher' "
            "as root, '~/.local/share/prefetcher' otherwise."
        ),
    )
    state: Path = Field(
        default_factory=_default_state,
        json_schema_extra={
            "doc_default": "/run/prefetcher as root, else $XDG_RUNTIME_DIR/prefetcher"
        },
        description=(
            "Volatile directory for locks and sockets; emptied by a reboot. Default "
            "'/run/prefetcher' as root, '$XDG_RUNTIME_DIR/prefetcher' (or "
            "'/tmp/prefetcher-<uid>') otherwise."
        ),
    )
    kubeconfig: str = Field(
        default="",
        description=(
            "kubeconfig file for the Kubernetes API. Default '': in-cluster service account, "
            "else $KUBECONFIG, else ~/.kube/config."
        ),
    )
    kube_context: str = Field(
        default="",
        description="Context in the kubeconfig to use. Default '': its current context.",
    )
    namespace: str = Field(
        default="prefetcher-system",
        description=(
            "Namespace of the operator, where pull-secret copies are kept. Default "
            "'prefetcher-system', or $POD_NAMESPACE when the chart sets it."
        ),
    )
    metrics_address: Address = Field(
        default=":9090",
        description=(
            "HOST:PORT for Prometheus /metrics. Default ':9090' (all interfaces); '' disables."
        ),
    )
    health_address: Address = Field(
        default=":8081",
        description=(
            "HOST:PORT for /healthz and /readyz. Default ':8081' (all interfaces); '' disables."
        ),
    )
    log_level: Annotated[LogLevel, BeforeValidator(_lower)] = Field(
        default="info",
        description="Least severe log level written: debug, info, warning, error. Default info.",
    )
    log_format: Annotated[Literal["text", "json"], BeforeValidator(_lower)] = Field(
        default="text",
        description=(
            "'text' for people, 'json' (one object per line, with trace and span ids) for log "
            "collectors. Default 'text'."
        ),
    )
    gc_period: Duration = Field(
        default=600.0,
        description=(
            "How often unclaimed content and snapshots are garbage-collected and the disk "
            "budget enforced. Go duration. Default '10m0s'; '0' disables periodic GC."
        ),
    )
    min_free_bytes: Bytes = Field(
        default=ByteSize(0),
        description=(
            "Do not pull (report DiskPressure) when the store's filesystem would have less "
            "than this free. Bytes or text such as '20GiB'. Default 0 = only min_free_percent."
        ),
    )
    min_free_percent: float = Field(
        default=15.0,
        ge=0,
        le=100,
        description=(
            "Free-space floor as a percentage of the store's filesystem; the stricter of this "
            "and min_free_bytes applies. Default 15, kubelet's imagefs eviction threshold, so "
            "prefetching never makes kubelet evict pods."
        ),
    )
    max_store_bytes: Bytes = Field(
        default=ByteSize(0),
        description=(
            "Largest the store may grow; GC removes unclaimed images beyond it and pulls that "
            "would exceed it report DiskPressure. Bytes or text. Default 0 = no limit."
        ),
    )


class TracingSettings(BaseModel):
    """What OpenTelemetry's own OTEL_* variables (endpoint, protocol, sampler) do not cover."""

    model_config = _STRICT

    enabled: bool = Field(
        default=True,
        description=(
            "Export traces when an OTLP endpoint is configured ($OTEL_EXPORTER_OTLP_ENDPOINT "
            "or $OTEL_EXPORTER_OTLP_TRACES_ENDPOINT). Default true; false turns tracing off "
            "even then. Endpoint, protocol, sampler and resource come from OTEL_* variables."
        ),
    )
    http_client_spans: bool = Field(
        default=True,
        description=(
            "Add a client span per registry HTTP request (no credentials in attributes). "
            "Default true; turn off to shrink traces of many-layer pulls."
        ),
    )


class OperatorSettings(BaseModel):
    """The cluster operator (``prefetcher operator``): leader election, pacing, the agents'
    DaemonSet."""

    model_config = _STRICT

    peering_name: str = Field(
        default="prefetcher",
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        description=(
            "Name of the Lease (coordination.k8s.io/v1, in runtime.namespace) the operator "
            "replicas elect their one active replica through, as client-go's leader election "
            "does (created at start if missing). Default 'prefetcher'."
        ),
    )
    standalone: bool = Field(
        default=False,
        description=(
            "Run without leader election. Default false: only the replica holding the Lease "
            "runs; use true only for a single local process."
        ),
    )
    lease_duration: Duration = Field(
        default=15.0,
        gt=0,
        description=(
            "How long standby replicas wait, after they last saw the leader renew the Lease, "
            "before taking it over (the failover time after the leader dies). Go duration. "
            "Default '15s' (client-go's)."
        ),
    )
    lease_renew_deadline: Duration = Field(
        default=10.0,
        gt=0,
        description=(
            "The leader exits (and stops writing) when it could not renew the Lease for this "
            "long; must be less than lease_duration. Go duration. Default '10s'."
        ),
    )
    lease_retry_period: Duration = Field(
        default=2.0,
        gt=0,
        description=(
            "How often the leader renews the Lease and standby replicas try to take it. Go "
            "duration. Default '2s'."
        ),
    )
    status_interval: Duration = Field(
        default=1.0,
        gt=0,
        description=(
            "Least time between two status writes of one ImagePrefetch while only counters "
            "change; a condition change is written at once. Go duration. Default '1s'."
        ),
    )
    resync_interval: Duration = Field(
        default=30.0,
        gt=0,
        description=(
            "Reconcile every ImagePrefetch at least this often even without events (level-"
            "triggered safety net; also drives TTL); a Complete one with nothing due every "
            "10 intervals. Default '30s'."
        ),
    )
    agent_heartbeat_timeout: Duration = Field(
        default=90.0,
        gt=0,
        description=(
            "A node whose agent heartbeat Lease (prefetcher-agent-<node> in runtime.namespace) "
            "this operator has not seen renewed for longer "
            "than this has no live agent and is reported AgentUnavailable. Default '1m30s'."
        ),
    )
    secret_refresh_interval: Duration = Field(
        default=60.0,
        gt=0,
        description=(
            "Read a pull secret an ImagePrefetch names (and its copy) again after this long; "
            "a changed secret reaches the agents within it. Go duration. Default '1m'."
        ),
    )
    agent_daemonset: str = Field(
        default="",
        description=(
            "YAML or JSON file with the agents' DaemonSet as the chart renders it (the chart's "
            "copy of its own DaemonSet object). The operator recreates it in runtime.namespace "
            "when deleted, reverts edits made outside Helm, and updates it when the file is of a "
            "newer release revision (or, without revisions, when the file changes). Default '': "
            "no DaemonSet managed."
        ),
    )
    agent_daemonset_owner: str = Field(
        default="",
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$",
        description=(
            "Name of the ConfigMap in runtime.namespace that holds agent_daemonset (the chart's). "
            "What the operator creates (a DaemonSet it had to recreate, the agents' pull-secret "
            "Role) gets an ownerReference to it, so deleting it (helm uninstall) garbage-collects "
            "them; while it is missing the DaemonSet is not recreated. Default '': no owner."
        ),
    )
    agent_secrets_role: str = Field(
        default="",
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?)?$",
        description=(
            "Name of the Role in runtime.namespace through which the agents read the pull-secret "
            "copies (the chart binds it to the agents' ServiceAccount). The operator creates it "
            "and keeps its resourceNames to the copies' names, so an agent can read no other "
            "Secret there. Default '': not managed (grant the agents access yourself)."
        ),
    )
    daemonset_check_interval: Duration = Field(
        default=10.0,
        gt=0,
        description=(
            "How often the agents' DaemonSet, its file and its pods are checked. Go duration. "
            "Default '10s'."
        ),
    )
    resolve_digests: bool = Field(
        default=True,
        description=(
            "Resolve tags to digests in the operator, so every node pulls the same image. "
            "Default true; when a registry is unreachable the tag is sent and nodes resolve it."
        ),
    )
    resolve_timeout: Duration = Field(
        default=10.0,
        gt=0,
        description="Give up resolving one tag after this long. Go duration. Default '10s'.",
    )

    @pydantic.model_validator(mode="after")
    def _lease_timing(self) -> OperatorSettings:
        if not self.lease_retry_period < self.lease_renew_deadline < self.lease_duration:
            raise ValueError("operator.lease_retry_period < operator.lease_renew_deadline < "
                             "operator.lease_duration is required (as client-go's leader "
                             "election)")
        return self


class NodeSettings(BaseModel):
    """The node agent (``prefetcher agent``): pacing of pulls, retries, status and heartbeat."""

    model_config = _STRICT

    max_concurrent_pulls: int = Field(
        default=3,
        ge=1,
        description=(
            "Images pulled at once on this node by all entries together; blob downloads are "
            "further limited by images.node_max_concurrent_downloads. Default 3."
        ),
    )
    status_interval: Duration = Field(
        default=2.0,
        gt=0,
        description=(
            "Least time between two NodeImageSet status writes while only bytes move; a phase "
            "change is written at once. Go duration. Default '2s'."
        ),
    )
    heartbeat_interval: Duration = Field(
        default=30.0,
        gt=0,
        description=(
            "How often the agent renews its node's heartbeat Lease (prefetcher-agent-<node> in "
            "runtime.namespace, as the kubelet's node lease; status.agent is written only when "
            "version, capacity or free space change); keep it well under "
            "operator.agent_heartbeat_timeout. Default '30s'."
        ),
    )
    backoff_initial: Duration = Field(
        default=10.0,
        gt=0,
        description=(
            "Wait after the first failed attempt of an entry; doubled after each further one "
            "(up to the entry's backoffLimit retries). Go duration. Default '10s', as kubelet."
        ),
    )
    backoff_max: Duration = Field(
        default=300.0,
        gt=0,
        description="Longest wait between two attempts. Go duration. Default '5m0s', as kubelet.",
    )
    failed_retry_interval: Duration = Field(
        default=300.0,
        description=(
            "Start a new attempt series for a Failed entry after this long, doubling after "
            "each further failed series (up to 16 times it), with +-20% jitter per node (a "
            "fixed registry or secret then heals without a spec change); permanent failures "
            "(NotFound, Unauthorized, Denied, invalid images) stop after the entry's "
            "backoffLimit series, invalid references are never retried. Go duration. "
            "Default '5m0s'; '0' disables."
        ),
    )
    resync_interval: Duration = Field(
        default=60.0,
        gt=0,
        description=(
            "Check every entry against the store at least this often (a Ready image that "
            "disappeared is pulled again). Go duration. Default '1m0s'."
        ),
    )


class Settings(BaseSettings):
    """Everything the operator, the agent and the CLI can be configured with (version 2)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        case_sensitive=False,
        extra="forbid",
        validate_default=True,
    )

    version: Literal[2] = Field(
        default=2,
        description="Layout of this file. 2 is current; version 1 files are migrated on load.",
    )
    images: ImagesSettings = Field(
        default_factory=ImagesSettings,
        description="The image service: pulling, unpacking, stall detection, registries.",
    )
    runtime: RuntimeSettings = Field(
        default_factory=RuntimeSettings,
        description="The process: node, directories, Kubernetes API, listeners, logs, GC, disk.",
    )
    tracing: TracingSettings = Field(
        default_factory=TracingSettings,
        description="Tracing switches beyond OTEL_* variables.",
    )
    operator: OperatorSettings = Field(
        default_factory=OperatorSettings,
        description="The cluster operator: peering, status pacing, the agents' DaemonSet.",
    )
    node: NodeSettings = Field(
        default_factory=NodeSettings,
        description="The node agent: pull concurrency, retries, status pacing, heartbeat.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load() merges every source itself (to say where a bad value came from); a bare
        # Settings() still reads PREFETCHER_* variables over its defaults.
        if _MERGED_ONLY.get():
            return (init_settings,)
        return (init_settings, env_settings)


_MERGED_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("merged_only", default=False)


# --------------------------------------------------------------------------------------------
# Loading


class _EnvSource(EnvSettingsSource):
    """pydantic-settings' env source over a given mapping instead of ``os.environ``."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env
        super().__init__(Settings)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {name.lower(): value for name, value in self._env.items()}


def load(
    path: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Build the effective settings from every source (see the module docstring).

    Args:
        path: the TOML file; ``None`` means ``$PREFETCHER_CONFIG``, else
            ``/etc/prefetcher/config.toml`` if it exists, else no file.
        overrides: values from command-line flags, nested (``{"images": {"snapshotter":
            "naive"}}``) or dotted (``{"images.snapshotter": "naive"}``); ``None`` values are
            ignored, so unset flags can be passed as they are.
        env: the environment to read (default ``os.environ``).

    Raises:
        ConfigError: naming the file, the dotted field, the value and what is allowed.
    """
    environ: Mapping[str, str] = os.environ if env is None else env
    file_path: Path | None
    if path is not None:
        file_path = Path(path)
    elif environ.get(CONFIG_ENV_VAR):
        file_path = Path(environ[CONFIG_ENV_VAR])
    elif DEFAULT_CONFIG_PATH.is_file():
        file_path = DEFAULT_CONFIG_PATH
    else:
        file_path = None
    file_data: dict[str, Any] = {}
    if file_path is not None:
        file_data = read_file(file_path)
    return _build(file_data, str(file_path) if file_path else None, overrides, environ)


def from_toml(
    text: str,
    *,
    source: str = "<string>",
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Like :func:`load`, with the file's text given (``source`` names it in messages)."""
    data = _migrated(parse_toml(text, source), source)
    return _build(data, source, overrides, os.environ if env is None else env)


def validate(data: Mapping[str, Any], *, source: str = "<config>") -> Settings:
    """Validate version 2 data on its own: defaults under it, no environment, no flags."""
    return _build(data, source, None, {})


def read_file(path: str | Path, *, raw: bool = False) -> dict[str, Any]:
    """Read a config file and return its version 2 data (migrating version 1, with a warning).

    With ``raw`` the data is returned as written, whatever its version. ``"-"`` reads stdin.
    """
    p = Path(path)
    try:
        text = sys.stdin.read() if str(path) == "-" else p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise ConfigError(f"config file {p}: cannot read: {reason}") from e
    source = "<stdin>" if str(path) == "-" else str(p)
    data = parse_toml(text, source)
    return data if raw else _migrated(data, source)


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """Parse TOML text as it is (no migration); syntax errors name ``source`` and the line."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # tomllib's message ends with "(at line N, column M)".
        raise ConfigError(f"config file {source}: invalid TOML: {e}") from e


def file_version(data: Mapping[str, Any], source: str = "<config>") -> int:
    """The layout version of parsed file data: ``version``, else 1 if it has ``[agent]``."""
    version = data.get("version")
    if version is None:
        return 1 if "agent" in data else CURRENT_VERSION
    if isinstance(version, bool) or version not in (1, CURRENT_VERSION):
        raise ConfigError(
            f"config file {source}: version = {version!r} is not supported; "
            f"allowed: 1 (migrated on load) or {CURRENT_VERSION}"
        )
    return int(version)


def _migrated(data: dict[str, Any], source: str) -> dict[str, Any]:
    if file_version(data, source) == CURRENT_VERSION:
        return data
    try:
        v2, notes = migrate(data)
    except ConfigError as e:
        raise ConfigError(f"config file {source}: {e}") from None
    moved = "; ".join(notes) if notes else "nothing to move"
    logger.warning(
        "config file %s uses the version 1 layout; migrated in memory: %s. "
        "Print the version 2 file with: prefetcher config migrate %s",
        source,
        moved,
        source,
    )
    return v2


def _build(
    file_data: Mapping[str, Any],
    file_name: str | None,
    overrides: Mapping[str, Any] | None,
    environ: Mapping[str, str],
) -> Settings:
    downward: dict[str, Any] = {}
    for var, (section, key) in DOWNWARD_ENV.items():
        if environ.get(var):
            downward.setdefault(section, {})[key] = environ[var]
    env_data = _env_values(environ)
    flag_data = _expand_overrides(overrides or {})
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("command-line flag", flag_data),
        ("env", env_data),
        (f"file {file_name}", file_data),
        ("Downward API", downward),
    ]
    merged: dict[str, Any] = {}
    for _, layer in reversed(layers):
        merged = _deep_merge(merged, layer)
    token = _MERGED_ONLY.set(True)
    try:
        return Settings(**merged)
    except pydantic.ValidationError as e:
        problems = [_describe(err, layers) for err in e.errors(include_url=False)]
        raise ConfigError("invalid configuration: " + "; ".join(problems), problems) from None
    finally:
        _MERGED_ONLY.reset(token)


def _env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """PREFETCHER_* variables as nested data; unknown sections are errors (with a hint)."""
    sections = {n for n in Settings.model_fields if n != "version"}
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or ENV_NESTED_DELIMITER not in upper[len(ENV_PREFIX) :]:
            continue
        head = upper[len(ENV_PREFIX) :].split(ENV_NESTED_DELIMITER, 1)[0].lower()
        if head not in sections:
            allowed = ", ".join(ENV_PREFIX + s.upper() + "__…" for s in sorted(sections))
            raise ConfigError(
                f"environment variable {name}: unknown section {head!r} (allowed: {allowed})"
                + _hint(head, sections, lambda s: ENV_PREFIX + s.upper())
            )
    try:
        return dict(_EnvSource(environ)())
    except SettingsError as e:
        raise ConfigError(_env_decode_problem(environ) or f"environment: {e}") from None


def _env_decode_problem(environ: Mapping[str, str]) -> str | None:
    """Name the variable whose value should have been JSON (pydantic-settings does not)."""
    tables = {o.env: o for o in iter_options() if o.type_name.startswith("table")}
    sections = {env_var_name(s) for s in Settings.model_fields if s != "version"}
    for name, value in environ.items():
        upper = name.upper()
        if upper in tables or upper in sections:
            try:
                decoded = json.loads(value)
            except json.JSONDecodeError:
                decoded = None
            if not isinstance(decoded, dict):
                example = '{"docker.io": ["https://mirror.gcr.io"]}'
                if upper in tables and tables[upper].path[-1] == "headers":
                    example = '{"User-Agent": "acme"}'
                elif upper in sections:
                    example = '{"max_concurrent_downloads": 5}'
                return (
                    f"environment variable {name} = {value!r}: expected a JSON object "
                    f"such as {example}"
                )
    return None


def _expand_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, Mapping):
            value = _expand_overrides(value)
            if not value:
                continue
        *parents, last = str(key).split(".")
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        if isinstance(target.get(last), dict) and isinstance(value, dict):
            target[last] = _deep_merge(target[last], value)
        else:
            target[last] = value
    return out


def _deep_merge(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _lookup(data: Mapping[str, Any], loc: tuple[str | int, ...]) -> tuple[bool, Any]:
    node: Any = data
    for part in loc:
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
        else:
            return False, None
    return True, node


def _origin(loc: tuple[str | int, ...], layers: list[tuple[str, Mapping[str, Any]]]) -> str:
    for label, data in layers:
        found, _ = _lookup(data, loc)
        if found:
            if label == "env":
                keys = [str(p) for p in loc if isinstance(p, str)]
                return "env " + ENV_PREFIX + ENV_NESTED_DELIMITER.join(keys).upper()
            if label == "Downward API":
                var = next(v for v, path in DOWNWARD_ENV.items() if path == tuple(loc))
                return f"env {var}"
            return label
    return "default"


def _model_at(loc: tuple[str | int, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Settings
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _hint(word: str, choices: Any, show: Any = str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {show(close[0])!r}?" if close else ""


def _describe(err: Any, layers: list[tuple[str, Mapping[str, Any]]]) -> str:
    loc = tuple(err["loc"])
    dotted = ".".join(str(p) for p in loc)
    origin = _origin(loc, layers)
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        prefix = ".".join(str(p) for p in loc[:-1])
        hint = _hint(str(loc[-1]), allowed, lambda n: f"{prefix}.{n}" if prefix else n)
        if not hint:  # perhaps the right key in the wrong section
            leaves: dict[str, str] = {}
            for o in iter_options():
                leaves.setdefault(o.path[-1], o.dotted)
            hint = _hint(str(loc[-1]), leaves, lambda n: leaves[n])
        where = f" (from {origin})" if origin != "default" else ""
        return f"unknown key {dotted!r}{where}{hint}"
    msg = str(err["msg"])
    msg = msg.removeprefix("Value error, ")
    value = err.get("input")
    shown = _toml_value(value) if _is_plain(value) else repr(value)
    return f"{dotted} = {shown} (from {origin}): {msg}"


def _is_plain(value: Any) -> bool:
    try:
        _toml_value(value)
    except TypeError:
        return False
    return True


# --------------------------------------------------------------------------------------------
# Version 1

#: Version 1 ``[agent]`` keys → (version 2 dotted key, note on how the value changes).
V1_KEYS: Mapping[str, tuple[str, str]] = {
    "node_name": ("runtime.node_name", ""),
    "root": ("runtime.root", ""),
    "state_dir": ("runtime.state", ""),
    "kubeconfig": ("runtime.kubeconfig", ""),
    "namespace": ("runtime.namespace", ""),
    "metrics_port": ("runtime.metrics_address", "port N becomes ':N'; 0 becomes '' (off)"),
    "health_port": ("runtime.health_address", "port N becomes ':N'; 0 becomes '' (off)"),
    "log_level": ("runtime.log_level", ""),
    "log_json": ("runtime.log_format", "true becomes 'json', false 'text'"),
    "gc_interval": ("runtime.gc_period", ""),
    "min_free_disk_percent": ("runtime.min_free_percent", ""),
    "max_store_size": ("runtime.max_store_bytes", ""),
    "snapshotter": ("images.snapshotter", ""),
    "max_concurrent_downloads": ("images.max_concurrent_downloads", ""),
    "max_downloads_per_node": ("images.node_max_concurrent_downloads", ""),
    "image_pull_progress_timeout": ("images.image_pull_progress_timeout", ""),
    "sync_fs": ("images.image_pull_with_sync_fs", ""),
    "discard_unpacked_layers": ("images.discard_unpacked_layers", ""),
    "pinned_images": ("images.pinned_images", ""),
    "registry_config_path": ("images.registry.config_path", ""),
    "registry_headers": ("images.registry.headers", ""),
    "registry_mirrors": (
        "images.registry.mirrors",
        "kept as a table; consider a hosts.toml per host under images.registry.config_path",
    ),
    "tracing": ("tracing.enabled", ""),
}


def _v1_port(key: str, value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 65535:
        return f":{value}" if value else ""
    raise ConfigError(f"agent.{key} = {_toml_value(value)}: expected a port number 0-65535")


def migrate(v1: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Turn a version 1 document into version 2 data.

    Version 1 kept everything in one ``[agent]`` table (see :data:`V1_KEYS`); version 2
    splits it into ``[images]``, ``[runtime]`` and ``[tracing]``. Values are moved as
    written (a duration stays ``"5m"``), except ports (become addresses) and ``log_json``
    (becomes ``log_format``).

    Returns:
        The version 2 data (only the keys the input set, plus ``version = 2``) and one note
        per moved key, e.g. ``"agent.sync_fs → images.image_pull_with_sync_fs"``.

    Raises:
        ConfigError: an unknown key (with a hint), or a value that cannot be converted.
    """
    version = v1.get("version", 1)
    if version != 1 or isinstance(version, bool):
        raise ConfigError(f"version = {_toml_value(version)}: migrate reads version 1 files")
    for key in v1:
        if key not in ("version", "agent"):
            raise ConfigError(
                f"unknown key {key!r} in a version 1 file"
                + _hint(key, ["agent", "version"])
                + "; allowed: version, [agent]"
            )
    agent = v1.get("agent", {})
    if not isinstance(agent, Mapping):
        raise ConfigError(f"agent = {_toml_value(agent)}: expected a table [agent]")
    out: dict[str, Any] = {"version": CURRENT_VERSION}
    notes: list[str] = []
    for key, value in agent.items():
        if key not in V1_KEYS:
            raise ConfigError(
                f"unknown key 'agent.{key}' in a version 1 file"
                + _hint(key, V1_KEYS, lambda k: f"agent.{k}")
            )
        target, _ = V1_KEYS[key]
        if key in ("metrics_port", "health_port"):
            value = _v1_port(key, value)
        elif key == "log_json":
            if not isinstance(value, bool):
                raise ConfigError(f"agent.log_json = {_toml_value(value)}: expected true or false")
            value = "json" if value else "text"
        *parents, last = target.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        note = f"agent.{key} → {target}"
        if key in ("metrics_port", "health_port", "log_json"):
            note += f" = {_toml_value(value)}"
        if key == "registry_mirrors":
            note += " (prefer a hosts.toml per registry under config_path)"
        notes.append(note)
    return out, notes


def v1_keys_markdown() -> str:
    """The version 1 → version 2 key table, as published in docs/configuration.md."""
    lines = ["| Version 1 `[agent]` key | Version 2 key | Change |", "|---|---|---|"]
    for key, (target, change) in V1_KEYS.items():
        lines.append(f"| `{key}` | `{target}` | {change or 'moved as is'} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Writing TOML

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_SECRET_NAME = re.compile(r"password|passwd|token|secret|credential", re.IGNORECASE)
_SECRET_HEADER = re.compile(
    r"^(authorization|proxy-authorization|cookie)$|token|secret|password|api-?key|auth",
    re.IGNORECASE,
)
_URL_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@]*)@", re.IGNORECASE)


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key, ensure_ascii=False)


def _toml_value(value: Any) -> str:
    """One TOML value (strings, numbers, booleans, arrays, inline tables)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        if not value:
            return "{}"
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """Write plain version 2 data as TOML.

    Model sections (``images``, ``images.registry``…) become ``[tables]``, each with its own
    keys before its sub-sections; other mappings (``headers``, ``mirrors``) are inline tables.
    """
    lines: list[str] = []
    _write_table(lines, data, ())
    return "\n".join(lines).strip() + "\n"


def _write_table(lines: list[str], data: Mapping[str, Any], path: tuple[str, ...]) -> None:
    sections = {k: v for k, v in data.items() if _is_section(path + (str(k),), v)}
    scalars = {k: v for k, v in data.items() if k not in sections}
    if path and (scalars or not sections):
        lines.append("")
        lines.append("[" + ".".join(_toml_key(p) for p in path) + "]")
    for key, value in scalars.items():
        lines.append(f"{_toml_key(str(key))} = {_toml_value(value)}")
    for key, value in sections.items():
        _write_table(lines, value, path + (str(key),))


def _is_section(path: tuple[str, ...], value: Any) -> bool:
    return isinstance(value, Mapping) and _model_at(path) is not None


def _plain(settings: BaseModel, *, redact: bool) -> dict[str, Any]:
    """Settings as TOML-ready data: durations as Go text, paths as strings, secrets hidden."""
    out: dict[str, Any] = {}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            out[name] = _plain(value, redact=redact)
            continue
        if _DURATION in field.metadata:
            value = durations.format(value)
        elif isinstance(value, Path):
            value = str(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            value = int(value)
        elif isinstance(value, list):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(value)
        if redact:
            value = _redacted(name, value)
        out[name] = value
    return out


def _redacted(name: str, value: Any) -> Any:
    if _SECRET_NAME.search(name) and value not in ("", None):
        return REDACTED
    if name == "headers" and isinstance(value, dict):
        return {k: (REDACTED if _SECRET_HEADER.search(k) else v) for k, v in value.items()}
    if isinstance(value, dict):
        return {k: _redacted(str(k), v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redacted(name, v) for v in value]
    if isinstance(value, str):
        return _URL_USERINFO.sub(lambda m: f"{m.group(1)}{REDACTED}@", value)
    return value


def dump_toml(settings: Settings, *, redact: bool = True) -> str:
    """The effective configuration as a version 2 TOML file.

    With ``redact`` (the default) secrets are replaced by ``<redacted>``: registry headers
    that carry credentials (``Authorization``, ``Cookie``, names with token/secret/key/auth),
    any field named like a password or token, and ``user:password@`` in URLs.
    """
    return to_toml(_plain(settings, redact=redact))


# --------------------------------------------------------------------------------------------
# Describing the model: `config default` and docs/configuration.md


class Option:
    """One leaf setting, as the docs and the default file show it."""

    def __init__(self, path: tuple[str, ...], field: Any, default: Any) -> None:
        self.path = path
        self.field = field
        self.default = default

    @property
    def dotted(self) -> str:
        return ".".join(self.path)

    @property
    def env(self) -> str:
        return env_var_name(self.path)

    @property
    def description(self) -> str:
        return str(self.field.description or "")

    @property
    def type_name(self) -> str:
        return _type_name(self.field)

    @property
    def computed(self) -> bool:
        """True when the default depends on the machine (user id, environment)."""
        extra = self.field.json_schema_extra
        return isinstance(extra, dict) and "doc_default" in extra

    @property
    def default_text(self) -> str:
        extra = self.field.json_schema_extra
        if isinstance(extra, dict) and "doc_default" in extra:
            return str(extra["doc_default"])
        return _toml_value(self.default)


def env_var_name(path: tuple[str, ...] | str) -> str:
    """``("images", "snapshotter")`` → ``PREFETCHER_IMAGES__SNAPSHOTTER``."""
    parts = path.split(".") if isinstance(path, str) else list(path)
    return ENV_PREFIX + ENV_NESTED_DELIMITER.join(parts).upper()


def iter_options(
    model: type[BaseModel] = Settings, prefix: tuple[str, ...] = ()
) -> Iterator[Option]:
    """Every leaf option, in file order (a section's own keys before its sub-sections)."""
    defaults = _plain(model(), redact=False) if model is not Settings else _plain_defaults()
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((name, ann))
            continue
        yield Option(prefix + (name,), field, defaults[name])
    for name, sub in nested:
        yield from iter_options(sub, prefix + (name,))


def _plain_defaults() -> dict[str, Any]:
    token = _MERGED_ONLY.set(True)
    try:
        return _plain(Settings(), redact=False)
    finally:
        _MERGED_ONLY.reset(token)


def _type_name(field: Any) -> str:
    if _DURATION in field.metadata:
        return "duration"
    if _BYTES in field.metadata:
        return "bytes"
    if _ADDRESS in field.metadata:
        return "address"
    ann = field.annotation
    if get_origin(ann) is Annotated:
        ann = get_args(ann)[0]
    if get_origin(ann) is Literal:
        choices = get_args(ann)
        if all(isinstance(a, int) for a in choices):
            return "integer"
        return " \\| ".join(_toml_value(a) for a in choices)
    if get_origin(ann) is list:
        return "list of strings"
    if get_origin(ann) is dict:
        value_type = get_args(ann)[1]
        return "table of string lists" if get_origin(value_type) is list else "table of strings"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    return names.get(ann, getattr(ann, "__name__", str(ann)))


def _section_docs(model: type[BaseModel]) -> str:
    return " ".join((model.__doc__ or "").split())


def default_toml() -> str:
    """A complete, commented version 2 file holding every default (``prefetcher config default``).

    Options whose default depends on the machine (``runtime.root``, ``runtime.state``) are
    written commented out, so the file keeps that behaviour wherever it is copied.
    """
    out: list[str] = [
        "# image-prefetcher configuration, version 2, with every default.",
        "# Precedence, lowest first: defaults, Downward API (NODE_NAME, POD_NAMESPACE), this file",
        f"# ({DEFAULT_CONFIG_PATH} or $PREFETCHER_CONFIG), PREFETCHER_* environment variables",
        "# (nested with '__'), command-line flags.",
        '# Durations are Go-style: "5m", "1m30s", "0".',
        '# Sizes are bytes or text such as "32GiB". See docs/configuration.md.',
        "",
    ]
    current: tuple[str, ...] = ()
    for option in iter_options():
        section = option.path[:-1]
        if section != current:
            current = section
            model = _model_at(section)
            out.append("")
            if model is not None:
                out.extend(_comment(_section_docs(model)))
            out.append("[" + ".".join(section) + "]")
        out.extend(_comment(option.description + f" Env: {option.env}."))
        line = f"{option.path[-1]} = {_toml_value(option.default)}"
        out.append(("# " + line) if option.computed else line)
    return "\n".join(out).strip() + "\n"


def _comment(text: str) -> list[str]:
    return ["# " + line for line in textwrap.wrap(text, width=96)]


def options_markdown() -> str:
    """The options reference, as published in docs/configuration.md."""
    out: list[str] = []
    current: tuple[str, ...] | None = None
    for option in iter_options():
        section = option.path[:-1]
        if section != current:
            current = section
            title = f"`[{'.'.join(section)}]`" if section else "Top level"
            model = _model_at(section)
            out += ["", f"### {title}", ""]
            if section and model is not None:
                out += [_section_docs(model), ""]
            out += [
                "| Option | Type | Default | Environment variable | Meaning |",
                "|---|---|---|---|---|",
            ]
        default = option.default_text.replace("|", "\\|")
        meaning = option.description.replace("|", "\\|")
        out.append(
            f"| `{option.dotted}` | {option.type_name} | `{default}` | `{option.env}` | {meaning} |"
        )
    return "\n".join(out).strip() + "\n"


#: Markers around the generated parts of docs/configuration.md.
DOC_BLOCKS = {
    "options": options_markdown,
    "v1-keys": v1_keys_markdown,
}


def render_docs(text: str) -> str:
    """Return ``text`` (docs/configuration.md) with its generated blocks brought up to date."""
    for name, render in DOC_BLOCKS.items():
        begin = f"<!-- BEGIN GENERATED: {name} -->"
        end = f"<!-- END GENERATED: {name} -->"
        head, sep, rest = text.partition(begin)
        if not sep:
            raise ValueError(f"no {begin} marker")
        _, sep, tail = rest.partition(end)
        if not sep:
            raise ValueError(f"no {end} marker")
        text = f"{head}{begin}\n{render()}{end}{tail}"
    return text


if __name__ == "__main__":  # pragma: no cover - `python -m agent.config docs/configuration.md`
    for doc in sys.argv[1:]:
        doc_path = Path(doc)
        doc_path.write_text(render_docs(doc_path.read_text(encoding="utf-8")), encoding="utf-8")
