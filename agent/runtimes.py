"""Settings → the image service's backend: where the node's prefetched images go.

The edge (the CLI, the node agent) chooses the backend here and hands it to
:class:`~agent.images.service.ImageService`; the service never looks at the setting.

``images.snapshotter``:

* ``auto`` (the agent's default) — the node's own runtime, found at start: the first
  containerd that answers on :data:`CONTAINERD_SOCKETS` (``images.containerd.address``
  first when set), in namespace ``k8s.io`` with its CRI plugin's snapshotter; else the
  first CRI runtime that answers on :data:`CRI_SOCKETS` (``images.cri.address`` first when
  set); else a start-up error naming every path looked at;
* ``containerd`` — the node's containerd at ``images.containerd.address``;
* ``cri`` — the CRI runtime at ``images.cri.address``;
* ``overlayfs`` / ``naive`` (the CLI's default) — the prefetcher's own store.

Which runtime a store's image records describe is written into the store
(:data:`STORE_RUNTIME_FILE`, by the agent at start and by ``prefetcher pull``), so the
commands that read a store (``prefetcher images ls/rm/gc``, ``mount``) open the same runtime
when neither a flag nor the configuration names one (:func:`open_for_store`).

In containerd modes the registry hosts directory is the node's own (the CRI plugin's
``registry.config_path``, as the running containerd reports it, else as its config file
says, else ``images.registry.config_path``, else :data:`DEFAULT_HOSTS_DIR`), so mirrors,
CAs and ``skip_verify`` match kubelet's own pulls.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent import config
from agent.images import backends, errors
from agent.images.backends import backend as backend_api

logger = logging.getLogger("agent.runtimes")

#: Where containerd's socket is on common distributions, in the order tried.
CONTAINERD_SOCKETS: Final = (
    "/run/containerd/containerd.sock",  # containerd's default (kubeadm, EKS, GKE, AKS, kind)
    "/run/k3s/containerd/containerd.sock",  # k3s, rke2
    "/var/snap/microk8s/common/run/containerd.sock",  # microk8s
)
#: Where other CRI runtimes' sockets are, in the order tried.
CRI_SOCKETS: Final = (
    "/var/run/crio/crio.sock",
    "/run/crio/crio.sock",
    "/var/run/cri-dockerd.sock",
    "/run/cri-dockerd.sock",
)
#: containerd config files that may name the CRI plugin's hosts directory.
CONTAINERD_CONFIGS: Final = (
    "/etc/containerd/config.toml",
    "/var/lib/rancher/k3s/agent/etc/containerd/config.toml",
    "/var/lib/rancher/rke2/agent/etc/containerd/config.toml",
    "/var/snap/microk8s/current/args/containerd.toml",
)
#: containerd's documented hosts directory.
DEFAULT_HOSTS_DIR: Final = "/etc/containerd/certs.d"
#: The containerd namespace the CRI plugin (and so kubelet) uses.
CRI_NAMESPACE: Final = "k8s.io"
#: The file in a store root that names the runtime its image records describe.
STORE_RUNTIME_FILE: Final = "runtime.json"


@dataclass(frozen=True)
class Runtime:
    """The backend chosen, and the registry hosts directory pulls should use."""

    backend: backend_api.Backend
    #: ``None``: no hosts directory (upstream registries only)
    hosts_dir: str | None


def open_runtime(
    settings: config.Settings, *, default: str = "overlayfs", unpack: bool = True
) -> Runtime:
    """The backend ``settings`` ask for, started and checked. ``default`` is what an unset
    ``images.snapshotter`` means (the agent passes ``"auto"``); ``unpack=False``: content
    only, in the prefetcher's store.

    Raises:
        InvalidConfiguration: the configured runtime is missing or misconfigured, or
            ``auto`` found none.
    """
    img = settings.images
    mode = img.snapshotter if "snapshotter" in img.model_fields_set else default
    local_hosts = img.registry.config_path or None
    if not unpack:
        return Runtime(backends.LocalBackend(None), local_hosts)
    if mode == "auto":
        return _detect(settings)
    if mode == "containerd":
        return _containerd(settings, img.containerd.address, img.containerd.namespace)
    if mode == "cri":
        if not img.cri.address:
            raise errors.InvalidConfiguration(
                'images.snapshotter = "cri" needs images.cri.address (the runtime\'s CRI'
                " socket, e.g. /var/run/crio/crio.sock)"
            )
        return Runtime(_cri(img.cri.address), local_hosts)
    return Runtime(backends.open_store(Path(settings.runtime.root), mode), local_hosts)


def open_store_backend(settings: config.Settings) -> backend_api.Backend:
    """:func:`open_for_store`'s backend (for commands that make no registry requests)."""
    return open_for_store(settings).backend


