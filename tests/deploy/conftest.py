"""Fixtures: the chart installed by the real Helm engine into the API emulator."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube.cluster import Cluster

from . import helm

NAMESPACE = "prefetcher"
RELEASE = "ipf"
JSON = dict[str, Any]


@dataclasses.dataclass
class Release:
    """An installed release: its record, its objects, and the emulator it is in."""

    cluster: Cluster
    record: JSON
    objects: list[JSON]

    def get(self, kind: str, name: str | None = None) -> JSON:
        found = [o for o in self.objects if o["kind"] == kind
                 and (name is None or o["metadata"]["name"] == name)]
        assert len(found) == 1, f"{len(found)} {kind} objects named {name!r}"
        return found[0]

    def all(self, kind: str) -> list[JSON]:
        return [o for o in self.objects if o["kind"] == kind]

    def configmap_file(self, suffix: str, key: str) -> str:
        cm = next(o for o in self.all("ConfigMap") if o["metadata"]["name"].endswith(suffix))
        return str(cm["data"][key])

    @property
    def config_toml(self) -> str:
        return self.configmap_file("-config", "config.toml")

    @property
    def agent_daemonset(self) -> JSON:
        """The agents' DaemonSet, a chart object."""
        return self.get("DaemonSet")

    @property
    def agent_daemonset_copy(self) -> JSON:
        """The operator's copy of it, in the "-agent-daemonset" ConfigMap."""
        ds: JSON = yaml.safe_load(self.configmap_file("-agent-daemonset",
                                                      "agent-daemonset.yaml"))
        return ds


def install(tmp: Path, values: JSON | None = None, *, admission_policies: bool = True,
            namespace: str = NAMESPACE) -> Iterator[Release]:
    with Cluster(tmp) as cluster:
        cluster.put("v1", "namespaces", {"metadata": {"name": namespace}})
        helm.serve_builtin_apis(cluster, admission_policies=admission_policies)
        [result] = helm.run([{"action": "install", "release": RELEASE, "values": values}],
                            kubeconfig=cluster.kubeconfig_path, namespace=namespace)
        record = result["result"]
        yield Release(cluster, record, helm.manifest(record))


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart with its default values."""
    yield from install(tmp_path_factory.mktemp("default"))


@pytest.fixture(scope="module")
def release_all(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Release]:
    """The chart with deploy/helm/values-all.yaml (every option on)."""
    yield from install(tmp_path_factory.mktemp("all"),
                       yaml.safe_load(helm.VALUES_ALL.read_text()))
