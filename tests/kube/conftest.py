"""Fixtures: an emulated Kubernetes API on loopback and a kubeconfig pointing at it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .cluster import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh emulator with the project's CRDs installed by ``kubectl apply -f crds/``."""
    with Cluster(tmp_path) as running:
        running.install_crds()
        yield running


@pytest.fixture
def kubeconfig(cluster: Cluster) -> Path:
    """A kubeconfig file for ``kubectl`` and ``prefetcher operator --kubeconfig``."""
    return cluster.kubeconfig_path
