"""The reference oracle: containerd's own layer applier, built once per test session.

Needs root (overlay whiteouts are 0:0 character devices and ``trusted.*`` xattrs) and Go
with containerd's source (``scripts/setup`` installs ``golang-go`` and
``golang-github-containerd-containerd-dev``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.images.unpack import trees

from . import appliers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root: mknod, trusted.* xattrs, chown")
        for item in items:
            if "tests/oracle/" in str(item.fspath):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def containerd_apply(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``containerd-apply`` binary (containerd 1.6's ``archive.Apply`` and Go's
    ``archive/tar``), built from ``tests/oracle/containerd-apply``."""
    if shutil.which("go") is None:
        pytest.skip(
            "go is missing: apt-get install golang-go golang-github-containerd-containerd-dev"
            " (scripts/setup does)"
        )
    return appliers.build_tool(tmp_path_factory.mktemp("containerd-apply"))


@pytest.fixture
def canary(tmp_path: Path) -> Iterator[Path]:
    """A directory outside every root that hostile layers aim at: after the test (whatever
    path it returned by), nothing in it has changed."""
    path = tmp_path / "canary"
    path.mkdir()
    (path / "secret").write_bytes(b"do not touch")
    before = trees.describe(path)
    yield path
    assert trees.describe(path) == before, "a layer wrote outside its root"