def pinning_warning(info: backend_api.RuntimeInfo) -> str:
    """What to tell an admin whose runtime does not keep pinned images from kubelet's image
    GC (``""``: nothing to tell: it does, or images are not the runtime's)."""
    if info.pins or info.mode == "local":
        return ""
    if info.mode == "containerd":
        return (
            f"containerd {info.version} does not report the prefetched images to kubelet as"
            " pinned (it ignores the io.cri-containerd.pinned label the agent sets; containerd"
            " 1.7 and later honour it): kubelet's image GC may remove a prefetched image that"
            " no container uses once the image filesystem fills up. Prefetches with"
            " completionPolicy: Never pull it again at the agent's next resync; others stay"
            " Complete without it. Upgrade containerd to 1.7 or later to keep them pinned"
        )
    return (
        f"{info.runtime or 'the CRI runtime'} pulls through the CRI, which has no call to pin"
        " an image: kubelet's image GC may remove a prefetched image that no container uses"
        " (prefetches with completionPolicy: Never pull it again at the next resync). Pin"
        " images with the runtime's own configuration (CRI-O: pinned_images) to keep them"
    )


def configured_mode(settings: config.Settings) -> str:
    """``images.snapshotter`` when the file, the environment or a flag set it; else ``""``."""
    img = settings.images
    return img.snapshotter if "snapshotter" in img.model_fields_set else ""


