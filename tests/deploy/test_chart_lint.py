"""``helm lint --strict`` through the Helm engine, and the values file's contract: every key
documented in values.yaml, typed and described in values.schema.json, and used by a template."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from . import helm

SCHEMA = json.loads((helm.CHART / "values.schema.json").read_text())
VALUES_TEXT = (helm.CHART / "values.yaml").read_text()
VALUES = yaml.safe_load(VALUES_TEXT)
# helm lint only informs (severity INFO) that Chart.yaml has no icon; the project has none.
ALLOWED = {("INFO", "Chart.yaml")}


def explain(values: dict[str, Any], tmp: Path) -> str:
    """What the engine's lint cannot say (its messages lose their text): the schema errors,
    and the error of a real render on the emulator."""
    from .conftest import install

    lines = [f"schema: {e.json_path}: {e.message}"
             for e in jsonschema.Draft7Validator(SCHEMA).iter_errors(values)]
    try:
        list(install(tmp, values))
    except AssertionError as e:
        lines.append(str(e))
    return "\n".join(lines) or "(the render succeeds)"


@pytest.mark.parametrize("values_file", [None, helm.VALUES_ALL], ids=["defaults", "values-all"])
def test_helm_lint_strict(values_file: Path | None, tmp_path: Path) -> None:
    messages = helm.lint(values_file, tmp_path)
    problems = [m for m in messages if m not in ALLOWED]
    if problems:
        values = VALUES if values_file is None else helm.deep_merge(
            VALUES, yaml.safe_load(values_file.read_text()))
        (tmp_path / "render").mkdir()
        pytest.fail(f"helm lint: {problems}\n{explain(values, tmp_path / 'render')}")


def test_lint_catches_a_bad_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("config:\n  images:\n    snapshotter: zfs\n")
    assert ("ERROR", "values.yaml") in helm.lint(bad, tmp_path)
    errors = list(jsonschema.Draft7Validator(SCHEMA).iter_errors(
        helm.deep_merge(VALUES, yaml.safe_load(bad.read_text()))))
    assert [e.json_path for e in errors] == ["$.config.images.snapshotter"]


@pytest.mark.parametrize("values_file", [None, helm.VALUES_ALL], ids=["defaults", "values-all"])
def test_values_match_the_schema(values_file: Path | None) -> None:
    values = VALUES if values_file is None else yaml.safe_load(values_file.read_text())
    jsonschema.Draft7Validator.check_schema(SCHEMA)
    jsonschema.validate(values, SCHEMA, cls=jsonschema.Draft7Validator)


# ------------------------------------------------------------------------------ every key


def leaves(values: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Paths of the chart's own keys; pass-through Kubernetes objects count as one key."""
    node = schema_node(path)
    if isinstance(values, dict) and values and node is not None and "properties" in node:
        return [p for k, v in values.items() for p in leaves(v, (*path, k))]
    return [path]


def schema_node(path: tuple[str, ...]) -> dict[str, Any] | None:
    node: dict[str, Any] | None = SCHEMA
    for key in path:
        if node is None or "properties" not in node:
            return None
        node = node["properties"].get(key)
    return node


def test_every_values_key_is_described_in_the_schema() -> None:
    for path in leaves(VALUES):
        node: dict[str, Any] = SCHEMA
        for i, key in enumerate(path):
            assert key in node.get("properties", {}), f"{'.'.join(path[:i + 1])}: not in schema"
            node = node["properties"][key]
            assert node.get("description"), f"{'.'.join(path[:i + 1])}: no description"
    assert set(VALUES) == set(SCHEMA["properties"])


def test_every_values_key_is_documented_in_values_yaml() -> None:
    """Each key the chart defines has a comment line right above it."""
    stack: list[tuple[int, str]] = []
    lines = VALUES_TEXT.splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z_][\w.-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        path = tuple(k for _, k in stack)
        parent = schema_node(path[:-1])
        if parent is None or key not in parent.get("properties", {}):
            continue  # inside a pass-through object (resources, probes...)
        if not lines[i - 1].strip().startswith("#"):
            undocumented.append(".".join(path))
    assert not undocumented, f"values.yaml keys without a comment: {undocumented}"


def template_references() -> set[tuple[str, ...]]:
    """Values paths the templates read: ``.Values.a.b``, and through variables
    (``$a := .Values.agent`` … ``$a.resources``), resolved per file."""
    refs: set[tuple[str, ...]] = set()
    for template in (helm.CHART / "templates").iterdir():
        refs |= _references(template.read_text())
    return refs


def _references(text: str) -> set[tuple[str, ...]]:
    aliases: dict[str, tuple[str, ...]] = {}
    for name, src in re.findall(r"\$(\w+)\s*:=\s*((?:\$|\.ctx)?\.Values(?:\.\w+)*)", text):
        aliases[name] = tuple(src.split(".Values", 1)[1].split(".")[1:])
    changed = True
    while changed:  # $i := $c.images
        changed = False
        for name, base, rest in re.findall(r"\$(\w+)\s*:=\s*\$(\w+)((?:\.\w+)+)", text):
            if base in aliases and name not in aliases:
                aliases[name] = aliases[base] + tuple(rest.split(".")[1:])
                changed = True
    refs: set[tuple[str, ...]] = set()
    for m in re.finditer(r"(:=\s*(?:\$|\.ctx)?)?\.Values((?:\.\w+)+)", text):
        if not m.group(1):  # an alias definition is not a use
            refs.add(tuple(m.group(2).split(".")[1:]))
    for name, rest in re.findall(r"\$(\w+)((?:\.\w+)+)", text):
        if name in aliases:
            refs.add(aliases[name] + tuple(rest.split(".")[1:]))
    return refs


def test_every_values_key_is_used_by_a_template() -> None:
    refs = template_references()
    unused = [".".join(p) for p in leaves(VALUES)
              if not any(p[:len(r)] == r for r in refs)]
    assert not unused, f"values.yaml keys no template reads: {unused}"
    unknown = [".".join(r) for r in refs if schema_node(r) is None and not any(
        schema_node(r[:i]) is not None and "properties" not in (schema_node(r[:i]) or {})
        for i in range(1, len(r)))]
    assert not unknown, f"templates read values that do not exist: {unknown}"
