"""The CRDs reject bad manifests at apply time, naming the field; examples are all valid."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.kube import schemas
from tests.kube.cluster import Cluster

ROOT = Path(__file__).resolve().parents[2]
CRDS = {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml"))}
PREFETCH_SCHEMA = CRDS["imageprefetches.prefetcher.dev.yaml"]["spec"]["versions"][0]["schema"][
    "openAPIV3Schema"]
NODE_SET_SCHEMA = CRDS["nodeimagesets.prefetcher.dev.yaml"]["spec"]["versions"][0]["schema"][
    "openAPIV3Schema"]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
DIGEST = "sha256:" + "a" * 64
GOOD: dict[str, Any] = {
    "apiVersion": "prefetcher.dev/v1alpha1", "kind": "ImagePrefetch",
    "metadata": {"name": "x", "namespace": "default"},
    "spec": {"images": ["nginx:1.27", f"registry.example.com:5000/a/b@{DIGEST}", "[::1]:5000/x"]},
}


def test_crds_name_the_group_version_scope_and_short_names() -> None:
    ipf = CRDS["imageprefetches.prefetcher.dev.yaml"]["spec"]
    nis = CRDS["nodeimagesets.prefetcher.dev.yaml"]["spec"]
    assert (ipf["group"], ipf["scope"], ipf["names"]["shortNames"], ipf["names"]["categories"]) \
        == ("prefetcher.dev", "Namespaced", ["ipf"], ["prefetcher"])
    assert (nis["group"], nis["scope"], nis["names"]["shortNames"]) == \
        ("prefetcher.dev", "Cluster", ["nis"])
    for spec in (ipf, nis):
        assert [v["name"] for v in spec["versions"]] == ["v1alpha1"]
        assert spec["versions"][0]["subresources"] == {"status": {}}
    columns = [c["name"] for c in ipf["versions"][0]["additionalPrinterColumns"]
               if not c.get("priority")]
    assert columns == ["Images", "Nodes", "Ready", "Failed", "Progress", "Phase", "Age"]


@pytest.mark.parametrize("schema", [PREFETCH_SCHEMA, NODE_SET_SCHEMA], ids=["ipf", "nis"])
def test_every_field_has_a_description_for_kubectl_explain(schema: dict[str, Any]) -> None:
    missing = []

    def walk(node: dict[str, Any], path: str) -> None:
        for name, sub in (node.get("properties") or {}).items():
            where = f"{path}.{name}"
            if name not in ("metadata",) and not sub.get("description"):
                missing.append(where)
            walk(sub, where)
        if isinstance(node.get("items"), dict):
            walk(node["items"], path + "[]")

    walk(schema, "")
    assert missing == []


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_example_is_valid(example: Path) -> None:
    for doc in yaml.safe_load_all(example.read_text()):
        assert schemas.problems(PREFETCH_SCHEMA, doc) == []


BAD = [
    ("no images", lambda s: s.pop("images"), "spec.images"),
    ("empty images", lambda s: s.update(images=[]), "spec.images"),
    ("upper-case repository", lambda s: s.update(images=["Nginx:1"]), "spec.images[0]"),
    ("space in reference", lambda s: s.update(images=["nginx 1"]), "spec.images[0]"),
    ("short digest", lambda s: s.update(images=["nginx@sha256:abc"]), "spec.images[0]"),
    ("bad pull policy", lambda s: s.update(pullPolicy="Never"), "spec.pullPolicy"),
    ("zero parallelism", lambda s: s.update(parallelism=0), "spec.parallelism"),
    ("negative backoff", lambda s: s.update(backoffLimit=-1), "spec.backoffLimit"),
    ("bad duration", lambda s: s.update(progressTimeout="5 minutes"), "spec.progressTimeout"),
    ("bad completion policy", lambda s: s.update(completionPolicy="Sometimes"),
     "spec.completionPolicy"),
    ("negative ttl", lambda s: s.update(ttlSecondsAfterFinished=-5),
     "spec.ttlSecondsAfterFinished"),
    ("bad node name", lambda s: s.update(nodeNames=["Node_A"]), "spec.nodeNames[0]"),
    ("bad selector operator", lambda s: s.update(nodeSelector={"matchExpressions": [
        {"key": "a", "operator": "Like"}]}), "spec.nodeSelector.matchExpressions[0].operator"),
    ("secret without name", lambda s: s.update(imagePullSecrets=[{}]),
     "spec.imagePullSecrets[0].name"),
]


@pytest.mark.parametrize(("mutate", "field"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_schema_rejects_bad_manifests_naming_the_field(mutate: Any, field: str) -> None:
    doc = copy.deepcopy(GOOD)
    mutate(doc["spec"])
    problems = schemas.problems(PREFETCH_SCHEMA, doc)
    assert problems, "accepted"
    assert any(p.startswith(field + ":") for p in problems), problems


def test_good_manifest_passes() -> None:
    assert schemas.problems(PREFETCH_SCHEMA, GOOD) == []


def test_cel_rules_cover_what_the_schema_cannot() -> None:
    rules = dict(schemas.cel_rules(PREFETCH_SCHEMA))
    assert "spec" in rules and "completionPolicy" in rules["spec"]["rule"]
    assert "spec.nodeSelector.matchExpressions[*]" in rules


def test_node_image_set_status_phases_are_the_image_service_phases() -> None:
    from agent.images.progress.events import Phase

    phase = NODE_SET_SCHEMA["properties"]["status"]["properties"]["images"]["items"][
        "properties"]["phase"]
    assert phase["enum"] == [p.value for p in Phase]


def test_kubectl_apply_of_a_bad_manifest_fails_naming_the_field(tmp_path: Path) -> None:
    with Cluster(tmp_path) as cluster:
        cluster.install_crds()
        doc = copy.deepcopy(GOOD)
        doc["spec"]["parallelism"] = 0
        result = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc), check=False)
        assert result.returncode != 0
        assert "spec.parallelism" in result.stderr
        for example in EXAMPLES:
            cluster.kubectl("apply", "-f", str(example))
        listed = cluster.kubectl("get", "ipf", "-A", "-o", "name").stdout.split()
        assert len(listed) == len(EXAMPLES)