def remember(root: str | os.PathLike[str], info: backend_api.RuntimeInfo) -> None:
    """Write into the store at ``root`` which runtime its image records describe (replaced
    atomically). Content-only backends are not remembered."""
    if info.mode == "local" and not info.snapshotter:
        return
    path = Path(root) / STORE_RUNTIME_FILE
    data = {k: v for k, v in info.to_json().items() if k in
            ("mode", "runtime", "address", "snapshotter", "namespace")}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def remembered(root: str | os.PathLike[str]) -> dict[str, str] | None:
    """What :func:`remember` wrote into the store at ``root`` (``None``: nothing readable)."""
    try:
        data = json.loads((Path(root) / STORE_RUNTIME_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("mode") not in ("local", "containerd", "cri"):
        return None
    return {k: str(v) for k, v in data.items()}


def check_pull_target(settings: config.Settings) -> None:
    """Refuse a pull that would put local-store records into a store whose images are in a
    runtime (the agent's store) only because nothing said where to pull.

    Raises:
        InvalidConfiguration: ``images.snapshotter`` is not configured and the store at
            ``runtime.root`` remembers a runtime.
    """
    if configured_mode(settings):
        return
    stored = remembered(settings.runtime.root)
    if stored is None or stored["mode"] == "local":
        return
    raise errors.InvalidConfiguration(
        f"the store {settings.runtime.root} holds images of {stored['mode']} at"
        f" {stored.get('address', '')} (the node agent's store?), and this pull would put its"
        " image into the local store beside them: pull with --snapshotter auto to put it"
        " where the agent puts its images, --snapshotter overlayfs to keep it in the local"
        " store anyway, or another --root"
    )


def open_for_store(settings: config.Settings) -> Runtime:
    """The backend of the commands that read the store at ``runtime.root`` (``images ls``,
    ``rm``, ``gc``, ``mount``): ``images.snapshotter`` when configured (``auto``: the node's
    runtime, detected as the agent detects it); else the runtime the store's records were
    written for (:func:`remembered`: the agent's, or the last ``prefetcher pull``'s);
    else the local store with overlayfs, ``prefetcher pull``'s default.

    Raises:
        InvalidConfiguration: that runtime is missing or misconfigured.
    """
    if configured_mode(settings):
        return open_runtime(settings)
    stored = remembered(settings.runtime.root)
    if stored is None:
        return open_runtime(settings)
    img = settings.images
    mode, address = stored["mode"], stored.get("address", "")
    logger.info(f"store {settings.runtime.root}: its images are in {mode} {address}".rstrip())
    try:
        if mode == "containerd":
            return _containerd(
                settings, address, stored.get("namespace") or CRI_NAMESPACE,
                snapshotter=stored.get("snapshotter") or img.containerd.snapshotter,
            )
        if mode == "cri":
            return Runtime(_cri(address), img.registry.config_path or None)
    except errors.InvalidConfiguration as e:
        raise errors.InvalidConfiguration(
            f"{e} (the store {settings.runtime.root} holds images of {mode} at {address}, as"
            f" its {STORE_RUNTIME_FILE} says; --snapshotter names another place to look)"
        ) from e
    return Runtime(
        backends.open_store(Path(settings.runtime.root), stored.get("snapshotter") or "overlayfs"),
        img.registry.config_path or None,
    )


def _detect(settings: config.Settings) -> Runtime:
    img = settings.images
    containerd_paths = _candidates(
        img.containerd.address if "address" in img.containerd.model_fields_set else "",
        CONTAINERD_SOCKETS,
    )
    cri_paths = _candidates(img.cri.address, CRI_SOCKETS)
    looked: list[str] = []
    for path in containerd_paths:
        if not _is_socket(path):
            looked.append(f"{path} (no socket)")
            continue
        if not _speaks_containerd(path):
            looked.append(f"{path} (not containerd)")
            cri_paths = [path, *cri_paths]  # some other runtime: try it through the CRI
            continue
        runtime = _containerd(settings, path, CRI_NAMESPACE, follow_cri=True)
        logger.info(f"snapshotter auto: containerd at {path}")
        return runtime
    for path in dict.fromkeys(cri_paths):
        if not _is_socket(path):
            looked.append(f"{path} (no socket)")
            continue
        try:
            backend = _cri(path)
        except errors.InvalidConfiguration as e:
            looked.append(f"{path} ({e})")
            continue
        logger.info(f"snapshotter auto: CRI runtime at {path}")
        return Runtime(backend, img.registry.config_path or None)
    raise errors.InvalidConfiguration(
        'images.snapshotter = "auto" found no container runtime on this node; looked for'
        f" containerd and CRI sockets at: {'; '.join(looked)}. Mount the runtime's socket"
        " into the agent, name it in images.containerd.address or images.cri.address, or"
        ' set images.snapshotter = "overlayfs" for the prefetcher\'s own store'
    )


def _containerd(
    settings: config.Settings,
    address: str,
    namespace: str,
    *,
    follow_cri: bool = False,
    snapshotter: str = "",
) -> Runtime:
    """containerd at ``address``, unpacking into ``snapshotter`` (default
    ``images.containerd.snapshotter``); ``follow_cri``: into its CRI plugin's snapshotter
    whatever that says."""
    from agent.images.containerd import backend as containerd_backend

    img = settings.images
    backend = containerd_backend.ContainerdBackend(
        address,
        namespace,
        snapshotter or img.containerd.snapshotter,
        max_uncompressed_bytes=img.max_layer_uncompressed_bytes,
        max_image_uncompressed_bytes=img.max_image_uncompressed_bytes,
    )
    try:
        report = backend.check()
        if follow_cri and report.cri_snapshotter and (
            report.cri_snapshotter != backend.snapshotter_name
        ):
            backend.close()
            backend = containerd_backend.ContainerdBackend(
                address,
                namespace,
                report.cri_snapshotter,
                max_uncompressed_bytes=img.max_layer_uncompressed_bytes,
                max_image_uncompressed_bytes=img.max_image_uncompressed_bytes,
            )
            report = backend.check()
        report.raise_for_errors()
    except BaseException:
        backend.close()
        raise
    hosts_dir = (
        report.registry_config_path
        or _config_path_from_files(CONTAINERD_CONFIGS)
        or img.registry.config_path
        or DEFAULT_HOSTS_DIR
    )
    return Runtime(backend, hosts_dir)


def _cri(address: str) -> backend_api.Backend:
    from agent.images.cri import backend as cri_backend

    backend = cri_backend.CriBackend(address)
    try:
        backend.check()
    except BaseException:
        backend.close()
        raise
    return backend


def _candidates(configured: str, defaults: Iterable[str]) -> list[str]:
    return list(dict.fromkeys([*([configured] if configured else []), *defaults]))


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _speaks_containerd(path: str) -> bool:
    """Whether containerd's own Version service answers at ``path``."""
    from agent.images.containerd import checks
    from agent.images.containerd import client as client_mod

    with client_mod.Client(path, CRI_NAMESPACE) as client:
        return bool(checks.version_of(client))


def _config_path_from_files(paths: Iterable[str]) -> str:
    """The CRI plugin's ``registry.config_path`` from the first readable config file."""
    for path in paths:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError):
            continue
        plugins = data.get("plugins", {})
        for name in ("io.containerd.grpc.v1.cri", "cri"):
            found = plugins.get(name, {}).get("registry", {}).get("config_path")
            if isinstance(found, str) and found:
                return found
    return ""
