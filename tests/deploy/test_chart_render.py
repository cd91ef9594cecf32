"""The chart as the real Helm engine renders and installs it (into the API emulator)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.cluster import Cluster

from . import helm
from .conftest import NAMESPACE, RELEASE, Release, install

PREFETCHER = str(Path(sys.executable).with_name("prefetcher"))
CAPABILITIES = ["MKNOD", "CHOWN", "FOWNER", "DAC_OVERRIDE", "SETFCAP", "SYS_ADMIN"]
STANDARD_LABELS = ("helm.sh/chart", "app.kubernetes.io/name", "app.kubernetes.io/instance",
                   "app.kubernetes.io/version", "app.kubernetes.io/managed-by",
                   "app.kubernetes.io/component")
JSON = dict[str, Any]


def package_version() -> str:
    data = tomllib.loads((helm.REPO / "pyproject.toml").read_text())
    return str(data["project"]["version"])


def env_of(container: JSON) -> dict[str, JSON]:
    return {e["name"]: e for e in container.get("env") or []}


def host_paths(pod: JSON) -> dict[str, tuple[str, str]]:
    """mountPath → (hostPath, type) for every hostPath volume mounted in the first container."""
    volumes = {v["name"]: v["hostPath"] for v in pod["volumes"] if "hostPath" in v}
    return {m["mountPath"]: (volumes[m["name"]]["path"], volumes[m["name"]]["type"])
            for m in pod["containers"][0]["volumeMounts"] if m["name"] in volumes}


def config_check(text: str, tmp_path: Path) -> JSON:
    """``prefetcher config check`` on the rendered file; returns the file parsed."""
    path = tmp_path / "config.toml"
    path.write_text(text)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([PREFETCHER, "config", "check", str(path)], capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 0, f"prefetcher config check failed:\n{proc.stderr}\n{text}"
    return tomllib.loads(text)


# ------------------------------------------------------------------------------ chart files


def test_app_version_is_the_package_version() -> None:
    chart = yaml.safe_load((helm.CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == package_version()
    assert chart["apiVersion"] == "v2" and chart["name"] == "image-prefetcher"


def test_chart_crds_are_the_repository_crds() -> None:
    top = {p.name: p.read_bytes() for p in (helm.REPO / "crds").glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (helm.CHART / "crds").glob("*.yaml")}
    assert top, "no CRDs in crds/"
    assert chart == top, ("deploy/helm/image-prefetcher/crds/ differs from crds/ (the one "
                          "source): cp crds/*.yaml deploy/helm/image-prefetcher/crds/")


def test_install_creates_the_crds_and_every_object(release: Release) -> None:
    crds = {c["metadata"]["name"] for c in release.cluster.list(
        "apiextensions.k8s.io/v1", "customresourcedefinitions")}
    assert crds == {"imageprefetches.prefetcher.dev", "nodeimagesets.prefetcher.dev"}
    kinds = sorted(o["kind"] for o in release.objects)
    assert kinds == sorted([
        "ServiceAccount", "ServiceAccount", "ConfigMap", "ConfigMap", "ClusterRole",
        "ClusterRole", "ClusterRoleBinding", "ClusterRoleBinding", "Role", "Role",
        "RoleBinding", "RoleBinding", "RoleBinding", "Service", "Service", "Deployment",
        "DaemonSet", "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding",
    ])
    deployment = release.cluster.get("apps/v1", "deployments", f"{RELEASE}-image-prefetcher"
                                     "-operator", NAMESPACE)
    assert deployment is not None, "the Deployment was not created in the cluster"
    daemonset = release.cluster.get("apps/v1", "daemonsets", f"{RELEASE}-image-prefetcher"
                                    "-agent", NAMESPACE)
    assert daemonset is not None, "Helm did not create the agents' DaemonSet"
    notes = release.record["info"]["notes"]
    assert "pod-security.kubernetes.io/enforce=privileged" in notes
    # How to see agents that cannot be created (helm install --wait does not wait for them).
    assert f"describe daemonset {RELEASE}-image-prefetcher-agent" in notes
    assert "CURRENT stays below DESIRED" in notes


def test_the_daemonset_is_a_chart_object_identical_to_the_operators_copy(
        release: Release) -> None:
    """What helm template, GitOps diffs and scanners see is what the operator keeps."""
    assert release.agent_daemonset == release.agent_daemonset_copy
    annotations = release.agent_daemonset["metadata"]["annotations"]
    assert annotations["prefetcher.dev/template-revision"] == "1"
    assert len(annotations["prefetcher.dev/template-hash"]) == 16
    # Helm's ownership marks: a DaemonSet the operator had to recreate from the copy is one
    # the next helm upgrade adopts instead of refusing.
    assert annotations["meta.helm.sh/release-name"] == RELEASE
    assert annotations["meta.helm.sh/release-namespace"] == NAMESPACE
    assert release.agent_daemonset["metadata"]["labels"]["app.kubernetes.io/managed-by"] == \
        "Helm"


# ------------------------------------------------------------------------------ labels


@pytest.mark.parametrize("which", ["release", "release_all"])
def test_every_object_carries_the_standard_labels(which: str,
                                                  request: pytest.FixtureRequest) -> None:
    rel: Release = request.getfixturevalue(which)
    for obj in [*rel.objects, rel.agent_daemonset_copy]:
        labels = obj["metadata"].get("labels") or {}
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{obj['kind']} {obj['metadata']['name']}: no {missing}"
        assert labels["helm.sh/chart"] == "image-prefetcher-0.2.0"
        assert labels["app.kubernetes.io/version"] == package_version()
        assert labels["app.kubernetes.io/instance"] == RELEASE
    if which == "release_all":
        assert all(o["metadata"]["labels"]["team"] == "platform" for o in rel.objects)


def test_selectors_match_their_pods_and_services(release: Release) -> None:
    deployment = release.get("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    ds = release.agent_daemonset
    agent_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= agent_labels.items()
    assert agent_labels["app.kubernetes.io/component"] == "agent"
    services = {s["metadata"]["name"]: s for s in release.all("Service")}
    operator_svc = services[f"{RELEASE}-image-prefetcher-operator-metrics"]
    agent_svc = services[f"{RELEASE}-image-prefetcher-agent-metrics"]
    assert operator_svc["spec"]["selector"].items() <= pod_labels.items()
    assert agent_svc["spec"]["selector"].items() <= agent_labels.items()
    assert agent_svc["spec"]["clusterIP"] == "None"
    assert not agent_svc["spec"]["selector"].items() <= pod_labels.items()


# ------------------------------------------------------------------------------ config


@pytest.mark.parametrize("which", ["release", "release_all"])
def test_config_toml_passes_prefetcher_config_check(which: str, tmp_path: Path,
                                                    request: pytest.FixtureRequest) -> None:
    rel: Release = request.getfixturevalue(which)
    cfg = config_check(rel.config_toml, tmp_path)
    assert cfg["runtime"]["namespace"] == NAMESPACE
    assert cfg["operator"]["standalone"] is False
    assert cfg["operator"]["agent_daemonset"] == "/etc/prefetcher/agent-daemonset.yaml"
    # The agents' DaemonSet is owned by the ConfigMap holding its manifest (helm uninstall).
    owner = cfg["operator"]["agent_daemonset_owner"]
    assert rel.get("ConfigMap", owner)["data"]["agent-daemonset.yaml"]
    # The operator finds both files where the chart mounts them.
    deployment = rel.get("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["args"][:3] == ["operator", "--config", "/etc/prefetcher/config.toml"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert mount["mountPath"] == "/etc/prefetcher" and "subPath" not in mount
    sources = next(v for v in pod["volumes"] if v["name"] == "config")["projected"]["sources"]
    names = {s["configMap"]["name"] for s in sources}
    configmaps = {c["metadata"]["name"]: c for c in rel.all("ConfigMap")}
    assert {k for n in names for k in configmaps[n]["data"]} >= {"config.toml",
                                                                   "agent-daemonset.yaml"}
    # The leader Lease the operator's RBAC names is the one its config elects through.
    operator_role = next(r for r in rel.all("Role") if r["metadata"]["name"].endswith("-operator"))
    lease_rules = [r for r in operator_role["rules"]
                   if "leases" in r["resources"] and r.get("resourceNames")]
    assert [r["resourceNames"] for r in lease_rules] == [[cfg["operator"]["peering_name"]]]


def test_config_values_reach_the_toml(release_all: Release, tmp_path: Path) -> None:
    cfg = config_check(release_all.config_toml, tmp_path)
    images, runtime = cfg["images"], cfg["runtime"]
    assert images["snapshotter"] == "containerd"
    assert images["image_pull_progress_timeout"] == "2m30s"
    assert images["image_pull_min_bytes_per_second"] == 1048576
    assert images["pinned_images"] == ["registry.k8s.io/pause:3.10"]
    assert images["max_image_uncompressed_bytes"] == "48GiB"
    assert images["registry"]["config_path"] == "/etc/prefetcher/certs.d"
    assert images["registry"]["headers"] == {"User-Agent": "acme-prefetcher"}
    assert images["registry"]["mirrors"] == {"docker.io": ["https://mirror.gcr.io"]}
    assert images["containerd"]["address"] == "/run/k3s/containerd/containerd.sock"
    assert runtime["root"] == "/mnt/prefetcher"
    assert runtime["max_store_bytes"] == 107374182400 and runtime["min_free_bytes"] == "20GiB"
    assert runtime["metrics_address"] == ":19090" and runtime["health_address"] == ":18081"
    assert cfg["operator"]["peering_name"] == "all-options-peering"
    assert cfg["operator"]["resolve_digests"] is False
    assert cfg["tracing"]["http_client_spans"] is False


def test_registry_hosts_are_mounted_in_the_containerd_layout(release_all: Release) -> None:
    for pod in (release_all.agent_daemonset["spec"]["template"]["spec"],
                release_all.get("Deployment")["spec"]["template"]["spec"]):
        volume = next(v for v in pod["volumes"] if v["name"] == "registry-hosts")
        paths = sorted(i["path"] for i in volume["configMap"]["items"])
        assert paths == ["_default/hosts.toml", "registry.example.com:5000/hosts.toml"]
        mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
        assert mounts["registry-hosts"] == "/etc/prefetcher/certs.d"
    cm = release_all.get("ConfigMap", "all-options-registry-hosts")
    assert 'server = "https://registry.example.com:5000"' in \
        cm["data"]["registry.example.com_5000.hosts.toml"]


# ------------------------------------------------------------------------------ the agent


RUNTIME_HOST_PATHS = {
    "/run/containerd", "/var/lib/containerd", "/etc/containerd", "/run/k3s/containerd",
    "/var/lib/rancher/k3s/agent/containerd", "/var/lib/rancher/rke2/agent/containerd",
    "/var/lib/rancher/k3s/agent/etc/containerd", "/var/lib/rancher/rke2/agent/etc/containerd",
    "/var/snap/microk8s/common/run", "/var/snap/microk8s/common/var/lib/containerd", "/run/crio",
}


def test_agent_daemonset_defaults(release: Release) -> None:
    ds = release.agent_daemonset
    assert ds["kind"] == "DaemonSet"
    assert ds["metadata"]["name"] == f"{RELEASE}-image-prefetcher-agent"
    spec = ds["spec"]
    assert spec["updateStrategy"] == {"type": "RollingUpdate",
                                      "rollingUpdate": {"maxUnavailable": "10%"}}
    pod = spec["template"]["spec"]
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["serviceAccountName"] == f"{RELEASE}-image-prefetcher-agent"
    assert pod["automountServiceAccountToken"] is True
    assert pod["securityContext"]["runAsUser"] == 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod and "hostPID" not in pod
    [container] = pod["containers"]
    assert container["args"] == ["agent", "--config", "/etc/prefetcher/config.toml"]
    assert container["image"] == f"ghcr.io/image-prefetcher/image-prefetcher:{package_version()}"
    sc = container["securityContext"]
    assert sc["privileged"] is False
    assert sc["capabilities"] == {"drop": ["ALL"], "add": CAPABILITIES}
    assert "allowPrivilegeEscalation" not in sc  # false is invalid with SYS_ADMIN added
    assert sc["readOnlyRootFilesystem"] is True
    env = env_of(container)
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["OTEL_SERVICE_NAME"]["value"] == "image-prefetcher-agent"
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in env
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"health": 8081, "metrics": 9090}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "health"}
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert mounts["/etc/prefetcher"].get("readOnly") is True
    assert {"/run/prefetcher", "/tmp"} <= set(mounts)  # writable with a read-only root


def test_agents_schedule_on_every_linux_node_of_a_managed_cluster(release: Release) -> None:
    """No system-node-critical outside kube-system (GKE rejects it without a quota, and the
    DaemonSet then never gets a pod); Linux nodes only; never virtual nodes."""
    pod = release.agent_daemonset["spec"]["template"]["spec"]
    assert "priorityClassName" not in pod
    assert release.all("ResourceQuota") == []
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    [term] = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"]
    excluded = {e["key"]: (e["operator"], e["values"]) for e in term["matchExpressions"]}
    assert excluded == {"type": ("NotIn", ["virtual-kubelet"]),
                        "eks.amazonaws.com/compute-type": ("NotIn", ["fargate"])}


def test_in_kube_system_the_agents_are_node_critical(tmp_path: Path) -> None:
    [rel] = list(install(tmp_path, namespace="kube-system"))
    pod = rel.agent_daemonset["spec"]["template"]["spec"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert "agent.priorityClassQuota" not in rel.record["info"]["notes"]


def test_default_store_is_the_nodes_runtime(release: Release, tmp_path: Path) -> None:
    """#13: with default values the agent detects the node's runtime (snapshotter auto) and
    has the host directories every detected mode needs, mounted as directories (a runtime
    restart re-creates its socket inside them) at the same paths."""
    cfg = config_check(release.config_toml, tmp_path)
    assert cfg["images"]["snapshotter"] == "auto"
    pod = release.agent_daemonset["spec"]["template"]["spec"]
    paths = host_paths(pod)
    assert set(paths) == RUNTIME_HOST_PATHS | {"/var/lib/prefetcher"}
    assert all(path == mount and kind == "DirectoryOrCreate"
               for mount, (path, kind) in paths.items())
    assert not any(p.endswith(".sock") for p in paths)
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    read_only = {path for path, m in mounts.items() if m.get("readOnly")}
    assert read_only == {"/etc/prefetcher", "/etc/containerd",
                         "/var/lib/rancher/k3s/agent/etc/containerd",
                         "/var/lib/rancher/rke2/agent/etc/containerd"}
    assert not mounts["/var/lib/containerd"].get("readOnly")
    assert "into each node's container runtime" in release.record["info"]["notes"]


def test_private_store_mounts_no_runtime_directory(tmp_path: Path) -> None:
    [rel] = list(install(tmp_path, {"agent": {"store": "private"}}))
    cfg = config_check(rel.config_toml, tmp_path)
    assert cfg["images"]["snapshotter"] == "overlayfs"
    pod = rel.agent_daemonset["spec"]["template"]["spec"]
    assert host_paths(pod) == {"/var/lib/prefetcher": ("/var/lib/prefetcher",
                                                       "DirectoryOrCreate")}
    assert "agents' own store" in rel.record["info"]["notes"]


def test_private_store_with_containerd_is_refused(tmp_path: Path) -> None:
    values = {"agent": {"store": "private"}, "config": {"images": {"snapshotter": "containerd"}}}
    with pytest.raises(helm.HelmFailed, match="agent.store is private but"):
        list(install(tmp_path, values))


def test_runtime_host_paths_follow_the_values(release_all: Release) -> None:
    pod = release_all.agent_daemonset["spec"]["template"]["spec"]
    assert host_paths(pod) == {
        "/mnt/prefetcher": ("/mnt/prefetcher", "DirectoryOrCreate"),
        "/run/k3s/containerd": ("/run/k3s/containerd", "DirectoryOrCreate"),
        "/var/lib/rancher/k3s/agent/containerd": ("/var/lib/rancher/k3s/agent/containerd",
                                                  "DirectoryOrCreate"),
        "/var/lib/rancher/k3s/agent/etc/containerd": (
            "/var/lib/rancher/k3s/agent/etc/containerd", "DirectoryOrCreate"),
        "/etc/pki": ("/etc/pki", "Directory"),  # agent.extraVolumes
    }
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/var/lib/rancher/k3s/agent/etc/containerd"]["readOnly"] is True
    assert not mounts["/run/k3s/containerd"].get("readOnly")


def test_agent_privileged_only_when_asked(release_all: Release) -> None:
    pod = release_all.agent_daemonset["spec"]["template"]["spec"]
    sc = pod["containers"][0]["securityContext"]
    assert sc["privileged"] is True and "capabilities" not in sc
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "gpu",
                                   "effect": "NoSchedule"}]
    assert pod["terminationGracePeriodSeconds"] == 60
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["priorityClassName"] == "system-node-critical"


def test_platform_values_reach_both_components(release_all: Release) -> None:
    """global.imageRegistry, image by digest, extra args/env/volumes, registry CA and client
    certificate Secrets, pod labels and annotations: on the operator and on the agents."""
    deployment = release_all.get("Deployment")["spec"]["template"]
    agent = release_all.agent_daemonset["spec"]["template"]
    for template, component in ((deployment, "operator"), (agent, "agent")):
        pod = template["spec"]
        [container] = pod["containers"]
        assert container["image"] == (
            "registry.example.com/mirror/image-prefetcher/image-prefetcher@sha256:"
            "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
        assert container["args"] == [component, "--config", "/etc/prefetcher/config.toml",
                                     "--verbose"]
        assert env_of(container)[f"EXTRA_{component.upper()}"]["value"] == "1"
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        for secret in ("registry-ca", "registry-client"):
            mount = mounts[f"/etc/prefetcher/certs/{secret}"]
            assert mount["readOnly"] is True
            assert volumes[mount["name"]]["secret"] == {"secretName": secret}
        assert mounts["/extra" if component == "operator" else "/etc/pki"]
        assert template["metadata"]["annotations"]["example.com/owner"] == "platform"
        assert template["metadata"]["labels"]["example.com/tier"] in ("control", "node")


def test_a_repository_with_a_registry_host_is_used_as_it_is(tmp_path: Path) -> None:
    """Values written for chart 0.1 (the registry inside image.repository) still work."""
    [rel] = list(install(tmp_path, {
        "image": {"repository": "my.registry:5000/team/image-prefetcher", "tag": "1.2"},
        "agent": {"priorityClassName": "system-node-critical"}}))
    pod = rel.agent_daemonset["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "my.registry:5000/team/image-prefetcher:1.2"
    # A critical priority class outside kube-system without the quota: the notes say so.
    assert "agent.priorityClassQuota=true to ship one" in rel.record["info"]["notes"]


def test_priority_class_quota_admits_the_agents_priority_class(release_all: Release) -> None:
    quota = release_all.get("ResourceQuota")
    assert quota["metadata"]["namespace"] == NAMESPACE
    assert quota["spec"]["scopeSelector"] == {"matchExpressions": [{
        "scopeName": "PriorityClass", "operator": "In", "values": ["system-node-critical"]}]}


def test_config_change_rolls_the_agents(tmp_path: Path) -> None:
    """The DaemonSet's pod template carries the config checksum, so a config change changes
    the manifest the operator keeps (and so its template hash)."""
    base = yaml.safe_load((helm.CHART / "values.yaml").read_text())
    changed = helm.deep_merge(base, {"config": {"images": {"maxConcurrentDownloads": 5}}})

    def checksum(values: JSON) -> str:
        workdir = tmp_path / str(len(list(tmp_path.iterdir())))
        workdir.mkdir()
        [rel] = list(install(workdir, values))
        annotations = rel.agent_daemonset["metadata"]["annotations"]
        return str(rel.agent_daemonset["spec"]["template"]["metadata"]["annotations"]
                   ["checksum/config"]) + annotations["prefetcher.dev/template-hash"]

    one, other = checksum(base), checksum(changed)
    assert one[:64] != other[:64] and one[64:] != other[64:]
    assert checksum(base) == one  # the hash the operator compares is stable


# ------------------------------------------------------------------------------ the operator


def test_operator_deployment(release: Release) -> None:
    deployment = release.get("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == f"{RELEASE}-image-prefetcher-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    [container] = pod["containers"]
    sc = container["securityContext"]
    assert sc == {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                  "capabilities": {"drop": ["ALL"]}}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["requests"]["cpu"] and container["resources"]["limits"]
    assert env_of(container)["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.namespace"
    assert "checksum/config" in deployment["spec"]["template"]["metadata"]["annotations"]
    assert not any("hostPath" in v for v in pod["volumes"])


def test_otel_settings_are_passed_as_otel_variables(release_all: Release) -> None:
    for container in (release_all.get("Deployment")["spec"]["template"]["spec"]["containers"][0],
                      release_all.agent_daemonset["spec"]["template"]["spec"]["containers"][0]):
        env = env_of(container)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"]["value"] == "http://otel-collector.monitoring:4317"
        assert env["OTEL_EXPORTER_OTLP_PROTOCOL"]["value"] == "grpc"
        assert env["OTEL_EXPORTER_OTLP_HEADERS"]["valueFrom"] == {
            "secretKeyRef": {"name": "otlp-headers", "key": "headers"}}
        assert env["OTEL_TRACES_SAMPLER"]["value"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"]["value"] == "0.25"
        attrs = env["OTEL_RESOURCE_ATTRIBUTES"]["value"].split(",")
        assert "k8s.node.name=$(NODE_NAME)" in attrs
        assert "deployment.environment=staging" in attrs
        names = list(env)
        assert names.index("NODE_NAME") < names.index("OTEL_RESOURCE_ATTRIBUTES")
    extra = env_of(release_all.get("Deployment")["spec"]["template"]["spec"]["containers"][0])
    assert extra["EXTRA_OPERATOR"]["value"] == "1"


def test_every_option_renders_its_objects(release_all: Release) -> None:
    monitors = release_all.all("ServiceMonitor")
    assert len(monitors) == 2
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "metrics" and endpoint["interval"] == "15s"
    pdb = release_all.get("PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1
    deployment = release_all.get("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert {s["metadata"]["name"] for s in release_all.all("ServiceAccount")} == {
        "all-options-operator-sa", "all-options-agent-sa"}
    binding = release_all.get("ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["validationActions"] == ["Warn", "Audit"]
    assert release_all.cluster.list("monitoring.coreos.com/v1", "servicemonitors") != []


def test_defaults_render_no_optional_objects(release: Release) -> None:
    assert release.all("ServiceMonitor") == [] and release.all("PodDisruptionBudget") == []


# ------------------------------------------------------------------------------ admission


def test_admission_policy_is_skipped_where_the_api_is_not_served(tmp_path: Path) -> None:
    [rel] = list(install(tmp_path, admission_policies=False))
    assert rel.all("ValidatingAdmissionPolicy") == []
    assert "policy that confines each agent" in rel.record["info"]["notes"]


def test_upgrade_and_uninstall(tmp_path: Path) -> None:
    """helm upgrade changes the agents' manifest in place; uninstall removes the chart's
    objects but never the CRDs (so ImagePrefetches and NodeImageSets survive it)."""
    with Cluster(tmp_path) as cluster:
        cluster.put("v1", "namespaces", {"metadata": {"name": NAMESPACE}})
        helm.serve_builtin_apis(cluster)
        install_, upgrade, uninstall = helm.run([
            {"action": "install", "release": RELEASE},
            {"action": "upgrade", "release": RELEASE, "values": {"agent": {"store": "private"}}},
            {"action": "uninstall", "release": RELEASE},
        ], kubeconfig=cluster.kubeconfig_path, namespace=NAMESPACE)
        assert upgrade["result"]["version"] == 2
        assert "path: /run/containerd" in install_["result"]["manifest"]
        assert "path: /run/containerd" not in upgrade["result"]["manifest"]
        [ds] = [o for o in helm.manifest(upgrade["result"]) if o["kind"] == "DaemonSet"]
        assert ds["metadata"]["annotations"]["prefetcher.dev/template-revision"] == "2"
        assert uninstall["result"]["release"]["info"]["status"] == "uninstalled"
        assert cluster.list("v1", "configmaps", NAMESPACE) == []
        assert cluster.list("apps/v1", "deployments", NAMESPACE) == []
        assert cluster.list("apps/v1", "daemonsets", NAMESPACE) == []
        assert len(cluster.list("apiextensions.k8s.io/v1", "customresourcedefinitions")) == 2
