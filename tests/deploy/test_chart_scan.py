"""The rendered chart through real scanners, as a platform team's pipeline would run them.

- ``kubernetes-validate``: every object against the Kubernetes OpenAPI schemas (offline,
  strict: unknown fields are errors) of the oldest version the chart supports and the newest
  the scanner knows.
- ``checkov`` (its own virtualenv, ``.venv-scan``, made by ``scripts/setup``: its pins
  conflict with ours): every finding must be accepted, with a reason, in the chart README's
  "Accepted scanner findings" table, and every accepted finding must still occur (the list
  stays honest).

Both scan the chart rendered with the default values and with ``values-all.yaml``.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from . import helm
from .conftest import Release

CHECKOV = helm.REPO / ".venv-scan" / "bin" / "checkov"
README = helm.CHART / "README.md"
#: Kinds served by CRDs (no OpenAPI schema in kubernetes-validate's bundle).
CUSTOM_KINDS = {"ServiceMonitor"}
JSON = dict[str, Any]


def bundled_versions() -> list[str]:
    root = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    found = [m.group(1) for p in root.iterdir()
             if (m := re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", p.name))]
    return sorted(found, key=lambda v: tuple(int(x) for x in v.split(".")))


def oldest_supported() -> str:
    chart = yaml.safe_load((helm.CHART / "Chart.yaml").read_text())
    match = re.search(r"(\d+\.\d+)", chart["kubeVersion"])
    assert match, chart["kubeVersion"]
    return f"{match.group(1)}.0"


@pytest.mark.parametrize("which", ["release", "release_all"])
def test_every_object_is_valid_kubernetes(which: str, request: pytest.FixtureRequest) -> None:
    rel: Release = request.getfixturevalue(which)
    versions = sorted({oldest_supported(), bundled_versions()[-1]})
    problems, unchecked = [], set()
    for obj in rel.objects:
        for version in versions:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.SchemaNotFoundError:
                unchecked.add(obj["kind"])
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{obj['kind']} {obj['metadata']['name']} (Kubernetes"
                                f" {version}): {'.'.join(map(str, e.path))}: {e.message}")
    assert not problems, "\n".join(problems)
    assert unchecked <= CUSTOM_KINDS, unchecked
    assert "DaemonSet" in {o["kind"] for o in rel.objects}  # the agents are scanned too


# ------------------------------------------------------------------------------ checkov


def accepted_findings() -> dict[tuple[str, str], str]:
    """(check id, component) → reason, from the README table."""
    text = README.read_text()
    section = text.split("## Accepted scanner findings", 1)[1].split("\n## ", 1)[0]
    out: dict[tuple[str, str], str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not re.fullmatch(r"`CKV2?_K8S_\d+`", cells[0]):
            continue
        components = set(re.findall(r"\b(operator|agent)\b", cells[1]))
        assert components, f"README: {cells[0]} names no component: {cells[1]!r}"
        assert len(cells[2]) > 20, f"README: {cells[0]} has no reason"
        for component in components:
            out[(cells[0].strip("`"), component)] = cells[2]
    return out


def component(resource: str) -> str:
    """checkov's resource id (Kind.namespace.name[.labels]) → operator or agent."""
    name = resource.split(".")[2]
    found = re.search(r"-(operator|agent)(?:-|$)", name)
    return found.group(1) if found else name


def checkov(renders: dict[str, list[JSON]], workdir: Path) -> set[tuple[str, str, str]]:
    """(check id, component, resource) of every failed check, over every rendering (one
    checkov run: its start-up is most of its time)."""
    assert CHECKOV.exists(), f"{CHECKOV} is missing: run scripts/setup"
    for name, objects in renders.items():
        (workdir / name).mkdir()
        for i, obj in enumerate(objects):
            (workdir / name / f"{i:02d}-{obj['kind']}.yaml").write_text(yaml.safe_dump(obj))
    proc = subprocess.run([str(CHECKOV), "-d", str(workdir), "--framework", "kubernetes",
                           "--output", "json", "--soft-fail"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    reports = json.loads(proc.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert reports and all(r["check_type"] == "kubernetes" for r in reports)
    passed = sum(len(r["results"]["passed_checks"]) for r in reports)
    assert passed > 100, "checkov checked next to nothing: did it read the manifests?"
    failed = [c for r in reports for c in r["results"]["failed_checks"]]
    scanned = {c["file_path"].strip("/").split("/")[0] for c in failed}
    assert scanned == set(renders), f"findings only in {scanned}"
    return {(c["check_id"], component(c["resource"]), c["resource"]) for c in failed}


@pytest.fixture(scope="module")
def findings(release: Release, release_all: Release,
             tmp_path_factory: pytest.TempPathFactory) -> set[tuple[str, str, str]]:
    return checkov({"default": release.objects, "all": release_all.objects},
                   tmp_path_factory.mktemp("scan"))


def test_checkov_finds_only_accepted_findings(findings: set[tuple[str, str, str]]) -> None:
    accepted = accepted_findings()
    new = sorted({f"{check} on {resource}" for check, comp, resource in findings
                  if (check, comp) not in accepted})
    assert not new, ("checkov findings not accepted in the chart README (fix them, or add a"
                     " row with the reason):\n" + "\n".join(new))


def test_every_accepted_finding_still_occurs(findings: set[tuple[str, str, str]]) -> None:
    seen = {(check, comp) for check, comp, _ in findings}
    stale = sorted(f"{check} ({comp})" for check, comp in accepted_findings()
                   if (check, comp) not in seen)
    assert not stale, f"accepted in the README but no longer found (remove them): {stale}"
