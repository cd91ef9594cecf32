"""The real Helm engine (Helm 4, through the ``helm_sdkpy`` wheel) on the chart.

``helm_sdkpy`` has no ``helm template``: rendering is a real ``helm install`` against the
API emulator (``tests/kube``). Two things make that work:

- ``HELM_DRIVER=memory``: Helm keeps its release record in memory instead of a Secret. Helm's
  typed client writes that Secret as protobuf, which the emulator does not speak; every
  chart object goes through the dynamic (JSON) client and is created for real. The Go
  runtime reads its environment once, at process start, so the engine runs in a child
  process (:mod:`tests.deploy.helm_engine`), one per scenario.
- :func:`serve_builtin_apis`: the built-in APIs the chart uses that the emulator does not
  serve by itself (RBAC, admission policies, PodDisruptionBudgets, ResourceQuotas,
  NetworkPolicies) are
  registered on it, as is the Prometheus Operator's ServiceMonitor (a CRD on a real
  cluster).

``helm_sdkpy``'s lint result loses the messages' text (Go errors marshal to ``{}``): it gives
severity and path only, so :func:`lint` pairs it with the schema check and a render, which
carry the text.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.kube.cluster import Cluster
from tests.kube.emulator import ResourceType

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "deploy" / "helm" / "image-prefetcher"
VALUES_ALL = REPO / "deploy" / "helm" / "values-all.yaml"

SEVERITY = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}

JSON = dict[str, Any]


class HelmFailed(AssertionError):
    """A Helm action failed; the message is Helm's."""


def run(steps: list[JSON], *, kubeconfig: Path | None = None, namespace: str = "default",
        allow_failure: bool = False) -> list[JSON]:
    """Run ``steps`` in one ``helm_engine`` child process (one Helm configuration)."""
    job = {"kubeconfig": str(kubeconfig) if kubeconfig else None, "namespace": namespace,
           "steps": [{"chart": str(CHART), **s} for s in steps]}
    env = dict(os.environ, HELM_DRIVER="memory")
    proc = subprocess.run([sys.executable, "-m", "tests.deploy.helm_engine"], cwd=REPO,
                          input=json.dumps(job), capture_output=True, text=True, env=env,
                          timeout=120)
    if proc.returncode != 0:
        raise HelmFailed(f"helm_engine exited {proc.returncode}:\n{proc.stderr}")
    results: list[JSON] = json.loads(proc.stdout)
    if not allow_failure:
        for step, result in zip(steps, results, strict=False):
            if not result["ok"]:
                raise HelmFailed(f"helm {step['action']} failed: {result['error']}")
    return results


def _types() -> list[ResourceType]:
    r = ResourceType
    rbac, adm = "rbac.authorization.k8s.io", "admissionregistration.k8s.io"
    return [
        r(rbac, "v1", "clusterroles", "ClusterRole", False, "clusterrole", has_generation=False),
        r(rbac, "v1", "clusterrolebindings", "ClusterRoleBinding", False, "clusterrolebinding",
          has_generation=False),
        r(rbac, "v1", "roles", "Role", True, "role", has_generation=False),
        r(rbac, "v1", "rolebindings", "RoleBinding", True, "rolebinding", has_generation=False),
        r(adm, "v1", "validatingadmissionpolicies", "ValidatingAdmissionPolicy", False,
          "validatingadmissionpolicy", status_subresource=True),
        r(adm, "v1", "validatingadmissionpolicybindings", "ValidatingAdmissionPolicyBinding",
          False, "validatingadmissionpolicybinding"),
        r("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget", True,
          "poddisruptionbudget", ("pdb",), status_subresource=True),
        r("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor", True,
          "servicemonitor", ("smon",)),
        r("", "v1", "resourcequotas", "ResourceQuota", True, "resourcequota", ("quota",),
          has_generation=False, status_subresource=True),
        r("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True, "networkpolicy",
          ("netpol",)),
    ]


def serve_builtin_apis(cluster: Cluster, *, admission_policies: bool = True) -> None:
    """Serve the APIs above on the emulator (without admission policies if told so)."""
    assert cluster.api is not None
    api = cluster.api

    def register() -> None:
        for rt in _types():
            if admission_policies or rt.group != "admissionregistration.k8s.io":
                api.types[rt.key] = rt

    cluster.call(register)


def manifest(release: JSON) -> list[JSON]:
    """The objects of a release record's manifest (templates only; CRDs are separate)."""
    return [d for d in yaml.safe_load_all(release["manifest"]) if d]


def lint(values_file: Path | None, workdir: Path, chart: Path = CHART) -> list[tuple[str, str]]:
    """``helm lint`` through the engine, with ``values_file`` merged over the chart's values
    (the engine's lint takes no values: the chart is copied with merged values). Returns
    (severity, path) of every message."""
    target = chart
    if values_file is not None:
        target = workdir / chart.name
        shutil.copytree(chart, target)
        base = yaml.safe_load((chart / "values.yaml").read_text())
        extra = yaml.safe_load(values_file.read_text())
        (target / "values.yaml").write_text(yaml.safe_dump(deep_merge(base, extra)))
    [result] = run([{"action": "lint", "chart": str(target)}])
    return [(SEVERITY.get(m["Severity"], str(m["Severity"])), m["Path"])
            for m in result["result"].get("Messages") or []]


def deep_merge(base: Any, over: Any) -> Any:
    """Helm's values coalescing: maps merge, anything else is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = deep_merge(base.get(key), value)
        return out
    return over
