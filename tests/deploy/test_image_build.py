"""The container image, built with Debian's buildah from the Dockerfile and run with podman.

No image registry is reachable here, so the Dockerfile's ``BASE`` is a local image made from
Debian packages (``mmdebstrap --variant=minbase`` with python3 3.11 and python3-venv, from
the mirror this machine's apt uses), imported into the containers storage. The base tarball
is cached in ``/var/cache/image-prefetcher-test/`` (``$PREFETCHER_TEST_CACHE``), keyed by
its inputs and the ISO week; buildah's ``--layers`` cache keeps the dependency layer
between runs (it is rebuilt only when ``requirements.lock`` changes). pip inside the build
reaches PyPI through the host network, trusting the host's CA bundle (``PIP_CERT``).

The containers run with what the chart renders (the real Helm engine, see ``conftest``):
the operator Deployment's user, read-only root filesystem, dropped capabilities,
no-new-privileges and its ``emptyDir`` at /tmp; the agent DaemonSet's root user and
capabilities. ``podman run`` needs explicit, lower rlimits on this machine (see :func:`rlimits`).

Cold (no cache): about 2 min for the base and 3-4 min for the build on 2 busy cores;
warm: seconds. Marked ``image``; ``scripts/test`` runs it.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fixtures import images, registries
from fixtures.registries import Registry

import agent

from . import helm
from .conftest import NAMESPACE, Release, install

TOOLS = ("buildah", "podman", "mmdebstrap")
pytestmark = [
    pytest.mark.image,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: buildah and podman as root"),
    pytest.mark.skipif(not all(shutil.which(t) for t in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} (scripts/setup installs them)"),
]

CACHE = Path(os.environ.get("PREFETCHER_TEST_CACHE", "/var/cache/image-prefetcher-test"))
SUITE = "bookworm"
#: What the Dockerfile needs from a base: python3 with venv, mount(8), useradd, CA roots.
PACKAGES = ("python3", "python3-venv", "ca-certificates", "mount", "passwd")
IMAGE = "localhost/image-prefetcher:test"
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
#: Open files and processes in the test containers.
RLIMIT = 8192
JSON = dict[str, Any]


# ---------------------------------------------------------------------------------- base


def apt_sources(suite: str = SUITE) -> list[str]:
    """``deb URI SUITE COMPONENTS`` lines for ``suite`` (and -updates, -security) from this
    machine's apt configuration (one-line and deb822 files), for mmdebstrap."""
    wanted = {suite, f"{suite}-updates", f"{suite}-security"}
    lines: list[str] = []
    apt = Path("/etc/apt")
    for path in [apt / "sources.list", *sorted(apt.glob("sources.list.d/*.list"))]:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 4 and words[0] == "deb" and words[2] in wanted:
                lines.append(" ".join(words))
    for path in sorted(apt.glob("sources.list.d/*.sources")):
        for stanza in re.split(r"\n\s*\n", path.read_text()):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                if line and not line.startswith(("#", " ")) and ":" in line:
                    key, _, value = line.partition(":")
                    fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split() or \
                    fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                for s in fields.get("suites", "").split():
                    if s in wanted:
                        lines.append(f"deb {uri} {s} {fields.get('components', 'main')}")
    return lines


def base_image() -> str:
    """The local Debian base, built (or taken from the cache) and imported; its name."""
    sources = apt_sources()
    assert sources, f"no {SUITE} source in /etc/apt: cannot build the test base"
    year, week, _ = datetime.date.today().isocalendar()
    key = hashlib.sha256(
        json.dumps([SUITE, PACKAGES, sources, f"{year}-W{week}"]).encode()).hexdigest()[:12]
    name = f"localhost/prefetcher-test-base:{key}"
    if subprocess.run(["podman", "image", "exists", name]).returncode == 0:
        return name
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"base-{key}.tar"
    if not tarball.exists():
        partial = tarball.with_suffix(".partial")
        subprocess.run(["mmdebstrap", "--quiet", "--variant=minbase",
                        f"--include={','.join(PACKAGES)}", "--format=tar", SUITE, str(partial),
                        *sources], check=True, timeout=900)
        partial.rename(tarball)
        for old in CACHE.glob("base-*.tar"):
            if old != tarball:
                old.unlink()
    subprocess.run(["podman", "import", "--quiet", str(tarball), name], check=True,
                   capture_output=True, timeout=300)
    return name


