"""requirements.lock (what the image installs, ``pip install --require-hashes --no-deps``)
agrees with pyproject.toml, offline: every runtime dependency and build-system requirement
is pinned there with hashes, at a version its specifier allows; and every locked release
that this virtualenv also has declares no requirement the lock lacks. Regenerate with
``scripts/lock`` after changing a dependency. (The image build runs ``pip check`` on the
installed result: the complete check, with the network.)"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from . import helm

LOCK = helm.REPO / "requirements.lock"
PYPROJECT = tomllib.loads((helm.REPO / "pyproject.toml").read_text())
#: The image's interpreter: CPython 3.11 on Linux (the lock is resolved for it).
ENVIRONMENT = {"python_version": "3.11", "python_full_version": "3.11.2", "sys_platform": "linux",
               "platform_system": "Linux", "os_name": "posix", "extra": ""}


def locked() -> dict[str, tuple[str, list[str]]]:
    """name → (version, hashes) of every entry of the lock."""
    text = LOCK.read_text()
    entries: dict[str, tuple[str, list[str]]] = {}
    for block in re.split(r"\n(?=\S)", text):
        if not block.strip() or block.startswith("#"):
            continue
        first = block.split("\\", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", first)
        assert match, f"requirements.lock: not a pinned requirement: {first!r}"
        name = canonicalize_name(match.group(1))
        assert name not in entries, f"requirements.lock: {name} twice"
        entries[name] = (match.group(2), re.findall(r"--hash=sha256:([0-9a-f]{64})\b", block))
    return entries


def wanted(requirements: list[str]) -> list[Requirement]:
    out = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate(ENVIRONMENT):
            out.append(req)
    return out


def test_every_entry_is_pinned_with_hashes() -> None:
    entries = locked()
    assert len(entries) > 20
    for name, (_, hashes) in entries.items():
        assert hashes, f"requirements.lock: {name} has no --hash"


def test_every_runtime_and_build_requirement_is_locked_at_an_allowed_version() -> None:
    entries = locked()
    requirements = (PYPROJECT["project"]["dependencies"]
                    + PYPROJECT["build-system"]["requires"])
    for req in wanted(requirements):
        name = canonicalize_name(req.name)
        assert name in entries, f"{req} (pyproject.toml) is not in requirements.lock: scripts/lock"
        version = entries[name][0]
        assert req.specifier.contains(version, prereleases=True), (
            f"requirements.lock pins {name}=={version}, pyproject.toml wants {req}: scripts/lock")


def test_locked_releases_need_nothing_the_lock_lacks() -> None:
    entries = locked()
    checked = 0
    for name, (version, _) in entries.items():
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        if dist.version != version:
            continue  # another release here: its metadata says nothing about the locked one
        checked += 1
        for req in wanted(dist.requires or []):
            dep = canonicalize_name(req.name)
            assert dep in entries, f"{name}=={version} requires {req}: not in requirements.lock"
            assert req.specifier.contains(entries[dep][0], prereleases=True), (
                f"{name}=={version} requires {req}; the lock has {entries[dep][0]}")
    assert checked, "no locked release is installed here to check against"
