"""What unpacking writes reaches the pull's progress (``UnpackProgress``,
``bytes_unpacked``), which the node agent's disk budget counts: from every backend that
unpacks. The local store's snapshotters here; containerd's in
``containerd/test_pulls_into_containerd_keep_the_service_limits.py``."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
from fixtures import images
from fixtures.registries import Registry

from agent.images import descriptors
from agent.images.progress import events
from tests.images.pulling import pull

AMD64 = descriptors.Platform("linux", "amd64")


def two_layer_image(seed: int) -> images.Image:
    return images.Image([
        images.random_layer(1_500_000, files=3, seed=seed),
        images.layer({"etc/app.conf": "x=1\n"}),
    ])


def assert_every_layer_counted(image: images.Image, seen: list[events.ProgressEvent]) -> None:
    """Each layer's last ``UnpackProgress`` is its whole tar, and the pull's total is their
    sum."""
    last: dict[str, int] = {}
    for e in seen:
        if isinstance(e, events.UnpackProgress):
            last[str(e.digest)] = e.written
    tars = {layer.digest: len(gzip.decompress(layer.data)) for layer in image.layers}
    assert last == tars
    assert seen[-1].snapshot.bytes_unpacked == sum(tars.values())


@pytest.mark.parametrize("snapshotter", [
    "naive",
    pytest.param("overlayfs", marks=pytest.mark.skipif(os.geteuid() != 0, reason="needs root")),
])
async def test_the_local_store_reports_what_it_unpacks(
    registry: Registry, tmp_root: Path, snapshotter: str
) -> None:
    image = two_layer_image(71)
    images.push(registry, "written/local", snapshotter, image)
    seen: list[events.ProgressEvent] = []

    await pull(tmp_root, f"{registry.host}/written/local:{snapshotter}", platform=AMD64,
               snapshotter=snapshotter, on_event=seen)

    assert_every_layer_counted(image, seen)