def pip_build_args() -> list[str]:
    """The host's way to PyPI, for pip in the build: its CA bundle and index variables."""
    args: list[str] = []
    if HOST_CA.exists():
        args += ["--volume", f"{HOST_CA}:/run/host-ca.crt:ro",
                 "--build-arg", "PIP_CERT=/run/host-ca.crt"]
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST"):
        value = " ".join(v for v in os.environ.get(name, "").split()
                         if not v.startswith("file:"))
        if value:
            args += ["--build-arg", f"{name}={value}"]
    return args


@pytest.fixture(scope="module")
def image() -> str:
    base = base_image()
    started = time.monotonic()
    build = subprocess.run(
        ["buildah", "bud", "--quiet", "--layers", "--network", "host",
         "--build-arg", f"BASE={base}", *pip_build_args(), "--tag", IMAGE, str(helm.REPO)],
        capture_output=True, text=True, timeout=1500)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    print(f"built {IMAGE} on {base} in {time.monotonic() - started:.0f}s")
    return IMAGE


# ------------------------------------------------------------------------------ running


def podman_run(image: str, *args: str, options: list[str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", "run", "--rm", *rlimits(), *(options or []), image, *args],
                          capture_output=True, text=True, timeout=timeout)


def rlimits() -> list[str]:
    """podman's default rlimits (nofile 1048576…) cannot be set here; ask for ones below
    what this machine lets containers have (measured: 32768 works, 65536 does not)."""
    out = []
    for name, which in (("nofile", resource.RLIMIT_NOFILE), ("nproc", resource.RLIMIT_NPROC)):
        hard = resource.getrlimit(which)[1]
        value = RLIMIT if hard == resource.RLIM_INFINITY else min(RLIMIT, hard)
        out += ["--ulimit", f"{name}={value}:{value}"]
    return out


def security_options(pod: JSON, container: JSON) -> list[str]:
    """podman flags for a pod spec's and container's securityContext and emptyDir mounts."""
    pod_sc, sc = pod.get("securityContext") or {}, container.get("securityContext") or {}
    user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    group = sc.get("runAsGroup", pod_sc.get("runAsGroup"))
    opts = []
    if user is not None:
        opts += ["--user", f"{user}:{group if group is not None else user}"]
    if sc.get("privileged"):
        opts.append("--privileged")
    caps = sc.get("capabilities") or {}
    opts += [f"--cap-drop={c}" for c in caps.get("drop") or []]
    opts += [f"--cap-add={c}" for c in caps.get("add") or []]
    if sc.get("allowPrivilegeEscalation") is False:
        opts += ["--security-opt", "no-new-privileges"]
    if sc.get("readOnlyRootFilesystem"):
        opts += ["--read-only", "--read-only-tmpfs=false"]
    empty_dirs = {v["name"] for v in pod.get("volumes") or [] if "emptyDir" in v}
    for mount in container.get("volumeMounts") or []:
        if mount["name"] in empty_dirs:
            opts += ["--tmpfs", mount["mountPath"]]
    return opts


@pytest.fixture(scope="module")
def chart(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart installed with its defaults (the Helm engine) into an emulator."""
    yield from install(tmp_path_factory.mktemp("chart"))


def pod_of(release: Release, kind: str) -> tuple[JSON, JSON]:
    if kind == "Deployment":
        workload = release.get("Deployment")
    else:
        rendered = release.all("DaemonSet")
        workload = rendered[0] if rendered else release.agent_daemonset
    pod = workload["spec"]["template"]["spec"]
    return pod, pod["containers"][0]


# -------------------------------------------------------------------------------- tests


def test_the_image_runs_prefetcher_as_its_non_root_user(image: str) -> None:
    out = podman_run(image, "--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"prefetcher {agent.__version__}"
    who = podman_run(image, "-c", "import os; print(os.getuid(), os.getgid())",
                     options=["--entrypoint", "python3"])
    assert who.stdout.split() == ["65532", "65532"], who.stderr
    inspect = json.loads(subprocess.run(["podman", "image", "inspect", image],
                                        capture_output=True, text=True, check=True).stdout)[0]
    labels = inspect["Config"]["Labels"] or inspect.get("Labels") or {}
    assert labels["org.opencontainers.image.version"] == agent.__version__
    assert inspect["Config"]["Entrypoint"] == ["prefetcher"]
    size = int(inspect["Size"])
    print(f"image size: {size / 1e6:.0f} MB (on the Debian test base)")


def test_the_agents_security_context_pulls_from_a_loopback_registry_into_a_volume(
    image: str, chart: Release, registry: Registry, tmp_path: Path
) -> None:
    layers = [images.layer({"etc/motd": "hello from the image\n"}),
              images.random_layer(200_000, files=4, seed=161)]
    images.push(registry, "image/app", "1", images.Image(layers))
    ref = f"{registry.host}/image/app:1"
    store = tmp_path / "store"
    store.mkdir()
    pod, container = pod_of(chart, "DaemonSet")
    options = [*security_options(pod, container), "--network", "host",
               "--volume", f"{store}:/var/lib/prefetcher"]

    out = podman_run(image, "pull", ref, "--root", "/var/lib/prefetcher", "--json",
                     options=options, timeout=300)

    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["bytes_downloaded"] > 200_000
    assert result["chain_id"], "unpacked into a snapshot"
    # The volume holds the image, readable by the host's prefetcher (the same store format).
    listed = subprocess.run([str(Path(sys.executable).with_name("prefetcher")), "images",
                             "ls", "--json", "--root", str(store)],
                            capture_output=True, text=True, timeout=60, check=True)
    [entry] = json.loads(listed.stdout)
    assert ref in json.dumps(entry) and result["digest"] in json.dumps(entry)


def test_the_operator_runs_with_the_charts_security_context_against_the_api(
    image: str, chart: Release, tmp_path: Path
) -> None:
    cluster = chart.cluster
    cluster.add_node("node-a")
    pod, container = pod_of(chart, "Deployment")
    config = tmp_path / "config"
    config.mkdir()
    (config / "config.toml").write_text(chart.config_toml)
    (config / "agent-daemonset.yaml").write_text(yaml.safe_dump(chart.agent_daemonset))
    args = container["args"]
    config_dir = Path(args[args.index("--config") + 1]).parent  # where the chart mounts it
    health_port = registries.free_port()
    name = f"prefetcher-operator-test-{os.getpid()}"
    options = [
        *security_options(pod, container), "--network", "host", "--name", name,
        "--volume", f"{config}:{config_dir}:ro",
        "--volume", f"{cluster.kubeconfig_path}:/run/kubeconfig:ro",
        "--env", f"POD_NAMESPACE={NAMESPACE}", "--env", f"POD_NAME={name}",
        # The chart's :8081 and :9090 on the host network could clash with another process.
        "--env", f"PREFETCHER_RUNTIME__HEALTH_ADDRESS=127.0.0.1:{health_port}",
        "--env", f"PREFETCHER_RUNTIME__METRICS_ADDRESS=127.0.0.1:{registries.free_port()}",
    ]
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            ["podman", "run", "--rm", *rlimits(), *options, image, *args,
             "--kubeconfig", "/run/kubeconfig"], stdout=out, stderr=subprocess.STDOUT)
    try:
        # kubelet's liveness probe: the chart's health port answers.
        probe = container["livenessProbe"]["httpGet"]["path"]
        cluster.wait_for(lambda: healthy(f"http://127.0.0.1:{health_port}{probe}")
                         or process.poll() is not None, timeout=60)
        assert process.poll() is None, log.read_text()
        # It reads its mounted config: the agents' DaemonSet from agent-daemonset.yaml.
        cluster.wait_for(lambda: cluster.list("apps/v1", "daemonsets", NAMESPACE), timeout=30,
                         message="the operator created the agents' DaemonSet")
        cluster.apply({"apiVersion": "prefetcher.dev/v1alpha1", "kind": "ImagePrefetch",
                       "metadata": {"name": "web", "namespace": NAMESPACE},
                       "spec": {"images": ["registry.example/web:1"]}})
        nis = cluster.wait_for(
            lambda: cluster.get("prefetcher.dev/v1alpha1", "nodeimagesets", "node-a"),
            timeout=30, message="the operator wrote node-a's NodeImageSet")
        assert nis is not None
        assert [e["image"] for e in nis["spec"]["images"]] == ["registry.example/web:1"]
    finally:
        subprocess.run(["podman", "stop", "--time", "20", name], capture_output=True,
                       timeout=60)
        code = process.wait(timeout=60)
    output = log.read_text()
    assert code == 0, output
    assert "Read-only file system" not in output and "Permission denied" not in output, output


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
