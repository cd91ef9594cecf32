"""The image service stays free of Kubernetes, settings and telemetry-SDK code.

import-linter enforces most of this (``scripts/test`` runs it); it cannot name a
sub-package of an external package such as ``opentelemetry.sdk``, so this test reads every
import statement of ``agent/images`` itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import agent.images

FORBIDDEN = (
    "kopf",
    "kubernetes",
    "kr8s",
    "pydantic_settings",
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "agent.config",
    "agent.cli",
    "agent.operator",
    "agent.node",
    "agent.kube",
    "agent.telemetry",
)


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_the_image_service_imports_no_kubernetes_settings_or_telemetry_sdk() -> None:
    root = Path(agent.images.__file__).parent
    files = sorted(root.rglob("*.py"))
    assert len(files) > 20
    offenders = {
        f"{path.relative_to(root)}: {name}"
        for path in files
        for name in imported_modules(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
    }
    assert offenders == set()
